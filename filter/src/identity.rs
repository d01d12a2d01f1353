//! Which traffic is metadata traffic, and which pod this sidecar serves.

use alloc::string::String;

use crate::config::{Config, IdentitySource, is_k8s_name};
use crate::host::{Host, Level};

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

/// True when the request is addressed to the instance-metadata service.
///
/// Cheap on the common path: the `:authority` is checked first (the host an SDK or curl
/// writes for IMDS), and the original destination is read only when the authority did not
/// match, to catch clients that send some other `Host` to 169.254.169.254.
pub fn is_metadata_request<H: Host>(h: &H, cfg: &Config) -> bool {
    if let Some(authority) = h.request_header(":authority") {
        let lower = authority.to_ascii_lowercase();
        if let Some(host) = authority_host(&lower)
            && cfg.metadata_hosts.iter().any(|m| m == host)
        {
            return true;
        }
    }
    if cfg.metadata_addresses.is_empty() {
        return false;
    }
    // An ORIGINAL_DST cluster configured to route by header would send the request to the
    // address named there: treat that address like the connection's own destination.
    if let Some(dst) = h.request_header("x-envoy-original-dst-host")
        && cfg.metadata_addresses.contains(&dst)
    {
        return true;
    }
    match h.property(&["destination", "address"]) {
        Some(addr) => cfg.metadata_addresses.iter().any(|a| a.as_bytes() == addr),
        None => false,
    }
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
