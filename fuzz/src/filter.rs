//! Checks for the filter's plugin configuration (`meshiam_filter::config::parse`), which
//! Envoy hands over from whatever the operator (or a compromised control plane) wrote.
//! Self-contained, so `filter/tests/fuzz_corpus.rs` includes this file as is.

use meshiam_filter::config::parse;

/// Never panics; a refusal is one printable line; the answer does not depend on surrounding
/// whitespace; what is accepted is internally consistent.
pub fn config(data: &[u8]) {
    let first = parse(data);
    assert_eq!(parse(data), first, "parse is not deterministic");
    let mut padded = b" \n".to_vec();
    padded.extend_from_slice(data);
    padded.extend_from_slice(b"\t ");
    assert_eq!(
        parse(&padded),
        first,
        "surrounding whitespace changed the answer"
    );
    match first {
        Err(e) => {
            assert!(!e.0.is_empty());
            assert!(
                !e.0.contains('\n') && !e.0.contains('\r'),
                "multi-line error {:?}",
                e.0
            );
        }
        Ok(cfg) => {
            assert!(!cfg.broker_cluster.is_empty());
            assert!(!cfg.broker_authority.is_empty());
            assert!(cfg.broker_timeout_ms > 0);
            assert!(!cfg.metadata_hosts.is_empty() || !cfg.metadata_addresses.is_empty());
            for h in &cfg.metadata_hosts {
                assert_eq!(h, &h.to_ascii_lowercase(), "host {h:?} not lowercase");
                assert!(
                    !h.contains(':') || h.starts_with('['),
                    "host {h:?} has a port"
                );
            }
            for p in cfg.allow_paths.entries() {
                assert!(
                    !p.split('/').any(|seg| seg == ".." || seg == "."),
                    "allow path {p:?}"
                );
            }
            // No allow-list entry ever lets a credential or token path through to the node.
            for rel in [
                "meta-data/iam/info",
                "meta-data/iam/security-credentials/some-role",
                "meta-data/iam/security-credentials",
                "api/token",
            ] {
                assert!(
                    !cfg.allow_paths.allows(rel),
                    "{rel} allowed by {:?}",
                    cfg.allow_paths
                );
            }
        }
    }
}
