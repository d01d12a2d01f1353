//! Prometheus metrics (served on the admin port).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

// Label values are `&'static str`: every one is a fixed word (a path kind, a reason code), and
// counting a request then allocates nothing.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// What the path asked for (`credentials`, `role_list`, `token`, …).
    pub path: &'static str,
    /// `ok` or the refusal's reason code.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StsLabels {
    /// `ok`, `throttled`, `denied`, `unavailable`, `timeout`.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PurposeLabels {
    /// `request`, `prefetch`, `refresh`.
    pub purpose: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `per-peer` or `total`.
    pub limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `roots` or `certificate`.
    pub what: &'static str,
    /// `ok` or `invalid`.
    pub result: &'static str,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    sts_calls: Family<StsLabels, Counter>,
    sts_latency: Histogram,
    cache_hits: Counter,
    cache_misses: Family<PurposeLabels, Counter>,
    cache_refreshes: Family<PurposeLabels, Counter>,
    cache_stale_served: Counter,
    cache_entries: Gauge,
    pods_tracked: Gauge,
    pod_store_stale: Gauge<f64, AtomicU64>,
    identity_mismatches: Counter,
    connections: Gauge,
    connections_refused: Family<LimitLabels, Counter>,
    pod_waiters: Gauge,
    mtls_connections: Family<ResultLabels, Counter>,
    mtls_checks: Family<ResultLabels, Counter>,
    mtls_reloads: Family<ReloadLabels, Counter>,
    mtls_roots: Gauge,
    token_reviews: Family<StsLabels, Counter>,
}

/// Every metric the broker keeps. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshiam_broker");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "IMDS requests answered, by path kind and outcome (ok or reason code)",
            requests.clone(),
        );
        let sts_calls = Family::<StsLabels, Counter>::default();
        registry.register(
            "sts_calls",
            "STS AssumeRole calls by result",
            sts_calls.clone(),
        );
        let sts_latency = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "sts_call_duration_seconds",
            "Latency of STS AssumeRole calls",
            sts_latency.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "cache_hits",
            "Credential requests answered from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Family::<PurposeLabels, Counter>::default();
        registry.register(
            "cache_misses",
            "Credential lookups that had to call STS, by purpose",
            cache_misses.clone(),
        );
        let cache_refreshes = Family::<PurposeLabels, Counter>::default();
        registry.register(
            "cache_refreshes",
            "Credentials fetched ahead of need (prefetch on pod start, refresh before expiry)",
            cache_refreshes.clone(),
        );
        let cache_stale_served = Counter::default();
        registry.register(
            "cache_stale_served",
            "Still-valid credentials served while STS was failing",
            cache_stale_served.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Credential cache entries",
            cache_entries.clone(),
        );
        let pods_tracked = Gauge::default();
        registry.register(
            "pods_tracked",
            "Pods in the pod store",
            pods_tracked.clone(),
        );
        let pod_store_stale = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "pod_store_stale_seconds",
            "How long the pod store's source (the Kubernetes watch) has been down; 0 while it is current. Past --max-staleness every IMDS request is refused",
            pod_store_stale.clone(),
        );
        let identity_mismatches = Counter::default();
        registry.register(
            "identity_mismatches",
            "Call-outs whose claimed pod identity differed from the caller's address",
            identity_mismatches.clone(),
        );
        let token_reviews = Family::<StsLabels, Counter>::default();
        registry.register(
            "token_reviews",
            "Container-credentials tokens checked, by result: authenticated, refused (the API \
             server said no), error (no verdict), cached (a verdict reused)",
            token_reviews.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open connections on the IMDS listener",
            connections.clone(),
        );
        let connections_refused = Family::<LimitLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections to the IMDS listener refused at once, by the cap they hit (per-peer: --max-connections-per-peer, total: --max-connections)",
            connections_refused.clone(),
        );
        let pod_waiters = Gauge::default();
        registry.register(
            "pod_waiters",
            "Requests waiting (up to --ip-wait) for their caller's address to appear in the pod store",
            pod_waiters.clone(),
        );
        let mtls_connections = Family::<ResultLabels, Counter>::default();
        registry.register(
            "mtls_connections",
            "Connections to the IMDS listener under --mtls preferred|required, by how they began: tls (handshake done), plain, handshake-failed, handshake-timeout",
            mtls_connections.clone(),
        );
        let mtls_checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "mtls_checks",
            "Requests checked under --mtls, by result: verified, plain-allowed, or the refusal's reason code (peer-certificate-missing, peer-certificate-invalid, peer-identity-mismatch)",
            mtls_checks.clone(),
        );
        let mtls_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "mtls_reloads",
            "Changes of --mtls-roots (what=roots) or --mtls-cert/--mtls-key (what=certificate) seen, by result (ok, or invalid: kept the last good one)",
            mtls_reloads.clone(),
        );
        let mtls_roots = Gauge::default();
        registry.register(
            "mtls_root_certificates",
            "Root certificates workload certificates are verified against (--mtls-roots)",
            mtls_roots.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                sts_calls,
                sts_latency,
                cache_hits,
                cache_misses,
                cache_refreshes,
                cache_stale_served,
                cache_entries,
                pods_tracked,
                pod_store_stale,
                identity_mismatches,
                connections,
                connections_refused,
                pod_waiters,
                mtls_connections,
                mtls_checks,
                mtls_reloads,
                mtls_roots,
                token_reviews,
            }),
        }
    }

    pub fn request(&self, path: &'static str, outcome: &'static str) {
        self.inner
            .requests
            .get_or_create(&RequestLabels { path, outcome })
            .inc();
    }

    pub fn sts_call(&self, result: &'static str, seconds: f64) {
        self.inner
            .sts_calls
            .get_or_create(&StsLabels { result })
            .inc();
        self.inner.sts_latency.observe(seconds);
    }

    pub fn cache_hit(&self) {
        self.inner.cache_hits.inc();
    }

    pub fn cache_miss(&self, purpose: &'static str) {
        self.inner
            .cache_misses
            .get_or_create(&PurposeLabels { purpose })
            .inc();
    }

    pub fn cache_refresh(&self, purpose: &'static str) {
        self.inner
            .cache_refreshes
            .get_or_create(&PurposeLabels { purpose })
            .inc();
    }

    pub fn stale_served(&self) {
        self.inner.cache_stale_served.inc();
    }

    pub fn set_cache_entries(&self, n: usize) {
        self.inner.cache_entries.set(n as i64);
    }

    pub fn set_pods_tracked(&self, n: usize) {
        self.inner.pods_tracked.set(n as i64);
    }

    pub fn set_pod_store_stale(&self, seconds: f64) {
        self.inner.pod_store_stale.set(seconds);
    }

    /// One container-credentials token check (`authenticated`, `refused`, `error`, `cached`).
    pub fn token_review(&self, result: &'static str) {
        self.inner
            .token_reviews
            .get_or_create(&StsLabels { result })
            .inc();
    }

    pub fn identity_mismatch(&self) {
        self.inner.identity_mismatches.inc();
    }

    pub fn identity_mismatches(&self) -> u64 {
        self.inner.identity_mismatches.get()
    }

    pub fn set_connections(&self, n: usize) {
        self.inner.connections.set(n as i64);
    }

    pub fn connection_refused(&self, limit: &'static str) {
        self.inner
            .connections_refused
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    pub fn set_pod_waiters(&self, n: usize) {
        self.inner.pod_waiters.set(n as i64);
    }

    pub fn mtls_connection(&self, result: &'static str) {
        self.inner
            .mtls_connections
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn mtls_check(&self, result: &'static str) {
        self.inner
            .mtls_checks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn mtls_reload(&self, what: &'static str, result: &'static str) {
        self.inner
            .mtls_reloads
            .get_or_create(&ReloadLabels { what, result })
            .inc();
    }

    pub fn set_mtls_roots(&self, n: usize) {
        self.inner.mtls_roots.set(n as i64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}
