//! meshiam-broker: the node service that tells a caller's pod from its TCP source address,
//! decides the pod's IAM role, and answers IMDS credential requests with STS credentials.
//!
//! - [`imds::router`]: the IMDS paths, for filter call-outs and for pods calling directly.
//! - [`admin::router`]: health, readiness, metrics and the per-pod explanation.
//! - [`Broker`]: the shared state both routers read; [`background`] keeps the cache warm.

pub mod admin;
pub mod audit;
pub mod background;
pub mod cache;
pub mod clock;
pub mod config;
pub mod container;
pub mod error;
pub mod file_source;
pub mod identity;
pub mod imds;
pub mod kube_source;
pub mod limiter;
pub mod limits;
pub mod metrics;
pub mod mtls;
pub mod node_imds;
pub mod pods;
pub mod policy;
pub mod server;
pub mod session;
pub mod sts;
/// Test doubles (a fake STS), for the crate's own tests and, with the `testing` feature,
/// its integration tests; not in the release binary.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

use std::time::Duration;

pub use imds::router;

/// The version and git commit, as `--version` prints them.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MESHIAM_GIT_COMMIT"),
    ")"
);

/// `--metadata-allow`'s default: what SDKs read to discover their region.
pub const DEFAULT_METADATA_ALLOW: [&str; 2] = [
    "meta-data/placement/region",
    "meta-data/placement/availability-zone",
];

/// How the IMDS router serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// How long a request from an unknown address waits for the pod store.
    pub ip_wait: Duration,
    /// The token rule for every read (`--direct-mode`).
    pub direct_mode: imds::DirectMode,
    /// Non-credential metadata paths fetched from the node's IMDS.
    pub metadata_allow: meshiam_imds::AllowList,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_concurrency: usize,
    /// Longest time the pod store may be out of date (its watch down) before requests,
    /// whose identity rests on the caller's address, are refused.
    pub max_staleness: Duration,
    /// Requests waiting for unknown addresses, in all and per address.
    pub max_pod_waiters: usize,
    pub max_pod_waiters_per_peer: usize,
    /// What the call-out's transport must prove (`--mtls`, `--mtls-trust-domain`).
    pub mtls: mtls::MtlsPolicy,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            ip_wait: Duration::from_secs(2),
            direct_mode: imds::DirectMode::Required,
            metadata_allow: meshiam_imds::AllowList::parse(&DEFAULT_METADATA_ALLOW)
                .unwrap_or_default(),
            request_timeout: Duration::from_secs(15),
            max_body_bytes: 4096,
            max_concurrency: 1024,
            max_staleness: Duration::from_secs(5),
            max_pod_waiters: 128,
            max_pod_waiters_per_peer: 8,
            mtls: mtls::MtlsPolicy::default(),
        }
    }
}

/// Everything a request needs. Shared by the routers and the background tasks.
#[derive(Debug)]
pub struct Broker {
    pub store: pods::PodStore,
    pub policy: policy::RolePolicy,
    pub cache: cache::CredentialCache,
    pub issuer: meshiam_imds::TokenIssuer,
    pub node_imds: node_imds::NodeImds,
    pub metrics: metrics::Metrics,
    pub clock: clock::Clock,
    pub serve: ServeConfig,
    /// The token rule of the container-credentials door (`/v1/credentials`).
    pub container: container::ContainerAuth,
}

impl Broker {
    /// A fresh random secret for the broker's IMDSv2 tokens. Tokens do not survive a
    /// restart; SDKs (and the filter) ask for a new one on `401`.
    pub fn random_token_secret() -> [u8; meshiam_imds::token::SECRET_LEN] {
        use rand::RngCore;
        let mut s = [0u8; meshiam_imds::token::SECRET_LEN];
        rand::rng().fill_bytes(&mut s);
        s
    }

    /// Fresh random bytes for one token, so no two tokens are alike.
    pub fn token_nonce() -> [u8; meshiam_imds::token::NONCE_LEN] {
        use rand::RngCore;
        let mut n = [0u8; meshiam_imds::token::NONCE_LEN];
        rand::rng().fill_bytes(&mut n);
        n
    }
}
