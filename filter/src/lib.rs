//! The meshiam proxy-wasm filter: answers a pod's instance-metadata (IMDS) traffic inside
//! its Envoy sidecar, with IMDSv2 tokens, a deny-by-default path policy, a shared credential
//! cache and credentials from the node broker; everything else passes through untouched.
//!
//! Decisions live in plain Rust behind [`host::Host`] ([`flow`], [`identity`], [`secret`],
//! [`broker_session`], [`cache`], [`config`]); [`glue`] is the thin proxy-wasm adapter.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

extern crate alloc;

pub mod broker_session;
pub mod cache;
pub mod config;
pub mod flow;
pub mod glue;
pub mod host;
pub mod identity;
pub mod metrics;
pub mod secret;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_container;

proxy_wasm::main! {{
    glue::start();
}}
