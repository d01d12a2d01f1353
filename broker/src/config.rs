//! Command line and environment. Every flag has a `MESHIAM_…` environment equivalent;
//! invalid settings stop the broker at start with one clear message.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

use crate::ServeConfig;
use crate::cache::CacheConfig;
use crate::imds::DirectMode;
use crate::mtls::{MtlsFiles, MtlsMode, MtlsPolicy};
use crate::policy::{BaseArn, PolicyConfig, ROLE, Restriction, RestrictionFormat, RolePolicy};
use crate::server::ConnLimits;
use crate::sts::StsEndpoint;
use meshiam_imds::AllowList;

/// Where pods come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodSource {
    /// A YAML file, reloaded when it changes (local demo, hosts without Kubernetes).
    File,
    /// The Kubernetes API: this node's pods (and namespaces for restrictions).
    Kube,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `500ms`, `2s`, `30m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 2s, 30m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
    }
}

/// meshiam-broker answers pods' instance-metadata (IMDS) credential requests with STS
/// credentials for the IAM role named in their `iam.amazonaws.com/role` annotation. The
/// caller is identified by its TCP source address.
#[derive(Debug, Clone, Parser)]
#[command(name = "meshiam-broker", version = crate::VERSION, about, long_about = None)]
pub struct Config {
    /// Address the IMDS service (filter call-outs and direct pod requests) listens on.
    #[arg(long, env = "MESHIAM_LISTEN", default_value = "0.0.0.0:8181")]
    pub listen: SocketAddr,

    /// Address of the admin service: /healthz, /readyz, /metrics (and /debug/pods with
    /// --debug-endpoints).
    #[arg(long, env = "MESHIAM_ADMIN_LISTEN", default_value = "0.0.0.0:8182")]
    pub admin_listen: SocketAddr,

    /// Serve /debug/pods on the admin port, to callers on the node's loopback (127.0.0.1,
    /// ::1) only: it lists pods, addresses and roles.
    #[arg(long, env = "MESHIAM_DEBUG_ENDPOINTS", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub debug_endpoints: bool,

    /// Where pods come from: `file` (YAML, see --pods-file) or `kube` (this node's pods from
    /// the Kubernetes API; needs --node-name).
    #[arg(long, env = "MESHIAM_POD_SOURCE", value_enum, default_value_t = PodSource::File)]
    pub pod_source: PodSource,

    /// The YAML pods file read by `--pod-source file`; reloaded when it changes.
    #[arg(
        long,
        env = "MESHIAM_PODS_FILE",
        default_value = "/etc/meshiam/pods.yaml"
    )]
    pub pods_file: PathBuf,

    /// How often the pods file is checked for changes.
    #[arg(long, env = "MESHIAM_PODS_FILE_POLL", default_value = "1s", value_parser = parse_duration)]
    pub pods_file_poll: Duration,

    /// This node's name (downward API `spec.nodeName`). Required for `kube`; with `file`,
    /// only pods of this node (or without a node) are taken.
    #[arg(long, env = "MESHIAM_NODE_NAME")]
    pub node_name: Option<String>,

    /// How long a request from an address not yet in the pod store waits for it to appear.
    #[arg(long, env = "MESHIAM_IP_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub ip_wait: Duration,

    /// Longest time the pod store may be out of date: once the Kubernetes watch has been
    /// down this long, every IMDS request is refused (503 pod-store-stale) and /readyz fails,
    /// until the watch has re-listed.
    #[arg(long, env = "MESHIAM_MAX_STALENESS", default_value = "5s", value_parser = parse_duration)]
    pub max_staleness: Duration,

    /// Longest silence on a Kubernetes API connection (no event, no bookmark, no byte)
    /// before it counts as dead: the watch is dropped, the store marked down and re-listed.
    /// Watches ask the API server to end them 2 s sooner, so a healthy one never stays this
    /// silent. At least 3s.
    #[arg(long, env = "MESHIAM_WATCH_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub watch_idle_timeout: Duration,

    /// Prefix for role names, e.g. `arn:aws:iam::123456789012:role/`. When absent it is
    /// discovered from the node's own role (STS GetCallerIdentity).
    #[arg(long, env = "MESHIAM_BASE_ROLE_ARN")]
    pub base_role_arn: Option<String>,

    /// Role for pods without a role annotation (--iam-role-key; name, path/name or ARN).
    /// Without it such pods get no role. Under namespace restrictions it is permitted in
    /// every namespace, also to pods that name it (as kube2iam).
    #[arg(long, env = "MESHIAM_DEFAULT_ROLE")]
    pub default_role: Option<String>,

    /// The pod annotation that names the role (kube2iam's --iam-role-key).
    #[arg(long, env = "MESHIAM_IAM_ROLE_KEY", default_value = ROLE)]
    pub iam_role_key: String,

    /// Namespace restriction: `off`, `allowed-roles` (kube2iam's
    /// iam.amazonaws.com/allowed-roles, a JSON list; see --namespace-restriction-format) or
    /// `permitted` (kiam's iam.amazonaws.com/permitted, a regex on the role ARN).
    #[arg(long, env = "MESHIAM_NAMESPACE_RESTRICTION", value_enum, default_value_t = Restriction::Off)]
    pub namespace_restriction: Restriction,

    /// How `allowed-roles` entries match, as kube2iam's flag of this name: `glob` (`*`
    /// matches anything, `/` too; the whole ARN) or `regexp` (found anywhere in the ARN, not
    /// anchored). Name entries are prefixed with the base ARN first.
    #[arg(long, env = "MESHIAM_NAMESPACE_RESTRICTION_FORMAT", value_enum, default_value_t = RestrictionFormat::Glob)]
    pub namespace_restriction_format: RestrictionFormat,

    /// kiam's flag of this name: match `permitted` anywhere in the role ARN instead of as
    /// `^` + regex + `$`.
    #[arg(long, env = "MESHIAM_DISABLE_STRICT_NAMESPACE_REGEXP", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub disable_strict_namespace_regexp: bool,

    /// AssumeRole DurationSeconds (900..43200; role chaining caps it at 3600).
    #[arg(long, env = "MESHIAM_SESSION_DURATION", default_value = "3600s", value_parser = parse_duration)]
    pub session_duration: Duration,

    /// Accept --session-duration below STS's 900 s minimum (down to 60 s). Only for STS
    /// emulators in tests, which is where short sessions make rotation observable.
    #[arg(
        long,
        env = "MESHIAM_ALLOW_SHORT_SESSIONS",
        hide = true,
        default_value_t = false
    )]
    pub allow_short_sessions: bool,

    /// Every credential answer has at least this much lifetime left; must be shorter than
    /// --session-duration.
    #[arg(long, env = "MESHIAM_MIN_REMAINING", default_value = "30m", value_parser = parse_duration)]
    pub min_remaining: Duration,

    /// Background refresh starts this long before --min-remaining is reached.
    #[arg(long, env = "MESHIAM_REFRESH_MARGIN", default_value = "5m", value_parser = parse_duration)]
    pub refresh_margin: Duration,

    /// Tag sessions with the pod's namespace, name, service account and node (and
    /// --cluster-name). The role's trust policy must allow sts:TagSession.
    #[arg(long, env = "MESHIAM_SESSION_TAGS", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub session_tags: bool,

    /// Cluster name for the `kubernetes-cluster-name` session tag.
    #[arg(long, env = "MESHIAM_CLUSTER_NAME")]
    pub cluster_name: Option<String>,

    /// Set SourceIdentity to the session name (namespace.pod). The trust policy must allow
    /// sts:SetSourceIdentity.
    #[arg(long, env = "MESHIAM_SOURCE_IDENTITY", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub source_identity: bool,

    /// AWS region for the regional STS endpoint (default: the SDK's chain: AWS_REGION, the
    /// profile, the node's metadata). AWS_ENDPOINT_URL_STS overrides the endpoint.
    #[arg(long, env = "MESHIAM_REGION")]
    pub region: Option<String>,

    /// `regional` (sts.<region>.amazonaws.com) or `global` (sts.amazonaws.com for the
    /// regions that had it, signed for us-east-1; kube2iam's default). AWS_ENDPOINT_URL_STS
    /// overrides both.
    #[arg(long, env = "MESHIAM_STS_ENDPOINT", value_enum, default_value_t = StsEndpoint::Regional)]
    pub sts_endpoint: StsEndpoint,

    /// Budget of one STS call (and of a fetch's wait for the node-wide STS limiter).
    #[arg(long, env = "MESHIAM_STS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub sts_timeout: Duration,

    /// How long a pod's request waits for STS before it is answered (still-valid credentials,
    /// else 504) while the STS call carries on, so the SDK's next try finds the credentials.
    /// Keep it below the SDKs' 1 s metadata timeout.
    #[arg(long, env = "MESHIAM_REQUEST_WAIT", default_value = "900ms", value_parser = parse_duration)]
    pub request_wait: Duration,

    /// Node-wide STS call rate, calls per second.
    #[arg(long, env = "MESHIAM_STS_RATE", default_value_t = 5.0)]
    pub sts_rate: f64,

    /// Node-wide STS burst size.
    #[arg(long, env = "MESHIAM_STS_BURST", default_value_t = 10)]
    pub sts_burst: u32,

    /// First step of the node-wide backoff after throttling or an STS outage (doubles).
    #[arg(long, env = "MESHIAM_STS_BACKOFF_BASE", default_value = "500ms", value_parser = parse_duration)]
    pub sts_backoff_base: Duration,

    /// Longest backoff, node-wide and per role.
    #[arg(long, env = "MESHIAM_STS_BACKOFF_MAX", default_value = "60s", value_parser = parse_duration)]
    pub sts_backoff_max: Duration,

    /// How long a failed AssumeRole is remembered before it is retried (doubles on repeated
    /// failures, up to --sts-backoff-max).
    #[arg(long, env = "MESHIAM_NEGATIVE_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub negative_cache_ttl: Duration,

    /// While STS fails, credentials with at least this long left are still served.
    #[arg(long, env = "MESHIAM_STALE_FLOOR", default_value = "60s", value_parser = parse_duration)]
    pub stale_floor: Duration,

    /// Fetch credentials as soon as a role-annotated pod appears.
    #[arg(long, env = "MESHIAM_PREFETCH", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub prefetch: bool,

    /// Prefetch and refresh wait a random delay up to this, so pods started together do
    /// not call STS together.
    #[arg(long, env = "MESHIAM_PREFETCH_JITTER", default_value = "2s", value_parser = parse_duration)]
    pub prefetch_jitter: Duration,

    /// How often unused credentials are dropped and due ones refreshed.
    #[arg(long, env = "MESHIAM_MAINTENANCE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub maintenance_interval: Duration,

    /// The token rule for every read, filter call-out or direct (the broker cannot tell them
    /// apart): `required` (reads need a token from the broker's token PUT; the filter holds
    /// one) or `optional` (tokenless IMDSv1 reads allowed unless the pod's
    /// meshiam.io/imdsv2 annotation says `required`; for pods without a sidecar during a
    /// kube2iam migration; weakens SSRF protection). `off` is no longer supported.
    #[arg(long, env = "MESHIAM_DIRECT_MODE", default_value = "required", value_parser = DirectMode::parse)]
    pub direct_mode: DirectMode,

    /// Non-credential metadata paths fetched from the node's IMDS (comma-separated, below
    /// the version; a trailing `*` matches a prefix). Everything else is 404.
    #[arg(
        long,
        env = "MESHIAM_METADATA_ALLOW",
        value_delimiter = ',',
        default_value = "meta-data/placement/region,meta-data/placement/availability-zone"
    )]
    pub metadata_allow: Vec<String>,

    /// The node's own IMDS, for allow-listed paths.
    #[arg(
        long,
        env = "MESHIAM_NODE_IMDS_URL",
        default_value = "http://169.254.169.254"
    )]
    pub node_imds_url: String,

    /// Timeout of one call to the node's IMDS.
    #[arg(long, env = "MESHIAM_NODE_IMDS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub node_imds_timeout: Duration,

    /// How long answers from the node's IMDS are cached.
    #[arg(long, env = "MESHIAM_METADATA_CACHE_TTL", default_value = "5m", value_parser = parse_duration)]
    pub metadata_cache_ttl: Duration,

    /// The audience the pod's projected service-account token must have on the
    /// container-credentials door (`/v1/credentials`, EKS Pod Identity's endpoint): the
    /// broker checks the token with a Kubernetes TokenReview for this audience (needs
    /// `--pod-source kube` and RBAC `create` on `tokenreviews`).
    #[arg(long, env = "MESHIAM_CONTAINER_TOKEN_AUDIENCE", default_value = crate::container::DEFAULT_AUDIENCE)]
    pub container_token_audience: String,

    /// Longest time a request may take (answered 504 after).
    #[arg(long, env = "MESHIAM_REQUEST_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Largest request body accepted (IMDS requests have none).
    #[arg(long, env = "MESHIAM_MAX_BODY_BYTES", default_value_t = 4096)]
    pub max_body_bytes: usize,

    /// Requests served at once, counted once the caller is identified (a request waiting
    /// for an unknown address does not hold one); more wait.
    #[arg(long, env = "MESHIAM_MAX_CONCURRENCY", default_value_t = 1024)]
    pub max_concurrency: usize,

    /// Longest time a connection may take to send a whole request head, counted from when
    /// the broker starts waiting for it: on a new connection and between keep-alive
    /// requests, so it is also the idle keep-alive limit. Closes slowloris connections.
    #[arg(long, env = "MESHIAM_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Open connections to the IMDS listener, in all; past it a connection is answered
    /// 503 connection-limit and closed.
    #[arg(long, env = "MESHIAM_MAX_CONNECTIONS", default_value_t = 2048)]
    pub max_connections: usize,

    /// Open connections to the IMDS listener from one address (one pod); past it a
    /// connection is answered 503 connection-limit and closed.
    #[arg(long, env = "MESHIAM_MAX_CONNECTIONS_PER_PEER", default_value_t = 64)]
    pub max_connections_per_peer: usize,

    /// Requests waiting (up to --ip-wait) for an address the pod store does not know yet,
    /// in all; past it such a request is answered 503 pod-wait-limit at once.
    #[arg(long, env = "MESHIAM_MAX_POD_WAITERS", default_value_t = 128)]
    pub max_pod_waiters: usize,

    /// Requests waiting for one unknown address; past it 503 pod-wait-limit at once.
    #[arg(long, env = "MESHIAM_MAX_POD_WAITERS_PER_PEER", default_value_t = 8)]
    pub max_pod_waiters_per_peer: usize,

    /// Mutual TLS on the IMDS port, for call-outs that carry the pod's workload certificate:
    /// `off` (plain HTTP only), `preferred` (TLS and plain HTTP on the same port; a presented
    /// certificate must be valid and name the pod at the caller's address) or `required`
    /// (no answer without such a certificate, except to plain callers of namespaces
    /// annotated `meshiam.io/allow-plain-callers: "true"`).
    #[arg(long, env = "MESHIAM_MTLS", value_enum, default_value_t = MtlsMode::Off)]
    pub mtls: MtlsMode,

    /// The SPIFFE trust domain of workload certificates
    /// (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`); Istio's default is
    /// `cluster.local`.
    #[arg(
        long,
        env = "MESHIAM_MTLS_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub mtls_trust_domain: String,

    /// The mesh's root certificate(s), PEM: a file, or a directory whose files are all read
    /// (a mounted `istio-ca-root-cert` ConfigMap). Read again every second; a change that
    /// does not parse is skipped. Needed unless `--mtls off`.
    #[arg(long, env = "MESHIAM_MTLS_ROOTS")]
    pub mtls_roots: Option<PathBuf>,

    /// The broker's own certificate chain, PEM, issued by the mesh CA (the sidecar verifies
    /// it). Reloaded on change. Needed unless `--mtls off`.
    #[arg(long, env = "MESHIAM_MTLS_CERT")]
    pub mtls_cert: Option<PathBuf>,

    /// The private key of --mtls-cert, PEM. Reloaded on change.
    #[arg(long, env = "MESHIAM_MTLS_KEY")]
    pub mtls_key: Option<PathBuf>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "MESHIAM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `info,meshiam::audit=warn`.
    #[arg(long, env = "MESHIAM_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// Cross-field checks clap cannot do. The message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let aud = &self.container_token_audience;
        if aud.is_empty() || aud.len() > 253 || !aud.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(format!(
                "--container-token-audience must be a non-empty audience without spaces, got {aud:?}"
            ));
        }
        let dur = self.session_duration.as_secs();
        let min = if self.allow_short_sessions { 60 } else { 900 };
        if !(min..=43_200).contains(&dur) {
            return Err(format!(
                "--session-duration must be between 900s and 43200s (STS limits), got {dur}s"
            ));
        }
        if self.min_remaining >= self.session_duration {
            return Err(format!(
                "--min-remaining ({}s) must be shorter than --session-duration ({dur}s)",
                self.min_remaining.as_secs()
            ));
        }
        if self.min_remaining + self.refresh_margin >= self.session_duration {
            return Err(format!(
                "--min-remaining + --refresh-margin ({}s) must be shorter than --session-duration ({dur}s), or credentials would always be due for refresh",
                (self.min_remaining + self.refresh_margin).as_secs()
            ));
        }
        if self.pod_source == PodSource::Kube && self.node_name.as_deref().is_none_or(str::is_empty)
        {
            return Err("--pod-source kube needs --node-name (MESHIAM_NODE_NAME, from the downward API spec.nodeName)".into());
        }
        if let Some(b) = &self.base_role_arn {
            BaseArn::parse(b).map_err(|e| format!("--base-role-arn: {e}"))?;
        }
        if self.iam_role_key.trim().is_empty() || self.iam_role_key.contains(char::is_whitespace) {
            return Err(format!(
                "--iam-role-key: {:?} is not an annotation key",
                self.iam_role_key
            ));
        }
        if let Some(r) = &self.default_role {
            let check = RolePolicy::new(PolicyConfig {
                base_arn: BaseArn::parse("arn:aws:iam::000000000000:role/").ok(),
                ..PolicyConfig::default()
            });
            check.resolve_arn(r).map_err(|_| {
                format!("--default-role: {r:?} is not a role name, path/name or role ARN")
            })?;
        }
        if !(self.sts_rate.is_finite() && self.sts_rate > 0.0) {
            return Err("--sts-rate must be a positive number of calls per second".into());
        }
        if self.sts_burst == 0 {
            return Err("--sts-burst must be at least 1".into());
        }
        if self.sts_timeout.is_zero() {
            return Err("--sts-timeout must be positive".into());
        }
        if self.request_wait.is_zero() {
            return Err("--request-wait must be positive".into());
        }
        if self.watch_idle_timeout < Duration::from_secs(3) {
            return Err("--watch-idle-timeout must be at least 3s".into());
        }
        if self.request_timeout <= self.ip_wait {
            return Err("--request-timeout must be longer than --ip-wait".into());
        }
        self.allow_list()?;
        if !self.node_imds_url.starts_with("http://") {
            return Err("--node-imds-url must be an http:// URL".into());
        }
        if self.cluster_name.as_deref().is_some_and(str::is_empty) {
            return Err("--cluster-name must not be empty".into());
        }
        if self.max_concurrency == 0 {
            return Err("--max-concurrency must be at least 1".into());
        }
        if self.header_read_timeout < Duration::from_secs(1) {
            return Err("--header-read-timeout must be at least 1s (the sidecar keeps idle broker connections up to 3s; see docs/broker.md)".into());
        }
        for (name, per_peer, per_peer_flag, total, total_flag) in [
            (
                "connections",
                self.max_connections_per_peer,
                "--max-connections-per-peer",
                self.max_connections,
                "--max-connections",
            ),
            (
                "pod waiters",
                self.max_pod_waiters_per_peer,
                "--max-pod-waiters-per-peer",
                self.max_pod_waiters,
                "--max-pod-waiters",
            ),
        ] {
            if per_peer == 0 || total == 0 {
                return Err(format!(
                    "{per_peer_flag} and {total_flag} must be at least 1 ({name})"
                ));
            }
            if per_peer > total {
                return Err(format!(
                    "{per_peer_flag} ({per_peer}) must not exceed {total_flag} ({total})"
                ));
            }
        }
        if self.mtls != MtlsMode::Off {
            if self.mtls_files().is_none() {
                return Err(format!(
                    "--mtls {} needs --mtls-roots, --mtls-cert and --mtls-key",
                    self.mtls.as_str()
                ));
            }
            let td = self.mtls_trust_domain.as_str();
            if td.is_empty()
                || !td.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
                })
            {
                return Err(format!(
                    "--mtls-trust-domain {td:?} is not a SPIFFE trust domain (lowercase letters, digits, '-', '.', '_')"
                ));
            }
        }
        Ok(())
    }

    /// The TLS material's paths, when all three are given.
    pub fn mtls_files(&self) -> Option<MtlsFiles> {
        Some(MtlsFiles {
            roots: self.mtls_roots.clone()?,
            cert: self.mtls_cert.clone()?,
            key: self.mtls_key.clone()?,
        })
    }

    pub fn policy_config(&self) -> PolicyConfig {
        PolicyConfig {
            base_arn: self
                .base_role_arn
                .as_deref()
                .and_then(|b| BaseArn::parse(b).ok()),
            default_role: self.default_role.clone(),
            restriction: self.namespace_restriction,
            restriction_format: self.namespace_restriction_format,
            strict_permitted: !self.disable_strict_namespace_regexp,
            role_key: self.iam_role_key.clone(),
            session_tags: self.session_tags,
            cluster_name: self.cluster_name.clone(),
            source_identity: self.source_identity,
            duration_secs: self.session_duration.as_secs() as u32,
        }
    }

    pub fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            min_remaining: self.min_remaining,
            refresh_margin: self.refresh_margin,
            sts_timeout: self.sts_timeout,
            request_wait: self.request_wait,
            negative_ttl: self.negative_cache_ttl,
            backoff_base: self.sts_backoff_base,
            backoff_max: self.sts_backoff_max,
            rate_per_sec: self.sts_rate,
            burst: self.sts_burst,
            jitter: self.prefetch_jitter,
            stale_floor: self.stale_floor,
        }
    }

    pub fn serve_config(&self) -> ServeConfig {
        ServeConfig {
            ip_wait: self.ip_wait,
            direct_mode: self.direct_mode,
            // validate() has checked it.
            metadata_allow: self.allow_list().unwrap_or_default(),
            request_timeout: self.request_timeout,
            max_body_bytes: self.max_body_bytes,
            max_concurrency: self.max_concurrency,
            max_staleness: self.max_staleness,
            max_pod_waiters: self.max_pod_waiters,
            max_pod_waiters_per_peer: self.max_pod_waiters_per_peer,
            mtls: MtlsPolicy {
                mode: self.mtls,
                trust_domain: self.mtls_trust_domain.clone(),
            },
        }
    }

    /// `--metadata-allow` parsed by the rule the filter's `allowPaths` follows too; blank
    /// items of the comma-separated list are no entries.
    fn allow_list(&self) -> Result<AllowList, String> {
        let entries: Vec<&str> = self
            .metadata_allow
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .collect();
        AllowList::parse(&entries).map_err(|e| format!("--metadata-allow {e}"))
    }

    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["meshiam-broker"];
        all.extend_from_slice(args);
        let c = Config::try_parse_from(all).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn short_sessions_only_when_asked_for() {
        let e = parse(&[
            "--session-duration",
            "60s",
            "--min-remaining",
            "30s",
            "--refresh-margin",
            "10s",
        ])
        .unwrap_err();
        assert!(e.contains("--session-duration must be between 900s"), "{e}");
        let c = parse(&[
            "--session-duration",
            "60s",
            "--min-remaining",
            "30s",
            "--refresh-margin",
            "10s",
            "--allow-short-sessions",
        ])
        .unwrap();
        assert_eq!(c.session_duration, Duration::from_secs(60));
        assert!(parse(&["--session-duration", "59s", "--allow-short-sessions"]).is_err());
        assert!(
            parse(&["--request-wait", "0s"])
                .unwrap_err()
                .contains("--request-wait")
        );
        assert!(
            parse(&["--watch-idle-timeout", "2s"])
                .unwrap_err()
                .contains("--watch-idle-timeout")
        );
        assert_eq!(
            parse(&["--watch-idle-timeout", "3s"])
                .unwrap()
                .watch_idle_timeout,
            Duration::from_secs(3)
        );
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.session_duration, Duration::from_secs(3600));
        assert_eq!(c.min_remaining, Duration::from_secs(1800));
        assert_eq!(c.ip_wait, Duration::from_secs(2));
        assert_eq!(c.metadata_allow.len(), 2);
        assert!(c.prefetch);
        assert!(!c.session_tags);
        assert_eq!(c.max_staleness, Duration::from_secs(5));
        assert_eq!(c.watch_idle_timeout, Duration::from_secs(60));
        assert!(
            !c.debug_endpoints,
            "debug endpoints are off unless asked for"
        );
        assert!(parse(&["--debug-endpoints"]).unwrap().debug_endpoints);
        assert_eq!(c.direct_mode, DirectMode::Required);
    }

    #[test]
    fn direct_mode_values_and_the_removed_off() {
        assert_eq!(
            parse(&["--direct-mode", "optional"]).unwrap().direct_mode,
            DirectMode::Optional
        );
        assert_eq!(
            parse(&["--direct-mode", "required"]).unwrap().direct_mode,
            DirectMode::Required
        );
        let e = parse(&["--direct-mode", "off"]).unwrap_err();
        assert!(e.contains("--direct-mode"), "{e}");
        assert!(
            e.contains("no longer supported") && e.contains("required"),
            "{e}"
        );
        let e = parse(&["--direct-mode", "sometimes"]).unwrap_err();
        assert!(e.contains("required, optional"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn invalid_settings_fail_with_one_clear_message() {
        let cases: &[(&[&str], &str)] = &[
            (&["--min-remaining", "1h"], "--min-remaining"),
            (&["--session-duration", "100s"], "--session-duration"),
            (&["--pod-source", "kube"], "--node-name"),
            (&["--base-role-arn", "arn:aws:s3:::x"], "--base-role-arn"),
            (&["--default-role", "a b"], "--default-role"),
            (&["--metadata-allow", "meta-data/*"], "--metadata-allow"),
            (
                &["--metadata-allow", "meta-data/iam/info"],
                "--metadata-allow",
            ),
            (
                &["--metadata-allow", "meta-data/identity-credentials/ec2/*"],
                "--metadata-allow",
            ),
            (&["--sts-rate", "0"], "--sts-rate"),
            (&["--ip-wait", "1h"], "--request-timeout"),
            (&["--mtls", "required"], "--mtls-roots"),
            (
                &[
                    "--mtls",
                    "preferred",
                    "--mtls-roots",
                    "/r",
                    "--mtls-cert",
                    "/c",
                    "--mtls-key",
                    "/k",
                    "--mtls-trust-domain",
                    "Bad Domain",
                ],
                "--mtls-trust-domain",
            ),
        ];
        for (args, needle) in cases {
            let e = parse(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        assert!(parse(&["--session-tags", "--prefetch", "false"]).is_ok());
        assert!(parse(&["--metadata-allow", "meta-data/placement/*,dynamic/*"]).is_ok());
    }

    /// The CLI's defaults are the library's defaults: a broker started without flags and
    /// one built in code (tests, embedders) behave alike. Only what the CLI must set
    /// differently is listed.
    #[test]
    fn cli_defaults_equal_the_library_defaults() {
        let c = Config::try_parse_from(["meshiam-broker"]).unwrap();
        assert_eq!(c.serve_config(), ServeConfig::default());
        assert_eq!(c.cache_config(), CacheConfig::default());
        assert_eq!(c.policy_config(), PolicyConfig::default());
        assert_eq!(c.conn_limits(), ConnLimits::default());
        assert_eq!(
            c.metadata_allow,
            crate::DEFAULT_METADATA_ALLOW.map(String::from)
        );
    }
}
