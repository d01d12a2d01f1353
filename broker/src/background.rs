//! Keeping credentials ready: prefetch when a role-annotated pod appears, refresh before the
//! minimum lifetime is reached, drop what no live pod uses, discover the base role ARN.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use crate::Broker;
use crate::cache::Purpose;
use crate::pods::{Pod, PodEvent};
use crate::policy::{BaseArn, RoleSource};
use crate::sts::{AssumeRoleRequest, StsApi};

fn serves(pod: &Pod) -> bool {
    pod.is_live() && !pod.host_network
}

/// The AssumeRole request of every live pod with a permitted role.
pub fn live_requests(b: &Broker) -> HashSet<AssumeRoleRequest> {
    b.store
        .pods()
        .iter()
        .filter(|p| serves(p))
        .filter_map(|p| {
            let ns = b.store.namespace(&p.namespace);
            b.policy.decide(p, ns.as_deref()).ok().map(|d| d.request)
        })
        .collect()
}

/// Starts fetching a role-annotated pod's credentials, unless the cache has them already.
pub fn prefetch_pod(b: &Broker, pod: &Pod) {
    if !serves(pod) {
        return;
    }
    let ns = b.store.namespace(&pod.namespace);
    if let Ok(d) = b.policy.decide(pod, ns.as_deref())
        && d.source == RoleSource::Annotation
    {
        b.cache.spawn_fetch(d.request, Purpose::Prefetch);
    }
}

pub fn prefetch_all(b: &Broker) {
    for pod in b.store.pods() {
        prefetch_pod(b, &pod);
    }
}

/// Drops cache entries no live pod uses; returns how many.
pub fn gc(b: &Broker) -> usize {
    let dropped = b.cache.retain(&live_requests(b));
    if dropped > 0 {
        tracing::debug!(dropped, "dropped credentials no live pod uses");
    }
    dropped
}

/// Starts refreshing whatever is due.
pub fn refresh_due(b: &Broker) {
    for req in b.cache.due_for_refresh() {
        b.cache.spawn_fetch(req, Purpose::Refresh);
    }
}

/// Follows the pod store until it is dropped: prefetch on new pods, clean-up on removals,
/// and every `tick` a clean-up and refresh pass.
pub async fn run(b: Arc<Broker>, tick: Duration, prefetch: bool) {
    let mut events = b.store.subscribe();
    if prefetch {
        prefetch_all(&b);
    }
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(PodEvent::Applied(pod)) => {
                    if prefetch {
                        prefetch_pod(&b, &pod);
                    }
                    // An annotation change may leave the old role unused.
                    gc(&b);
                }
                Ok(PodEvent::Removed(_)) => {
                    gc(&b);
                }
                Err(RecvError::Lagged(_)) => {
                    gc(&b);
                    if prefetch {
                        prefetch_all(&b);
                    }
                }
                Err(RecvError::Closed) => return,
            },
            _ = ticker.tick() => {
                gc(&b);
                refresh_due(&b);
            }
        }
    }
}

/// Finds the base role ARN from the node's own identity (assumed-role ARN → account),
/// retrying with backoff until STS answers; then prefetches for pods that were waiting.
pub async fn discover_base_arn(b: Arc<Broker>, sts: Arc<dyn StsApi>, prefetch: bool) {
    let mut wait = Duration::from_secs(1);
    loop {
        match sts.caller_arn().await {
            Ok(arn) => match BaseArn::from_caller_arn(&arn) {
                Some(base) => {
                    tracing::info!(caller_arn = %arn, base_arn = base.as_str(), "discovered the base role ARN");
                    b.policy.set_base_arn(base);
                    if prefetch {
                        prefetch_all(&b);
                    }
                    return;
                }
                None => {
                    tracing::error!(caller_arn = %arn, "cannot derive a base role ARN from the node's identity; set --base-role-arn")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "GetCallerIdentity failed; role names wait for the base role ARN")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(60));
    }
}
