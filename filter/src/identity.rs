//! Which traffic is metadata traffic, which pod this sidecar serves, and whether a
//! connection began in that pod.

use alloc::string::String;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use meshiam_imds::headers::FORWARDED_FOR;

use crate::config::{Config, IdentitySource, is_k8s_name};
use crate::host::{Host, Level};

/// Envoy node metadata key holding the pod's addresses, comma-separated, as Istio sets it.
pub const INSTANCE_IPS: &str = "INSTANCE_IPS";

/// The source Istio's inbound passthrough binds to when it hands a connection from outside
/// the pod to the application: a loopback address that does not stand for the pod itself.
const ISTIO_INBOUND_PASSTHROUGH: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// The host part of an authority whose port is absent or 80; `None` for any other port.
/// IPv6 literals keep their brackets (`[fd00:ec2::254]`).
pub fn authority_host(authority: &str) -> Option<&str> {
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        return matches!(rest, "" | ":80").then_some(host);
    }
    match authority.rsplit_once(':') {
        None => Some(authority),
        Some((host, "80")) if !host.contains(':') => Some(host),
        Some(_) => None,
    }
}

/// A bracketed IPv6 host in the one form the filter compares: RFC 5952 text
/// (`[FD00:EC2:0:0:0:0:0:254]` → `[fd00:ec2::254]`), an IPv4-mapped address as its IPv4
/// address (`[::ffff:169.254.169.254]` → `169.254.169.254`). `None` for anything else
/// (names, IPv4, zones), which is compared as written.
pub fn canonical_host(host: &str) -> Option<String> {
    let ip: Ipv6Addr = host.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?;
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => alloc::format!("[{ip}]"),
    })
}

/// An `address:port` in the form Envoy renders `destination.address` (`[fd00:ec2::254]:80`,
/// IPv4-mapped as IPv4); `None` when it is not one.
pub fn canonical_address(s: &str) -> Option<String> {
    let a: SocketAddr = s.parse().ok()?;
    Some(SocketAddr::new(a.ip().to_canonical(), a.port()).to_string())
}

/// Which metadata door a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// The instance-metadata service (`169.254.169.254`, `[fd00:ec2::254]`).
    Imds,
    /// The container-credentials endpoint (`169.254.170.23`, `[fd00:ec2::23]`).
    Container,
}

/// True when the request is addressed to the instance-metadata service or the
/// container-credentials endpoint.
pub fn is_metadata_request<H: Host>(h: &H, cfg: &Config) -> bool {
    door(h, cfg).is_some()
}

/// The door a request is addressed to, if any.
///
/// Cheap on the common path: the `:authority` is checked first (the host an SDK or curl
/// writes), and the original destination is read only when the authority did not match, to
/// catch clients that send some other `Host` to a metadata address.
pub fn door<H: Host>(h: &H, cfg: &Config) -> Option<Door> {
    if let Some(authority) = h.request_header(":authority") {
        let lower = authority.to_ascii_lowercase();
        if let Some(host) = authority_host(&lower) {
            // An IPv6 literal in any spelling is compared in its canonical form.
            let canonical = canonical_host(host);
            let listed = |list: &[String]| {
                list.iter()
                    .any(|m| m == host || canonical.as_deref() == Some(m.as_str()))
            };
            if listed(&cfg.metadata_hosts) {
                return Some(Door::Imds);
            }
            if listed(&cfg.container_hosts) {
                return Some(Door::Container);
            }
        }
    }
    if cfg.metadata_addresses.is_empty() && cfg.container_addresses.is_empty() {
        return None;
    }
    let by_address = |addr: &[u8]| {
        if cfg.metadata_addresses.iter().any(|a| a.as_bytes() == addr) {
            Some(Door::Imds)
        } else if cfg.container_addresses.iter().any(|a| a.as_bytes() == addr) {
            Some(Door::Container)
        } else {
            None
        }
    };
    // An ORIGINAL_DST cluster configured to route by header would send the request to the
    // address named there, in whatever spelling Envoy can parse: treat that address like the
    // connection's own destination.
    if let Some(dst) = h.request_header("x-envoy-original-dst-host")
        && let Some(d) = by_address(dst.as_bytes())
            .or_else(|| canonical_address(&dst).and_then(|c| by_address(c.as_bytes())))
    {
        return Some(d);
    }
    by_address(&h.property(&["destination", "address"])?)
}

/// An IP literal without port, prefix or zone; an IPv4-mapped IPv6 address as IPv4.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// The IP of an `address:port` as Envoy renders `source.address` (`10.0.0.1:5`, `[::1]:5`).
pub fn socket_ip(s: &str) -> Option<IpAddr> {
    s.parse::<SocketAddr>().ok().map(|a| a.ip().to_canonical())
}

/// Why a metadata request is not answered: its connection is not known to have begun in
/// this pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRefusal {
    /// No `source.address`, or one that is not an IP address and port.
    Unknown,
    /// `X-Forwarded-For` names the source (or holds something that is not an address): an
    /// HTTP connection manager with `use_remote_address: false` takes the downstream address
    /// from that header, so the source may be the caller's own claim.
    Forwarded,
    /// Not loopback, and the pod's own addresses are not known (no `podIps`, no
    /// `INSTANCE_IPS`).
    PodIpsUnknown,
    /// Neither loopback nor one of the pod's own addresses.
    NotPod,
}

impl SourceRefusal {
    /// The reason code, sent in `x-meshiam-reason` and logged.
    pub fn reason(self) -> &'static str {
        match self {
            SourceRefusal::Unknown => "source-unknown",
            SourceRefusal::Forwarded => "source-forwarded",
            SourceRefusal::PodIpsUnknown => "pod-ips-unknown",
            SourceRefusal::NotPod => "source-not-pod",
        }
    }
}

/// The pod's own addresses: `podIps` from the plugin config, else Envoy node metadata
/// `INSTANCE_IPS`. `None` when neither names any; entries that are not addresses are
/// skipped with a warning.
pub fn resolve_pod_ips<H: Host>(h: &H, cfg: &Config) -> Option<Vec<IpAddr>> {
    if let Some(ips) = &cfg.pod_ips {
        return Some(ips.clone());
    }
    let raw = h.property(&["xds", "node", "metadata", INSTANCE_IPS])?;
    let mut ips = Vec::new();
    let mut bad = 0usize;
    for item in String::from_utf8_lossy(&raw).split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        match parse_ip(item) {
            Some(ip) => ips.push(ip),
            None => bad += 1,
        }
    }
    if bad > 0 {
        h.log(
            Level::Warn,
            &alloc::format!(
                "meshiam: node metadata {INSTANCE_IPS} has {bad} entries that are not IP \
                 addresses; ignored"
            ),
        );
    }
    (!ips.is_empty()).then_some(ips)
}

/// Whether the current request's connection began in this pod: its source is loopback (but
/// not Istio's inbound passthrough address `127.0.0.6`) or one of `pod_ips`, and cannot have
/// been taken from `X-Forwarded-For`. Reads `source.address` and, only when the request has
/// one, the `X-Forwarded-For` header. Returns the source, or why not and the source if known.
pub fn check_source<H: Host>(
    h: &H,
    pod_ips: Option<&[IpAddr]>,
) -> Result<IpAddr, (SourceRefusal, Option<IpAddr>)> {
    let ip = h
        .property(&["source", "address"])
        .and_then(|raw| core::str::from_utf8(&raw).ok().and_then(socket_ip))
        .ok_or((SourceRefusal::Unknown, None))?;
    if let Some(xff) = h.request_header(FORWARDED_FOR)
        && forwarded_may_name(&xff, ip)
    {
        return Err((SourceRefusal::Forwarded, Some(ip)));
    }
    if is_own_loopback(ip) || pod_ips.is_some_and(|ips| ips.contains(&ip)) {
        return Ok(ip);
    }
    let why = match pod_ips {
        None => SourceRefusal::PodIpsUnknown,
        Some(_) => SourceRefusal::NotPod,
    };
    Err((why, Some(ip)))
}

fn is_own_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() && v4 != ISTIO_INBOUND_PASSTHROUGH,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// True when Envoy may have taken `ip` from this `X-Forwarded-For` value: an entry equal to
/// it, or one this parser cannot read (so it cannot tell).
fn forwarded_may_name(xff: &str, ip: IpAddr) -> bool {
    xff.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| parse_ip(e).or_else(|| socket_ip(e)).is_none_or(|x| x == ip))
}

/// The pod this sidecar serves, as far as it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Identity {
    pub fn is_complete(&self) -> bool {
        self.namespace.is_some() && self.name.is_some()
    }

    /// What IMDSv2 tokens are bound to: `namespace/name` (empty when unknown; the per-sidecar
    /// secret still keeps tokens to this pod).
    pub fn binding(&self) -> String {
        let mut b = String::new();
        if let (Some(ns), Some(n)) = (&self.namespace, &self.name) {
            b.push_str(ns);
            b.push('/');
            b.push_str(n);
        }
        b
    }
}

/// Reads the identity from the configured source. Values that are not Kubernetes names are
/// ignored (with a warning) rather than sent to the broker.
pub fn resolve<H: Host>(h: &H, cfg: &Config) -> Identity {
    match &cfg.identity {
        IdentitySource::Config { namespace, name } => Identity {
            namespace: Some(namespace.clone()),
            name: Some(name.clone()),
        },
        IdentitySource::NodeMetadata => Identity {
            namespace: node_metadata(h, "NAMESPACE"),
            name: node_metadata(h, "NAME"),
        },
    }
}

fn node_metadata<H: Host>(h: &H, key: &str) -> Option<String> {
    let raw = h.property(&["xds", "node", "metadata", key])?;
    match String::from_utf8(raw) {
        Ok(v) if is_k8s_name(&v) => Some(v),
        _ => {
            h.log(
                Level::Warn,
                &alloc::format!("meshiam: node metadata {key} is not a Kubernetes name; ignored"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockHost;

    #[test]
    fn authority_hosts() {
        assert_eq!(authority_host("169.254.169.254"), Some("169.254.169.254"));
        assert_eq!(
            authority_host("169.254.169.254:80"),
            Some("169.254.169.254")
        );
        assert_eq!(authority_host("169.254.169.254:8080"), None);
        assert_eq!(authority_host("[fd00:ec2::254]"), Some("[fd00:ec2::254]"));
        assert_eq!(
            authority_host("[fd00:ec2::254]:80"),
            Some("[fd00:ec2::254]")
        );
        assert_eq!(authority_host("[fd00:ec2::80]"), Some("[fd00:ec2::80]"));
        assert_eq!(authority_host("[fd00:ec2::254]:81"), None);
        assert_eq!(authority_host("fd00:ec2::254"), None);
    }

    #[test]
    fn recognises_metadata_by_authority_without_reading_the_destination() {
        let cfg = Config::default();
        for a in [
            "169.254.169.254",
            "169.254.169.254:80",
            "[FD00:EC2::254]:80",
        ] {
            let h = MockHost::new().header(":authority", a);
            assert!(is_metadata_request(&h, &cfg), "{a}");
            assert_eq!(h.property_reads(), 0, "{a}");
        }
    }

    #[test]
    fn recognises_every_spelling_of_an_ipv6_metadata_host() {
        let cfg = Config::default();
        for a in [
            "[fd00:ec2::254]",
            "[fd00:ec2::254]:80",
            "[FD00:EC2::254]",
            "[fd00:ec2:0:0:0:0:0:254]",
            "[fd00:0ec2:0000::0254]:80",
            "[::ffff:169.254.169.254]",
            "[::ffff:a9fe:a9fe]:80",
        ] {
            let h = MockHost::new().header(":authority", a);
            assert!(is_metadata_request(&h, &cfg), "{a}");
            assert_eq!(h.property_reads(), 0, "{a}");
        }
        // Not IMDS, another port, a zone, not an address: left to the destination check.
        for a in [
            "[fd00:ec2::253]",
            "[fd00:ec2::254]:8080",
            "[fe80::254%25eth0]",
            "[fd00:ec2::254",
            "[metadata]",
        ] {
            let h = MockHost::new().header(":authority", a);
            assert!(!is_metadata_request(&h, &cfg), "{a}");
        }
        assert_eq!(
            canonical_host("[FD00:EC2::0254]").as_deref(),
            Some("[fd00:ec2::254]")
        );
        assert_eq!(canonical_host("169.254.169.254"), None);
    }

    #[test]
    fn recognises_metadata_by_original_destination() {
        let cfg = Config::default();
        let h = MockHost::new()
            .header(":authority", "metadata.example")
            .property(&["destination", "address"], "169.254.169.254:80");
        assert!(is_metadata_request(&h, &cfg));
        let h = MockHost::new()
            .header(":authority", "x")
            .property(&["destination", "address"], "[fd00:ec2::254]:80");
        assert!(is_metadata_request(&h, &cfg));
        let h = MockHost::new()
            .header(":authority", "x")
            .header("x-envoy-original-dst-host", "169.254.169.254:80");
        assert!(is_metadata_request(&h, &cfg));
        for dst in ["[FD00:EC2:0::254]:80", "[::ffff:169.254.169.254]:80"] {
            let h = MockHost::new()
                .header(":authority", "x")
                .header("x-envoy-original-dst-host", dst);
            assert!(is_metadata_request(&h, &cfg), "{dst}");
        }
    }

    #[test]
    fn other_traffic_is_not_metadata() {
        let cfg = Config::default();
        let h = MockHost::new()
            .header(":authority", "example.com")
            .property(&["destination", "address"], "93.184.216.34:80");
        assert!(!is_metadata_request(&h, &cfg));
        let h = MockHost::new()
            .header(":authority", "169.254.169.254:8080")
            .property(&["destination", "address"], "169.254.169.254:8080");
        assert!(!is_metadata_request(&h, &cfg));
    }

    fn source(addr: &str) -> MockHost {
        MockHost::new().property(&["source", "address"], addr)
    }

    #[test]
    fn loopback_and_the_pods_own_addresses_are_the_pod() {
        let pod: [IpAddr; 2] = [
            IpAddr::from([10, 1, 0, 7]),
            "fd00::7".parse().unwrap_or_else(|e| panic!("{e}")),
        ];
        for addr in [
            "127.0.0.1:40000",
            "127.9.9.9:1",
            "[::1]:40000",
            "[::ffff:127.0.0.1]:5",
            "10.1.0.7:40000",
            "[::ffff:10.1.0.7]:40000",
            "[fd00::7]:80",
        ] {
            let h = source(addr);
            assert!(check_source(&h, Some(&pod)).is_ok(), "{addr}");
            assert_eq!(h.property_reads(), 1, "{addr}");
        }
        // Loopback needs no list.
        assert!(check_source(&source("127.0.0.1:1"), None).is_ok());
        assert!(check_source(&source("127.0.0.1:1"), Some(&[])).is_ok());
    }

    #[test]
    fn any_other_source_is_refused_with_its_reason() {
        let pod = [IpAddr::from([10, 1, 0, 7])];
        let foreign = Some(IpAddr::from([10, 1, 0, 8]));
        assert_eq!(
            check_source(&source("10.1.0.8:40000"), Some(&pod)),
            Err((SourceRefusal::NotPod, foreign))
        );
        assert_eq!(
            check_source(&source("10.1.0.8:40000"), None),
            Err((SourceRefusal::PodIpsUnknown, foreign))
        );
        assert_eq!(
            check_source(&source("10.1.0.7:1"), Some(&[])),
            Err((SourceRefusal::NotPod, Some(pod[0])))
        );
        // Istio's inbound passthrough: loopback, but a connection from outside the pod.
        for addr in ["127.0.0.6:40000", "[::ffff:127.0.0.6]:1"] {
            assert_eq!(
                check_source(&source(addr), Some(&pod)).map_err(|e| e.0),
                Err(SourceRefusal::NotPod),
                "{addr}"
            );
        }
        for addr in [
            "",
            "10.1.0.7",
            "envoy://internal",
            "[10.1.0.7]:80",
            "pipe:/x",
            "\u{ff}",
        ] {
            assert_eq!(
                check_source(&source(addr), Some(&pod)),
                Err((SourceRefusal::Unknown, None)),
                "{addr:?}"
            );
        }
        assert_eq!(
            check_source(&MockHost::new(), Some(&pod)),
            Err((SourceRefusal::Unknown, None))
        );
    }

    #[test]
    fn a_source_x_forwarded_for_may_have_named_is_refused() {
        let pod = [IpAddr::from([10, 1, 0, 7])];
        let refused = |xff: &str, addr: &str| {
            let h = source(addr).header("x-forwarded-for", xff);
            check_source(&h, Some(&pod)).map_err(|e| e.0)
        };
        let forwarded = Err(SourceRefusal::Forwarded);
        assert_eq!(refused("127.0.0.1", "127.0.0.1:0"), forwarded);
        assert_eq!(refused("192.0.2.1, 10.1.0.7", "10.1.0.7:0"), forwarded);
        assert_eq!(refused("10.1.0.7:1234", "10.1.0.7:0"), forwarded);
        assert_eq!(refused("0:0::1", "[::1]:0"), forwarded);
        assert_eq!(refused("::ffff:127.0.0.1", "127.0.0.1:0"), forwarded);
        assert_eq!(refused("not-an-address", "127.0.0.1:5"), forwarded);
        assert_eq!(refused("fe80::1%eth0", "127.0.0.1:5"), forwarded);
        // The connection's own source (use_remote_address: true) and another address named:
        // the header did not make the source.
        assert!(refused("192.0.2.1", "127.0.0.1:5").is_ok());
        assert!(refused(" , 192.0.2.1 ,", "10.1.0.7:5").is_ok());
        assert_eq!(
            refused("192.0.2.1", "192.0.2.9:5"),
            Err(SourceRefusal::NotPod)
        );
    }

    #[test]
    fn dual_stack_sources_and_forwarded_for_over_ipv6() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
        let pod = [IpAddr::from([10, 1, 0, 7]), v6("fd00:198:18::7")];
        let check = |xff: Option<&str>, addr: &str| {
            let mut h = source(addr);
            if let Some(x) = xff {
                h = h.header("x-forwarded-for", x);
            }
            check_source(&h, Some(&pod)).map_err(|e| e.0)
        };
        // Either address of the pod is the pod, in any spelling Envoy may render.
        assert_eq!(check(None, "[fd00:198:18::7]:4000"), Ok(pod[1]));
        assert_eq!(check(None, "[fd00:198:18:0:0:0:0:7]:4000"), Ok(pod[1]));
        assert_eq!(check(None, "10.1.0.7:4000"), Ok(pod[0]));
        assert_eq!(check(None, "[::ffff:10.1.0.7]:4000"), Ok(pod[0]));
        assert_eq!(
            check(None, "[fd00:198:18::8]:4000"),
            Err(SourceRefusal::NotPod)
        );
        // X-Forwarded-For naming the IPv6 source, however written: refused.
        let forwarded = Err(SourceRefusal::Forwarded);
        for xff in [
            "fd00:198:18::7",
            "FD00:198:18:0::7",
            "[fd00:198:18::7]:80",
            "192.0.2.1, fd00:198:18::7",
            "[fd00:198:18::7]",
        ] {
            assert_eq!(check(Some(xff), "[fd00:198:18::7]:5"), forwarded, "{xff}");
        }
        // Another address named: the header did not make the source.
        assert_eq!(
            check(Some("fd00:198:18::8"), "[fd00:198:18::7]:5"),
            Ok(pod[1])
        );
        assert_eq!(check(Some("10.1.0.7"), "[fd00:198:18::7]:5"), Ok(pod[1]));
    }

    #[test]
    fn pod_ips_from_config_or_instance_ips() {
        let cfg = Config::default();
        let key = ["xds", "node", "metadata", "INSTANCE_IPS"];
        let h = MockHost::new().property(&key, "10.1.0.7, fd00::7,,");
        let ips = resolve_pod_ips(&h, &cfg).unwrap_or_default();
        assert_eq!(
            ips,
            [
                IpAddr::from([10, 1, 0, 7]),
                "fd00::7".parse().unwrap_or_else(|e| panic!("{e}"))
            ]
        );
        assert!(h.logs.borrow().is_empty());
        let h = MockHost::new().property(&key, "10.1.0.7,@POD_IPS@");
        assert_eq!(
            resolve_pod_ips(&h, &cfg),
            Some(vec![IpAddr::from([10, 1, 0, 7])])
        );
        assert!(h.logs.borrow().iter().any(|(_, m)| m.contains("1 entries")));
        for raw in ["", " , ", "@POD_IPS@"] {
            let h = MockHost::new().property(&key, raw);
            assert_eq!(resolve_pod_ips(&h, &cfg), None, "{raw:?}");
        }
        assert_eq!(resolve_pod_ips(&MockHost::new(), &cfg), None);
        let cfg = Config {
            pod_ips: Some(vec![IpAddr::from([10, 9, 9, 9])]),
            ..Config::default()
        };
        let h = MockHost::new().property(&key, "10.1.0.7");
        assert_eq!(
            resolve_pod_ips(&h, &cfg),
            Some(vec![IpAddr::from([10, 9, 9, 9])])
        );
        assert_eq!(h.property_reads(), 0);
    }

    #[test]
    fn identity_from_node_metadata_or_config() {
        let cfg = Config::default();
        let h = MockHost::new()
            .property(&["xds", "node", "metadata", "NAMESPACE"], "default")
            .property(&["xds", "node", "metadata", "NAME"], "myapp-1");
        let id = resolve(&h, &cfg);
        assert_eq!(id.binding(), "default/myapp-1");
        assert!(id.is_complete());
        let h = MockHost::new().property(&["xds", "node", "metadata", "NAME"], "Bad Name");
        let id = resolve(&h, &cfg);
        assert_eq!(id, Identity::default());
        assert_eq!(id.binding(), "");
        let cfg = Config {
            identity: IdentitySource::Config {
                namespace: "ns".into(),
                name: "p".into(),
            },
            ..Config::default()
        };
        assert_eq!(resolve(&MockHost::new(), &cfg).binding(), "ns/p");
    }
}
