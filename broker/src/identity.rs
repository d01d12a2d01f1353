//! Who is calling: the TCP source address, mapped to a pod on this node. The identity a
//! filter claims in its call-out is a cross-check only.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use meshiam_imds::headers;

use crate::error::BrokerError;
use crate::pods::{IpLookup, Pod, PodStore, canonical};

/// The pod at `ip`, waiting up to `wait` for a pod the store has not seen yet (a pod that
/// asks the moment it starts: kube2iam#136, kiam#293).
pub async fn identify(
    store: &PodStore,
    ip: IpAddr,
    wait: Duration,
) -> Result<Arc<Pod>, BrokerError> {
    let ip = canonical(ip);
    match store.wait_for_ip(ip, wait).await {
        IpLookup::Pod(pod) => Ok(pod),
        IpLookup::Unknown => Err(BrokerError::UnknownPod(ip)),
        IpLookup::HostNetwork => Err(BrokerError::HostNetwork(ip)),
        IpLookup::Ambiguous(keys) => Err(BrokerError::AmbiguousIp {
            ip,
            pods: keys
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Refuses when the call-out names a different pod than the one at the caller's address.
/// Absent headers claim nothing.
pub fn cross_check(pod: &Pod, headers_in: &HeaderMap) -> Result<(), BrokerError> {
    let claimed = |name: &str| {
        headers_in
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not UTF-8>").to_string())
    };
    let ns = claimed(headers::POD_NAMESPACE);
    let name = claimed(headers::POD_NAME);
    let ns_ok = ns.as_deref().is_none_or(|n| n == pod.namespace);
    let name_ok = name.as_deref().is_none_or(|n| n == pod.name);
    if ns_ok && name_ok {
        return Ok(());
    }
    Err(BrokerError::IdentityMismatch {
        claimed: format!(
            "{}/{}",
            ns.as_deref().unwrap_or("?"),
            name.as_deref().unwrap_or("?")
        ),
        actual: pod.key().to_string(),
    })
}
