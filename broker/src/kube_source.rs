//! The Kubernetes pod source: watches this node's pods (and, for namespace restrictions, the
//! namespaces) and keeps a [`PodStore`] up to date.
//!
//! kube-rs's `watcher` does the list/watch protocol (paged list, resume from the last
//! resourceVersion or bookmark, re-list after 410 Gone). The [`PodStore`] plays the part of
//! kube's reflector store: a re-list (`Init` … `InitDone`) is buffered and swapped in whole,
//! so pods deleted while the watch was down disappear, and the store only reports synced
//! after the first complete list.
//!
//! Freshness: the store must know when its view may be out of date (a deleted pod's address
//! may already belong to a new pod). A watcher error (the API unreachable, a failed watch, a
//! 410) marks that side of the store down from that moment. kube's watcher would resume a
//! failed watch silently, and a silent watch says nothing about whether it is back, so after
//! an error the watcher is dropped and, after a backoff, a new one starts from a full list;
//! its `InitDone` marks the side current again. A connected watch that delivers nothing is
//! current (nothing changed) — for at most the idle timeout ([`KubeSourceConfig::idle_timeout`]):
//! the client's connections carry a read timeout of that length, and each watch asks the API
//! server to end it 2 s sooner ([`watch_timeout_secs`]). A healthy server sends a bookmark
//! about every minute and one just before it ends a watch, so a healthy watch is never that
//! silent; a watch that is connected but says nothing (a stuck proxy, a wedged server) fails
//! with a read error, which marks the store down and re-lists like any other failure. (kube's
//! own idle check, 5 s past the watch's timeout, would resume such a watch silently; the read
//! timeout comes first.)

use std::net::IpAddr;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1 as k8s;
use kube::Api;
use kube::runtime::watcher;

use crate::pods::{Namespace, Pod, PodKey, PodPhase, PodStore, Resource, canonical};

/// What the Kubernetes source watches.
#[derive(Debug, Clone)]
pub struct KubeSourceConfig {
    /// `spec.nodeName` of the pods to watch (this node, from the downward API).
    pub node_name: String,
    /// Watch namespaces too (needed for namespace role restrictions). When false the store's
    /// namespace side is marked synced at once.
    pub watch_namespaces: bool,
    /// Longest silence on an API connection before the watch counts as dead (`--watch-idle-timeout`).
    pub idle_timeout: Duration,
}

/// A client for the in-cluster (or kubeconfig) API server whose connections fail a read that
/// waits longer than `idle_timeout`: a silent watch ends with an error instead of looking
/// current forever.
pub async fn client(idle_timeout: Duration) -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer().await?;
    config.read_timeout = Some(idle_timeout);
    Ok(kube::Client::try_from(config)?)
}

/// The `timeoutSeconds` a watch asks for: 2 s under the idle timeout, so a healthy server
/// ends (or bookmarks) a quiet watch before the client's read timeout would call it dead,
/// and the read timeout fires before kube's own idle check (the watch's timeout + 5 s).
pub fn watch_timeout_secs(idle_timeout: Duration) -> u32 {
    let secs = idle_timeout.as_secs().saturating_sub(2).max(1);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Runs for as long as the broker does. Marks the store synced after the first full lists,
/// down on every watch failure, and current again after each re-list.
///
/// API errors are retried with a jittered, doubling backoff (0.5 s to 10 s, back to the
/// start after a successful list) and logged; they never end the source.
pub async fn run(
    client: kube::Client,
    cfg: KubeSourceConfig,
    store: PodStore,
) -> anyhow::Result<()> {
    let pods_api = Api::<k8s::Pod>::all(client.clone());
    let timeout = watch_timeout_secs(cfg.idle_timeout);
    let pods_cfg = watcher::Config::default()
        .fields(&format!("spec.nodeName={}", cfg.node_name))
        .timeout(timeout);
    tracing::info!(
        node = %cfg.node_name,
        namespaces = cfg.watch_namespaces,
        idle_timeout = ?cfg.idle_timeout,
        "watching pods"
    );
    let pods = follow(
        move || watcher(pods_api.clone(), pods_cfg.clone()),
        PodMirror(store.clone()),
    );
    if cfg.watch_namespaces {
        let ns_api = Api::<k8s::Namespace>::all(client);
        let namespaces = follow(
            move || watcher(ns_api.clone(), watcher::Config::default().timeout(timeout)),
            NamespaceMirror(store),
        );
        tokio::join!(pods, namespaces);
    } else {
        store.mark_namespaces_synced();
        pods.await;
    }
    Ok(())
}

/// Where one watched resource lands in the [`PodStore`].
trait Mirror<K> {
    const WHAT: Resource;
    fn apply(&self, obj: &K);
    fn delete(&self, obj: &K);
    /// A complete list: replaces everything.
    fn replace(&self, objs: &[K]);
    /// A complete list has been applied: this side is synced and current.
    fn mark_synced(&self);
    /// The watch failed: this side may miss changes from now on.
    fn mark_down(&self);
}

/// Pacing of watcher restarts.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The next wait: the current step, jittered down by up to half so brokers that lost
    /// the API together do not come back together.
    fn next(&mut self) -> Duration {
        use rand::Rng;
        let wait = self.next.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }
}

/// Mirrors one resource forever: a watcher that starts with a full list, followed until its
/// first error; then, after a backoff, a new one.
async fn follow<K, S, M>(start: impl Fn() -> S, target: M)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    M: Mirror<K>,
{
    let what = M::WHAT.as_str();
    let mut backoff = Backoff::new();
    loop {
        let round = mirror(start(), &target).await;
        if round.relisted {
            backoff.reset();
        }
        let wait = backoff.next();
        match round.error {
            // kube errors carry the API's status message and the request path, never
            // credentials.
            Some(err) => tracing::warn!(
                what,
                error = %err,
                retry_in = ?wait,
                "watch failed; the pod store may be out of date until a re-list"
            ),
            None => {
                // kube's watcher never ends; if it did, nothing is watching any more.
                target.mark_down();
                tracing::warn!(what, retry_in = ?wait, "watch ended; starting over");
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// How one watcher went.
struct Round {
    /// At least one complete list was applied.
    relisted: bool,
    /// What ended it (`None`: the stream ended).
    error: Option<watcher::Error>,
}

/// Feeds a watcher's events into `target` until its first error (after marking `target`
/// down) or its end.
async fn mirror<K, S, M>(events: S, target: &M) -> Round
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    M: Mirror<K>,
{
    let mut events = std::pin::pin!(events);
    let mut relist: Vec<K> = Vec::new();
    let mut relisted = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(obj)) => target.apply(&obj),
            Ok(watcher::Event::Delete(obj)) => target.delete(&obj),
            Ok(watcher::Event::Init) => relist.clear(),
            Ok(watcher::Event::InitApply(obj)) => relist.push(obj),
            Ok(watcher::Event::InitDone) => {
                target.replace(&relist);
                target.mark_synced();
                tracing::info!(what = M::WHAT.as_str(), count = relist.len(), "listed");
                relist = Vec::new();
                relisted = true;
            }
            Err(err) => {
                target.mark_down();
                return Round {
                    relisted,
                    error: Some(err),
                };
            }
        }
    }
    Round {
        relisted,
        error: None,
    }
}

struct PodMirror(PodStore);

impl Mirror<k8s::Pod> for PodMirror {
    const WHAT: Resource = Resource::Pods;

    fn apply(&self, obj: &k8s::Pod) {
        if let Some(pod) = pod_from_k8s(obj) {
            tracing::debug!(pod = %pod.key(), ips = ?pod.ips, phase = ?pod.phase, "pod applied");
            self.0.upsert_pod(pod);
        }
    }

    fn delete(&self, obj: &k8s::Pod) {
        if let Some(pod) = pod_from_k8s(obj) {
            tracing::debug!(pod = %pod.key(), "pod deleted");
            self.0.remove_pod(&PodKey::new(pod.namespace, pod.name));
        }
    }

    fn replace(&self, objs: &[k8s::Pod]) {
        self.0.replace_pods(objs.iter().filter_map(pod_from_k8s));
    }

    fn mark_synced(&self) {
        self.0.mark_pods_synced();
    }

    fn mark_down(&self) {
        self.0.mark_down(Resource::Pods);
    }
}

struct NamespaceMirror(PodStore);

impl Mirror<k8s::Namespace> for NamespaceMirror {
    const WHAT: Resource = Resource::Namespaces;

    fn apply(&self, obj: &k8s::Namespace) {
        if let Some(ns) = namespace_from_k8s(obj) {
            self.0.upsert_namespace(ns);
        }
    }

    fn delete(&self, obj: &k8s::Namespace) {
        if let Some(name) = &obj.metadata.name {
            self.0.remove_namespace(name);
        }
    }

    fn replace(&self, objs: &[k8s::Namespace]) {
        self.0
            .replace_namespaces(objs.iter().filter_map(namespace_from_k8s));
    }

    fn mark_synced(&self) {
        self.0.mark_namespaces_synced();
    }

    fn mark_down(&self) {
        self.0.mark_down(Resource::Namespaces);
    }
}

/// What the broker needs of a Kubernetes Pod; `None` for an object without a name (the API
/// never sends one).
pub fn pod_from_k8s(pod: &k8s::Pod) -> Option<Pod> {
    let meta = &pod.metadata;
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    // Dual-stack pods list every address in podIPs; podIP is its first entry, and all an
    // older API server (or a partial status) may give.
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|ip| parse_ip(&ip.ip)).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()).and_then(parse_ip)
    {
        ips.push(ip);
    }
    Some(Pod {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name,
        uid: meta.uid.clone().unwrap_or_default(),
        ips,
        service_account: spec
            .and_then(|s| {
                s.service_account_name
                    .clone()
                    .or_else(|| s.service_account.clone())
            })
            .unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        // No phase yet: the pod has just been created, which the API calls Pending.
        phase: status
            .and_then(|s| s.phase.as_deref())
            .map(PodPhase::parse)
            .unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
    })
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    match s.parse() {
        Ok(ip) => Some(canonical(ip)),
        Err(_) => {
            tracing::warn!(ip = s, "ignoring an unparsable pod IP");
            None
        }
    }
}

/// A namespace's name and annotations; `None` without a name.
pub fn namespace_from_k8s(ns: &k8s::Namespace) -> Option<Namespace> {
    let name = ns.metadata.name.clone().filter(|n| !n.is_empty())?;
    Some(Namespace::new(
        name,
        ns.metadata.annotations.clone().unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn k8s_pod(v: serde_json::Value) -> k8s::Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn converts_a_running_dual_stack_pod() {
        let pod = pod_from_k8s(&k8s_pod(json!({
            "metadata": {"namespace": "default", "name": "myapp", "uid": "u-1",
                         "annotations": {"iam.amazonaws.com/role": "myapp-iam-role"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "myapp",
                     "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": "198.18.1.10",
                       "podIPs": [{"ip": "198.18.1.10"}, {"ip": "fd00::10"}]},
        })))
        .unwrap();
        assert_eq!(pod.key(), PodKey::new("default", "myapp"));
        assert_eq!(pod.uid, "u-1");
        assert_eq!(
            pod.ips,
            vec![
                "198.18.1.10".parse::<IpAddr>().unwrap(),
                "fd00::10".parse().unwrap()
            ]
        );
        assert_eq!(pod.service_account, "myapp");
        assert_eq!(pod.node, "node-1");
        assert!(!pod.host_network);
        assert_eq!(pod.phase, PodPhase::Running);
        assert_eq!(
            pod.annotation("iam.amazonaws.com/role"),
            Some("myapp-iam-role")
        );
    }

    #[test]
    fn falls_back_to_pod_ip_and_defaults() {
        let pod = pod_from_k8s(&k8s_pod(json!({
            "metadata": {"namespace": "kube-system", "name": "agent"},
            "spec": {"hostNetwork": true, "serviceAccount": "legacy", "containers": []},
            "status": {"podIP": "::ffff:10.0.0.5"},
        })))
        .unwrap();
        assert_eq!(pod.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert!(pod.host_network);
        assert_eq!(pod.service_account, "legacy");
        assert_eq!(pod.phase, PodPhase::Pending);
        assert!(pod.annotations.is_empty());
    }

    #[test]
    fn a_new_pod_has_no_address_and_odd_values_are_tolerated() {
        let pending = pod_from_k8s(&k8s_pod(
            json!({"metadata": {"namespace": "a", "name": "p"}}),
        ))
        .unwrap();
        assert!(pending.ips.is_empty());
        assert_eq!(pending.phase, PodPhase::Pending);
        let odd = pod_from_k8s(&k8s_pod(json!({
            "metadata": {"namespace": "a", "name": "p"},
            "status": {"phase": "Weird", "podIPs": [{"ip": "not-an-ip"}], "podIP": "198.18.0.3"},
        })))
        .unwrap();
        assert_eq!(odd.phase, PodPhase::Unknown);
        assert_eq!(odd.ips, vec!["198.18.0.3".parse::<IpAddr>().unwrap()]);
        assert!(pod_from_k8s(&k8s_pod(json!({"metadata": {}}))).is_none());
    }

    #[test]
    fn a_watch_ends_before_the_read_timeout_would_call_it_dead() {
        assert_eq!(watch_timeout_secs(Duration::from_secs(60)), 58);
        assert_eq!(watch_timeout_secs(Duration::from_secs(5)), 3);
        assert_eq!(watch_timeout_secs(Duration::from_secs(3)), 1);
        assert_eq!(watch_timeout_secs(Duration::from_millis(3500)), 1);
        // kube's own idle check (timeout + 5 s) comes after the read timeout.
        for secs in 3..200 {
            let idle = Duration::from_secs(secs);
            assert!(u64::from(watch_timeout_secs(idle)) + 5 > secs);
            assert!(u64::from(watch_timeout_secs(idle)) < secs);
        }
    }

    #[test]
    fn converts_a_namespace() {
        let ns: k8s::Namespace = serde_json::from_value(json!({
            "metadata": {"name": "restricted",
                         "annotations": {"iam.amazonaws.com/allowed-roles": "[\"allowed-*\"]"}},
        }))
        .unwrap();
        let ns = namespace_from_k8s(&ns).unwrap();
        assert_eq!(ns.name, "restricted");
        assert_eq!(
            ns.annotations()
                .get("iam.amazonaws.com/allowed-roles")
                .map(String::as_str),
            Some("[\"allowed-*\"]")
        );
    }
}
