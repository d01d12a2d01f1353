//! The instance-metadata contract shared by the meshiam sidecar filter and the node broker.
//!
//! Everything here is plain data and pure functions: no I/O, no clock, no randomness. The
//! callers bring the current time and the secret, which keeps this crate `no_std` (it runs
//! inside the proxy-wasm filter) and makes every rule testable natively.
//!
//! - [`path`]: what an IMDS request path is (token, role list, role credentials, …).
//! - [`token`]: IMDSv2 token TTL rules and stateless, HMAC-bound session tokens.
//! - [`time`]: the second-precision `Z` timestamps the SDKs parse.
//! - [`creds`]: rendering and parsing of the IMDS credential documents.
//! - [`headers`]: IMDS header names and the headers between filter and broker.
//! - [`json`]: the small JSON reader both documents and configuration go through.
//! - [`resource`]: what a served read asks for, the key both sides use.
//! - [`allow`]: the allow-list of non-credential paths passed through to the node's IMDS.
//! - [`container`]: the container-credentials endpoint (EKS Pod Identity's `/v1/credentials`).
#![no_std]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

extern crate alloc;

pub mod allow;
pub mod container;
pub mod creds;
pub mod headers;
pub mod json;
pub mod path;
pub mod resource;
pub mod rules;
pub mod time;
pub mod token;

pub use allow::{AllowError, AllowList};
pub use creds::{Credentials, JsonError};
pub use path::{PathClass, classify};
pub use resource::Resource;
pub use rules::{Admission, ImdsHeaders, Refusal, Seen, admit, check_session};
pub use token::{TokenError, TokenIssuer, TtlError, parse_ttl};
