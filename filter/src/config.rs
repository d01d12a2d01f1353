//! Plugin configuration: camelCase JSON, parsed and validated once in `on_configure`.
//!
//! Every field is optional; the defaults are a safe sidecar (IMDSv1 allowed as on EC2,
//! no metadata path beyond the credential paths, identity from Istio's node metadata).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::IpAddr;

use meshiam_imds::AllowList;
use meshiam_imds::json::{self, Value};

pub const DEFAULT_BROKER_CLUSTER: &str = "meshiam_broker";
pub const DEFAULT_BROKER_AUTHORITY: &str = "meshiam-broker";
/// Longer than the broker's default wait for a pod it has not seen yet (`--ip-wait`, 2 s), so
/// a pod that asks the moment it starts is answered. The broker itself answers within
/// `--request-wait` (900 ms) when STS is slow, and a broker that is down fails the call-out
/// at connect; only a hanging broker makes the filter wait this long.
pub const DEFAULT_BROKER_TIMEOUT_MS: u32 = 2500;
/// How long a cached answer is served without asking the broker. Short, so that a role
/// change (annotation edited or removed) reaches the pod within 5 seconds: this plus the
/// broker's watch lag (well under a second) bounds it. A hit still costs no call-out; a pod
/// polling without pause makes one call-out per 3 s per path (BENCHMARKS.md, benchmark 2).
pub const DEFAULT_CACHE_FRESH_SECONDS: u64 = 3;
pub const DEFAULT_STALE_MIN_REMAINING_SECONDS: u64 = 300;
pub const DEFAULT_METADATA_HOSTS: [&str; 2] = ["169.254.169.254", "[fd00:ec2::254]"];
pub const DEFAULT_METADATA_ADDRESSES: [&str; 2] = ["169.254.169.254:80", "[fd00:ec2::254]:80"];
/// The container-credentials door (EKS Pod Identity's addresses, `/v1/credentials`).
pub const DEFAULT_CONTAINER_HOSTS: [&str; 2] = ["169.254.170.23", "[fd00:ec2::23]"];
pub const DEFAULT_CONTAINER_ADDRESSES: [&str; 2] = ["169.254.170.23:80", "[fd00:ec2::23]:80"];

/// Where the filter learns which pod it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// Envoy node metadata `NAMESPACE` and `NAME`, as Istio sets them.
    NodeMetadata,
    /// Fixed in the plugin config.
    Config { namespace: String, name: String },
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub broker_cluster: String,
    pub broker_authority: String,
    pub broker_timeout_ms: u32,
    /// Lowercase hosts without port (`169.254.169.254`, `[fd00:ec2::254]`).
    pub metadata_hosts: Vec<String>,
    /// `address:port` as Envoy's `destination.address` renders it.
    pub metadata_addresses: Vec<String>,
    /// Hosts of the container-credentials door (`169.254.170.23`, `[fd00:ec2::23]`); empty
    /// with `container_addresses` empty: the door is not served.
    pub container_hosts: Vec<String>,
    /// `address:port` of the container-credentials door, as `destination.address` renders it.
    pub container_addresses: Vec<String>,
    pub require_imdsv2: bool,
    pub allow_paths: AllowList,
    pub cache_fresh_seconds: u64,
    pub stale_min_remaining_seconds: u64,
    pub identity: IdentitySource,
    /// The pod's own addresses (`podIps`); `None`: Envoy node metadata `INSTANCE_IPS`.
    pub pod_ips: Option<Vec<IpAddr>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker_cluster: DEFAULT_BROKER_CLUSTER.to_string(),
            broker_authority: DEFAULT_BROKER_AUTHORITY.to_string(),
            broker_timeout_ms: DEFAULT_BROKER_TIMEOUT_MS,
            metadata_hosts: DEFAULT_METADATA_HOSTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            metadata_addresses: DEFAULT_METADATA_ADDRESSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            container_hosts: DEFAULT_CONTAINER_HOSTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            container_addresses: DEFAULT_CONTAINER_ADDRESSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            require_imdsv2: false,
            allow_paths: AllowList::default(),
            cache_fresh_seconds: DEFAULT_CACHE_FRESH_SECONDS,
            stale_min_remaining_seconds: DEFAULT_STALE_MIN_REMAINING_SECONDS,
            identity: IdentitySource::NodeMetadata,
            pod_ips: None,
        }
    }
}

/// Why a configuration was refused: one line, safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid meshiam plugin configuration: {}", self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The fields of the top-level object, taken one by one so unknown ones are refused.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn take(&mut self, name: &str) -> Option<Value> {
        let i = self.0.iter().position(|(k, _)| k == name)?;
        Some(self.0.remove(i).1)
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => err(format!("{name} must be a string, not {}", v.kind())),
        }
    }

    fn bool(&mut self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => err(format!("{name} must be true or false, not {}", v.kind())),
        }
    }

    fn number(&mut self, name: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(Some(n))) if n >= 0 && n as u64 <= max => Ok(Some(n as u64)),
            Some(Value::Number(_)) => err(format!("{name} must be a whole number from 0 to {max}")),
            Some(v) => err(format!("{name} must be a number, not {}", v.kind())),
        }
    }

    fn strings(&mut self, name: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    v => err(format!("{name} must hold strings, not {}", v.kind())),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => err(format!(
                "{name} must be an array of strings, not {}",
                v.kind()
            )),
        }
    }

    fn object(&mut self, name: &str) -> Result<Option<Fields>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Object(f)) => Ok(Some(Fields(f))),
            Some(v) => err(format!("{name} must be an object, not {}", v.kind())),
        }
    }

    /// Refuses whatever was not taken: a misspelt option must not be silently ignored.
    fn finish(self, within: &str) -> Result<(), ConfigError> {
        match self.0.first() {
            None => Ok(()),
            Some((k, _)) => err(format!("unknown field {within}{k:?}")),
        }
    }
}

/// Parses and validates the plugin configuration. Empty input means all defaults.
pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    validate(read(bytes)?)
}

/// The configuration's fields as written, before validation.
struct Raw {
    broker_cluster: Option<String>,
    broker_authority: Option<String>,
    timeout: Option<u64>,
    hosts: Option<Vec<String>>,
    addresses: Option<Vec<String>>,
    container_hosts: Option<Vec<String>>,
    container_addresses: Option<Vec<String>>,
    require_imdsv2: Option<bool>,
    allow: Option<Vec<String>>,
    fresh: Option<u64>,
    stale: Option<u64>,
    pod_ips: Option<Vec<String>>,
    identity: Option<(String, Option<String>, Option<String>)>,
}

// Reading and validating are two functions, not inlined into one: V8's compile of the
// module in every sidecar leaves Envoy's heap as large as its largest functions made it, and
// as one function of 7.6 KB this cost each sidecar 1.7 MiB more (BENCHMARKS.md, benchmark 6).
#[inline(never)]
fn read(bytes: &[u8]) -> Result<Raw, ConfigError> {
    let trimmed = bytes.trim_ascii();
    let mut f = if trimmed.is_empty() {
        Fields(Vec::new())
    } else {
        match json::parse(trimmed).map_err(ConfigError)? {
            Value::Object(fields) => Fields(fields),
            v => {
                return err(format!(
                    "the configuration must be a JSON object, not {}",
                    v.kind()
                ));
            }
        }
    };
    let raw = Raw {
        broker_cluster: f.string("brokerCluster")?,
        broker_authority: f.string("brokerAuthority")?,
        timeout: f.number("brokerTimeoutMs", 60_000)?,
        hosts: f.strings("metadataHosts")?,
        addresses: f.strings("metadataAddresses")?,
        container_hosts: f.strings("containerHosts")?,
        container_addresses: f.strings("containerAddresses")?,
        require_imdsv2: f.bool("requireImdsv2")?,
        allow: f.strings("allowPaths")?,
        fresh: f.number("cacheFreshSeconds", 3600)?,
        stale: f.number("staleMinRemainingSeconds", 43_200)?,
        pod_ips: f.strings("podIps")?,
        identity: match f.object("identity")? {
            None => None,
            Some(mut i) => {
                let source = i.string("source")?;
                let namespace = i.string("namespace")?;
                let name = i.string("name")?;
                i.finish("identity.")?;
                Some((source.unwrap_or_default(), namespace, name))
            }
        },
    };
    f.finish("")?;
    Ok(raw)
}

#[inline(never)]
fn validate(raw: Raw) -> Result<Config, ConfigError> {
    let Raw {
        broker_cluster: raw_broker_cluster,
        broker_authority: raw_broker_authority,
        timeout: raw_timeout,
        hosts: raw_hosts,
        addresses: raw_addresses,
        container_hosts: raw_container_hosts,
        container_addresses: raw_container_addresses,
        require_imdsv2,
        allow: raw_allow,
        fresh: raw_fresh,
        stale: raw_stale,
        pod_ips: raw_pod_ips,
        identity: raw_identity,
    } = raw;
    let d = Config::default();
    let broker_cluster = raw_broker_cluster.unwrap_or(d.broker_cluster);
    if broker_cluster.is_empty() || !is_token(&broker_cluster) {
        return err("brokerCluster must be a non-empty cluster name without spaces");
    }
    let broker_authority = raw_broker_authority.unwrap_or(d.broker_authority);
    if broker_authority.is_empty() || !is_token(&broker_authority) {
        return err("brokerAuthority must be a non-empty host[:port] without spaces");
    }
    let broker_timeout_ms = raw_timeout.map_or(d.broker_timeout_ms, |t| t as u32);
    if broker_timeout_ms == 0 {
        return err("brokerTimeoutMs must be a whole number from 1 to 60000");
    }
    let metadata_hosts = hosts("metadataHosts", raw_hosts.unwrap_or(d.metadata_hosts))?;
    let metadata_addresses = addresses(
        "metadataAddresses",
        raw_addresses.unwrap_or(d.metadata_addresses),
    )?;
    let container_hosts = hosts(
        "containerHosts",
        raw_container_hosts.unwrap_or(d.container_hosts),
    )?;
    let container_addresses = addresses(
        "containerAddresses",
        raw_container_addresses.unwrap_or(d.container_addresses),
    )?;
    // One door per host: a host that were both would answer IMDS paths on the container
    // address, or the other way round.
    if let Some(h) = container_hosts.iter().find(|h| metadata_hosts.contains(h)) {
        return err(format!("{h:?} is in both metadataHosts and containerHosts"));
    }
    if let Some(a) = container_addresses
        .iter()
        .find(|a| metadata_addresses.contains(a))
    {
        return err(format!(
            "{a:?} is in both metadataAddresses and containerAddresses"
        ));
    }
    if metadata_hosts.is_empty() && metadata_addresses.is_empty() {
        return err("metadataHosts and metadataAddresses are both empty: nothing to serve");
    }
    let allow_paths = match raw_allow {
        None => d.allow_paths,
        Some(entries) => match AllowList::parse(&entries) {
            Ok(a) => a,
            Err(e) => return err(format!("allowPaths {e}")),
        },
    };
    let cache_fresh_seconds = raw_fresh.unwrap_or(d.cache_fresh_seconds);
    let stale_min_remaining_seconds = raw_stale.unwrap_or(d.stale_min_remaining_seconds);
    let identity = match raw_identity {
        None => IdentitySource::NodeMetadata,
        Some((source, namespace, name)) => match source.as_str() {
            "nodeMetadata" if namespace.is_none() && name.is_none() => IdentitySource::NodeMetadata,
            "nodeMetadata" => {
                return err("identity.namespace and identity.name need identity.source \"config\"");
            }
            "config" => match (namespace, name) {
                (Some(ns), Some(n)) if is_k8s_name(&ns) && is_k8s_name(&n) => {
                    IdentitySource::Config {
                        namespace: ns,
                        name: n,
                    }
                }
                _ => {
                    return err(
                        "identity source \"config\" needs namespace and name (Kubernetes names)",
                    );
                }
            },
            other => {
                return err(format!(
                    "identity.source {other:?} is not \"nodeMetadata\" or \"config\""
                ));
            }
        },
    };
    let pod_ips = match raw_pod_ips {
        None => None,
        Some(items) => {
            let mut ips = Vec::with_capacity(items.len());
            for item in &items {
                match crate::identity::parse_ip(item) {
                    Some(ip) => ips.push(ip),
                    None => {
                        return err(format!(
                            "podIps entry {item:?} is not an IP address (no port, no prefix)"
                        ));
                    }
                }
            }
            Some(ips)
        }
    };
    Ok(Config {
        broker_cluster,
        broker_authority,
        broker_timeout_ms,
        metadata_hosts,
        metadata_addresses,
        container_hosts,
        container_addresses,
        require_imdsv2: require_imdsv2.unwrap_or(d.require_imdsv2),
        allow_paths,
        cache_fresh_seconds,
        stale_min_remaining_seconds,
        identity,
        pod_ips,
    })
}

/// Header-safe, no whitespace.
/// Hosts without port (`:80` allowed), lowercased.
fn hosts(field: &str, raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for h in raw {
        match crate::identity::authority_host(&h.to_ascii_lowercase()) {
            // An IPv6 literal is kept in the one form the filter compares (identity.rs).
            Some(host) if !host.is_empty() && is_token(host) => {
                out.push(crate::identity::canonical_host(host).unwrap_or_else(|| host.to_string()))
            }
            _ => return err(format!("{field} entry {h:?} is not a host (port 80 only)")),
        }
    }
    Ok(out)
}

/// `address:port` entries.
fn addresses(field: &str, mut raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for a in &mut raw {
        if a.is_empty() || !is_token(a) || !a.contains(':') {
            return err(format!("{field} entry {a:?} is not address:port"));
        }
        // As Envoy renders destination.address, so `[FD00:EC2:0::254]:80` matches too.
        if let Some(c) = crate::identity::canonical_address(a) {
            *a = c;
        }
    }
    Ok(raw)
}

fn is_token(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_graphic())
}

/// A Kubernetes object name: lowercase alphanumerics, `-` and `.`, at most 253 characters.
pub fn is_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(json: &str) -> String {
        match parse(json.as_bytes()) {
            Ok(c) => panic!("accepted {json}: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_config_is_all_defaults() {
        assert_eq!(parse(b""), Ok(Config::default()));
        assert_eq!(parse(b" {} "), Ok(Config::default()));
        let d = Config::default();
        assert_eq!(d.metadata_hosts, ["169.254.169.254", "[fd00:ec2::254]"]);
        assert_eq!(d.cache_fresh_seconds, 3);
        assert_eq!(d.stale_min_remaining_seconds, 300);
        assert!(!d.require_imdsv2);
        assert!(d.allow_paths.is_empty());
    }

    #[test]
    fn ipv6_metadata_hosts_and_addresses_are_kept_in_one_spelling() {
        let c = parse(
            br#"{"metadataHosts":["[FD00:EC2:0::254]:80","[FD00:EC2::0:abcd]"],
                "metadataAddresses":["[FD00:EC2:0:0:0:0:0:254]:80","[::ffff:169.254.169.254]:80"]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.metadata_hosts, ["[fd00:ec2::254]", "[fd00:ec2::abcd]"]);
        assert_eq!(
            c.metadata_addresses,
            ["[fd00:ec2::254]:80", "169.254.169.254:80"]
        );
    }

    #[test]
    fn full_config_is_read() {
        let c = parse(
            br#"{"brokerCluster":"b","brokerAuthority":"broker:8080","brokerTimeoutMs":250,
                "metadataHosts":["169.254.169.254:80","Metadata.Local"],"metadataAddresses":[],
                "requireImdsv2":true,"allowPaths":["meta-data/placement/*"],
                "cacheFreshSeconds":0,"staleMinRemainingSeconds":600,
                "identity":{"source":"config","namespace":"default","name":"myapp-1"},
                "podIps":["10.1.2.3","FD00::1","::ffff:10.1.2.4"]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.broker_cluster, "b");
        assert_eq!(c.broker_timeout_ms, 250);
        assert_eq!(c.metadata_hosts, ["169.254.169.254", "metadata.local"]);
        assert!(c.metadata_addresses.is_empty());
        assert!(c.require_imdsv2);
        assert_eq!(c.cache_fresh_seconds, 0);
        let ips: Vec<String> = c
            .pod_ips
            .iter()
            .flatten()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ips, ["10.1.2.3", "fd00::1", "10.1.2.4"]);
        assert_eq!(
            parse(br#"{"podIps":[]}"#).map(|c| c.pod_ips),
            Ok(Some(vec![]))
        );
        assert_eq!(
            c.identity,
            IdentitySource::Config {
                namespace: "default".into(),
                name: "myapp-1".into()
            }
        );
    }

    #[test]
    fn validation_errors_are_one_clear_line() {
        for (json, needle) in [
            ("{", "JSON error"),
            ("[]", "must be a JSON object, not an array"),
            (r#"{"brokerCluter":"x"}"#, "unknown field \"brokerCluter\""),
            (
                r#"{"brokerTimeoutMs":"800"}"#,
                "brokerTimeoutMs must be a number, not a string",
            ),
            (r#"{"brokerTimeoutMs":0}"#, "brokerTimeoutMs"),
            (r#"{"brokerTimeoutMs":-5}"#, "whole number from 0 to 60000"),
            (r#"{"brokerTimeoutMs":1.5}"#, "whole number"),
            (r#"{"requireImdsv2":"yes"}"#, "true or false"),
            (r#"{"metadataHosts":"169.254.169.254"}"#, "array of strings"),
            (r#"{"metadataHosts":[1]}"#, "must hold strings"),
            (
                r#"{"identity":{"source":"config","namespace":"a","name":"b","x":1}}"#,
                "unknown field identity.\"x\"",
            ),
            (r#"{"brokerCluster":""}"#, "brokerCluster"),
            (r#"{"brokerAuthority":"a b"}"#, "brokerAuthority"),
            (
                r#"{"metadataHosts":["169.254.169.254:8080"]}"#,
                "metadataHosts",
            ),
            (r#"{"metadataAddresses":["nope"]}"#, "metadataAddresses"),
            (
                r#"{"metadataHosts":[],"metadataAddresses":[]}"#,
                "both empty",
            ),
            (r#"{"allowPaths":["meta-data/iam/*"]}"#, "meta-data/iam"),
            (r#"{"allowPaths":["meta-data/*"]}"#, "meta-data/iam"),
            (r#"{"allowPaths":["*"]}"#, "covers"),
            // The broker refuses this entry too; the filter accepted it before they shared
            // one rule (issue 12).
            (
                r#"{"allowPaths":["meta-data/identity-credentials/*"]}"#,
                "covers meta-data/identity-credentials",
            ),
            (r#"{"allowPaths":["meta-data/../iam"]}"#, "allowPaths"),
            (r#"{"allowPaths":["a*b"]}"#, "allowPaths"),
            (r#"{"allowPaths":[""]}"#, "allowPaths"),
            (
                r#"{"cacheFreshSeconds":3601}"#,
                "cacheFreshSeconds must be a whole number from 0 to 3600",
            ),
            (
                r#"{"staleMinRemainingSeconds":99999}"#,
                "staleMinRemainingSeconds",
            ),
            (r#"{"identity":{"source":"pod"}}"#, "identity.source"),
            (
                r#"{"podIps":"10.0.0.1"}"#,
                "podIps must be an array of strings",
            ),
            (
                r#"{"podIps":["10.0.0.1:80"]}"#,
                "podIps entry \"10.0.0.1:80\"",
            ),
            (r#"{"podIps":["10.0.0.0/24"]}"#, "not an IP address"),
            (r#"{"podIps":[""]}"#, "podIps"),
            (
                r#"{"identity":{"source":"config","name":"a"}}"#,
                "namespace and name",
            ),
            (
                r#"{"identity":{"source":"config","namespace":"A","name":"a"}}"#,
                "namespace",
            ),
            (
                r#"{"identity":{"source":"nodeMetadata","name":"a"}}"#,
                "config",
            ),
        ] {
            let e = bad(json);
            assert!(
                e.starts_with("invalid meshiam plugin configuration: "),
                "{e}"
            );
            assert!(e.contains(needle), "{json}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn allow_paths_for_region_discovery_are_fine() {
        let c = parse(
            br#"{"allowPaths":["meta-data/placement/region","/meta-data/placement/availability-zone"]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.allow_paths.len(), 2);
    }
}
