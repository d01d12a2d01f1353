//! Who is calling: the TCP source address, mapped to a pod on this node. The identity a
//! filter claims in its call-out is a cross-check only.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};

use crate::error::BrokerError;
use crate::imds::names;
use crate::limits::{PeerLimiter, Permit};
use crate::metrics::Metrics;
use crate::pods::{IpLookup, Pod, PodStore, canonical};

/// The slots for requests that wait for an unknown address (`--max-pod-waiters`,
/// `--max-pod-waiters-per-peer`). Waiting costs a task and a timer, nothing shared: a known
/// pod's request never queues behind these. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Waiters {
    slots: PeerLimiter,
    metrics: Metrics,
}

/// One waiting request; dropping it frees the slot.
struct WaitSlot {
    permit: Option<Permit>,
    waiters: Waiters,
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.waiters
            .metrics
            .set_pod_waiters(self.waiters.slots.in_use());
    }
}

impl Waiters {
    pub fn new(per_peer: usize, total: usize, metrics: Metrics) -> Self {
        Self {
            slots: PeerLimiter::new(per_peer, total),
            metrics,
        }
    }

    fn enter(&self, ip: IpAddr) -> Result<WaitSlot, BrokerError> {
        let permit = self
            .slots
            .try_acquire(ip)
            .map_err(|limit| BrokerError::PodWaitLimit { ip, limit })?;
        self.metrics.set_pod_waiters(self.slots.in_use());
        Ok(WaitSlot {
            permit: Some(permit),
            waiters: self.clone(),
        })
    }
}

/// The pod at `ip`, waiting up to `wait` for a pod the store has not seen yet (a pod that
/// asks the moment it starts: kube2iam#136, kiam#293). A known address answers at once; an
/// unknown one waits only if a waiting slot is free, and is refused at once otherwise.
pub async fn identify(
    store: &PodStore,
    waiters: &Waiters,
    ip: IpAddr,
    wait: Duration,
) -> Result<Arc<Pod>, BrokerError> {
    let ip = canonical(ip);
    let found = match store.lookup_ip(ip) {
        IpLookup::Unknown if !wait.is_zero() => {
            let _slot = waiters.enter(ip)?;
            store.wait_for_ip(ip, wait).await
        }
        found => found,
    };
    match found {
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
    let claimed = |name: &HeaderName| {
        headers_in
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not UTF-8>").to_string())
    };
    let ns = claimed(&names::POD_NAMESPACE);
    let name = claimed(&names::POD_NAME);
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
