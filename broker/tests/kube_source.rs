//! The Kubernetes pod source against the in-process API double: kube-rs's real watcher, the
//! real wire format, loopback only.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1 as k8s;
use meshiam_broker::kube_source::{self, KubeSourceConfig};
use meshiam_broker::pods::{IpLookup, PodKey, PodPhase, PodStore};
use meshiam_kube_double::{KubeDouble, Options, PodsFile};
use serde_json::json;

const NODE: &str = "node-1";
/// The tests' `--watch-idle-timeout`.
const IDLE: Duration = Duration::from_secs(1);

/// The double, the store, and the running source (stopped on drop).
struct Harness {
    double: KubeDouble,
    store: PodStore,
    source: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.source.abort();
    }
}

async fn double() -> KubeDouble {
    KubeDouble::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Options {
            bookmark_interval: Duration::from_millis(100),
        },
    )
    .await
    .unwrap()
}

/// A kube client over plain HTTP. (`kube::Client::try_from` would build a rustls TLS
/// connector, which panics in this crate unless a process-wide crypto provider is installed:
/// the AWS SDK enables rustls's aws-lc-rs provider next to kube's ring one. The broker's
/// `main` installs one; the double needs no TLS at all.)
/// Its connections fail a read that waits longer than [`IDLE`], as the broker's do
/// (`kube_source::client` sets kube's `read_timeout`, which is this connector).
fn client(double: &KubeDouble) -> kube::Client {
    use kube::client::ConfigExt;
    let config = kube::Config::new(double.url().parse().unwrap());
    let mut connector = hyper_timeout::TimeoutConnector::new(
        hyper_util::client::legacy::connect::HttpConnector::new(),
    );
    connector.set_read_timeout(Some(IDLE));
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .map_err(tower::BoxError::from)
        .service(http);
    kube::Client::new(service, config.default_namespace)
}

fn start_source(double: KubeDouble, watch_namespaces: bool) -> Harness {
    let client = client(&double);
    let store = PodStore::new();
    let cfg = KubeSourceConfig {
        node_name: NODE.into(),
        watch_namespaces,
        idle_timeout: IDLE,
    };
    let source = tokio::spawn(kube_source::run(client, cfg, store.clone()));
    Harness {
        double,
        store,
        source,
    }
}

/// Polls `cond` every 10 ms for up to `secs` seconds.
async fn eventually_within(secs: u64, what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    eventually_within(5, what, cond).await;
}

fn pod(name: &str, node: &str, ip: Option<&str>, phase: &str) -> k8s::Pod {
    let mut status = json!({"phase": phase});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name,
                     "annotations": {"iam.amazonaws.com/role": format!("{name}-role")}},
        "spec": {"nodeName": node, "serviceAccountName": name,
                 "containers": [{"name": "app", "image": "x"}]},
        "status": status,
    }))
    .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn holder(store: &PodStore, addr: &str) -> Option<String> {
    match store.lookup_ip(ip(addr)) {
        IpLookup::Pod(p) => Some(p.name.clone()),
        _ => None,
    }
}

fn names(store: &PodStore) -> Vec<String> {
    store.pods().iter().map(|p| p.name.clone()).collect()
}

const PODS_FILE: &str = r#"
pods:
  - namespace: default
    name: myapp
    ips: ["198.18.1.10"]
    serviceAccount: myapp
    node: node-1
    annotations:
      iam.amazonaws.com/role: myapp-iam-role
  - namespace: restricted
    name: agent
    ips: ["198.18.0.1"]
    node: node-1
    hostNetwork: true
  - namespace: default
    name: elsewhere
    ips: ["198.18.2.10"]
    node: node-2
namespaces:
  - name: restricted
    annotations:
      iam.amazonaws.com/allowed-roles: '["allowed-*"]'
"#;

#[tokio::test]
async fn initial_list_is_this_nodes_pods_and_ready_only_after_sync() {
    let double = double().await;
    double
        .apply_pods_file(&PodsFile::parse(PODS_FILE).unwrap())
        .unwrap();
    // The API is down when the broker starts: not ready, and retrying.
    double.fail(503, None);
    let h = start_source(double, true);
    eventually("the source to try the API", || {
        h.double.stats().injected_failures >= 2
    })
    .await;
    assert!(!h.store.is_ready());
    assert!(h.store.is_empty());

    h.double.recover();
    eventually("the store to sync", || h.store.is_ready()).await;
    assert_eq!(names(&h.store), ["myapp", "agent"]);
    let myapp = h.store.pod(&PodKey::new("default", "myapp")).unwrap();
    assert_eq!(myapp.ips, vec![ip("198.18.1.10")]);
    assert_eq!(myapp.service_account, "myapp");
    assert_eq!(myapp.node, NODE);
    assert_eq!(myapp.phase, PodPhase::Running);
    assert_eq!(
        myapp.annotation("iam.amazonaws.com/role"),
        Some("myapp-iam-role")
    );
    assert!(!myapp.uid.is_empty());
    assert_eq!(h.store.lookup_ip(ip("198.18.0.1")), IpLookup::HostNetwork);
    assert_eq!(h.store.lookup_ip(ip("198.18.2.10")), IpLookup::Unknown);
    let restricted = h.store.namespace("restricted").unwrap();
    assert_eq!(
        restricted
            .annotations()
            .get("iam.amazonaws.com/allowed-roles")
            .map(String::as_str),
        Some(r#"["allowed-*"]"#)
    );
}

#[tokio::test]
async fn pod_lifecycle_events_update_the_store() {
    let h = start_source(double().await, false);
    eventually("sync", || h.store.is_ready()).await;
    assert!(h.store.is_empty());

    // Created, scheduled here, no address yet.
    h.double
        .create_pod(&pod("web", NODE, None, "Pending"))
        .unwrap();
    h.double
        .create_pod(&pod("other", "node-2", Some("198.18.0.20"), "Running"))
        .unwrap();
    let web = PodKey::new("default", "web");
    eventually("the new pod", || h.store.pod(&web).is_some()).await;
    assert!(h.store.pod(&web).unwrap().ips.is_empty());

    // The address arrives later.
    h.double
        .modify_pod("default", "web", |p| {
            let status = p.status.get_or_insert_with(Default::default);
            status.phase = Some("Running".into());
            status.pod_ip = Some("198.18.0.10".into());
            status.pod_ips = Some(vec![k8s::PodIP {
                ip: "198.18.0.10".into(),
            }]);
        })
        .unwrap();
    eventually("the IP to map to the pod", || {
        holder(&h.store, "198.18.0.10").as_deref() == Some("web")
    })
    .await;

    // Finished: the pod is still known but no longer holds its address.
    h.double
        .modify_pod("default", "web", |p| {
            p.status.get_or_insert_with(Default::default).phase = Some("Succeeded".into());
        })
        .unwrap();
    eventually("the IP to be released", || {
        h.store.lookup_ip(ip("198.18.0.10")) == IpLookup::Unknown
    })
    .await;
    assert_eq!(h.store.pod(&web).unwrap().phase, PodPhase::Succeeded);

    h.double.delete_pod("default", "web").unwrap();
    eventually("the pod to go", || h.store.pod(&web).is_none()).await;
    // Never another node's pod.
    assert!(h.store.is_empty());
    assert_eq!(h.store.lookup_ip(ip("198.18.0.20")), IpLookup::Unknown);
    // Without namespace watching nobody asks for namespaces.
    assert_eq!(h.double.stats().lists, 1);
}

#[tokio::test]
async fn namespaces_are_mirrored_with_their_annotations() {
    let h = start_source(double().await, true);
    eventually("sync", || h.store.is_ready()).await;
    let ns = |annotation: &str| -> k8s::Namespace {
        serde_json::from_value(json!({"metadata": {"name": "team",
            "annotations": {"iam.amazonaws.com/permitted": annotation}}}))
        .unwrap()
    };
    h.double
        .create_namespace(&ns("^arn:.*:role/team-.*$"))
        .unwrap();
    let permitted = |store: &PodStore| {
        store
            .namespace("team")
            .and_then(|n| n.annotations().get("iam.amazonaws.com/permitted").cloned())
    };
    eventually("the namespace", || permitted(&h.store).is_some()).await;
    h.double
        .update_namespace(&ns("^arn:.*:role/other$"))
        .unwrap();
    eventually("the new annotation", || {
        permitted(&h.store).as_deref() == Some("^arn:.*:role/other$")
    })
    .await;
    h.double.delete_namespace("team").unwrap();
    eventually("the namespace to go", || {
        h.store.namespace("team").is_none()
    })
    .await;
}

#[tokio::test]
async fn relists_after_410_gone_and_forgets_pods_deleted_meanwhile() {
    let h = start_source(double().await, true);
    for (name, addr) in [("a", "198.18.0.1"), ("b", "198.18.0.2")] {
        h.double
            .create_pod(&pod(name, NODE, Some(addr), "Running"))
            .unwrap();
    }
    eventually("both pods", || h.store.len() == 2 && h.store.is_ready()).await;
    let before = h.double.stats();

    // The watch drops; while the broker reconnects (slowly), b is deleted, c created, and the
    // history compacted, so resuming the old watch is impossible.
    h.double
        .slow(Duration::from_millis(300), Some(Duration::from_millis(300)));
    h.double.close_watches();
    h.double.delete_pod("default", "b").unwrap();
    h.double
        .create_pod(&pod("c", NODE, Some("198.18.0.3"), "Running"))
        .unwrap();
    h.double.compact();

    eventually_within(10, "the re-listed state", || names(&h.store) == ["a", "c"]).await;
    assert_eq!(holder(&h.store, "198.18.0.2"), None);
    assert_eq!(holder(&h.store, "198.18.0.3").as_deref(), Some("c"));
    let after = h.double.stats();
    assert!(after.expired > before.expired, "{after:?}");
    assert!(after.lists > before.lists, "{after:?}");
    assert!(h.store.is_ready());
    // The 410s marked both sides down; their re-lists make the store current again.
    eventually("both sides current", || h.store.down_for().is_none()).await;

    // And it keeps watching afterwards.
    h.double.delete_pod("default", "a").unwrap();
    eventually("a to go", || names(&h.store) == ["c"]).await;
}

#[tokio::test]
async fn bookmarks_let_the_watch_resume_without_a_relist() {
    let h = start_source(double().await, false);
    h.double
        .create_pod(&pod("a", NODE, Some("198.18.0.1"), "Running"))
        .unwrap();
    eventually("sync", || h.store.len() == 1).await;
    // Changes elsewhere move the resourceVersion on without any event for this node; only
    // bookmarks tell the watcher.
    for i in 0..5 {
        h.double
            .create_pod(&pod(&format!("x{i}"), "node-2", None, "Pending"))
            .unwrap();
    }
    let rv = h.double.resource_version();
    let seen = h.double.stats().bookmarks;
    eventually("a few bookmarks", || h.double.stats().bookmarks >= seen + 3).await;
    // Compacting to now and dropping the watch is harmless to a bookmarked watcher.
    assert_eq!(h.double.compact(), rv);
    h.double.close_watches();
    h.double
        .create_pod(&pod("b", NODE, Some("198.18.0.2"), "Running"))
        .unwrap();
    eventually("b", || {
        holder(&h.store, "198.18.0.2").as_deref() == Some("b")
    })
    .await;
    let stats = h.double.stats();
    assert_eq!((stats.lists, stats.expired), (1, 0), "{stats:?}");
    assert_eq!(names(&h.store), ["a", "b"]);
    // A watch that ends and resumes is no failure: the store stayed current throughout.
    assert_eq!(h.store.down_for(), None);
}

#[tokio::test]
async fn a_failed_watch_leaves_the_store_stale_until_it_has_relisted() {
    let h = start_source(double().await, true);
    h.double
        .create_pod(&pod("a", NODE, Some("198.18.0.1"), "Running"))
        .unwrap();
    eventually("sync", || h.store.is_ready() && h.store.len() == 1).await;
    // Connected and silent (bookmarks only): current.
    let seen = h.double.stats().bookmarks;
    eventually("a few bookmarks", || h.double.stats().bookmarks >= seen + 3).await;
    assert_eq!(h.store.down_for(), None);
    assert_eq!(h.store.check_fresh(Duration::ZERO), Ok(()));

    // The API fails and the open watches break: down from that moment.
    h.double.fail(503, None);
    h.double.close_watches();
    eventually("the failure to be noticed", || h.store.down_for().is_some()).await;
    // What happens meanwhile is not seen: the store still has `a`, and says it is stale.
    h.double.delete_pod("default", "a").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(holder(&h.store, "198.18.0.1").as_deref(), Some("a"));
    let stale = h
        .store
        .check_fresh(Duration::from_millis(250))
        .expect_err("stale past the bound");
    assert!(stale.down_for >= Duration::from_millis(250), "{stale}");
    let lists = h.double.stats().lists;

    // The API is back: a re-list (not a silent resume) brings the store up to date, by
    // itself.
    h.double.recover();
    eventually_within(15, "a re-list", || h.store.down_for().is_none()).await;
    assert!(h.double.stats().lists > lists, "{:?}", h.double.stats());
    assert_eq!(holder(&h.store, "198.18.0.1"), None);
    assert!(h.store.is_empty());
    assert_eq!(h.store.check_fresh(Duration::ZERO), Ok(()));

    // And it keeps watching.
    h.double
        .create_pod(&pod("b", NODE, Some("198.18.0.1"), "Running"))
        .unwrap();
    eventually("b", || {
        holder(&h.store, "198.18.0.1").as_deref() == Some("b")
    })
    .await;
}

/// A watch that stays connected but goes silent (no events, no bookmarks, no end): the
/// connection's read timeout drops it within the idle timeout, the store is marked down and
/// re-listed, so a pod deleted meanwhile and its address taken by another pod are seen from
/// the list — not after kube's 290 s watch timeout. While watches stay hung, every new
/// watch hangs too and the source keeps re-listing; released, it simply watches again.
#[tokio::test]
async fn a_silent_watch_is_dropped_and_relisted_within_the_idle_timeout() {
    let h = start_source(double().await, true);
    h.double
        .create_pod(&pod("a", NODE, Some("198.18.0.1"), "Running"))
        .unwrap();
    eventually("sync", || h.store.is_ready() && h.store.len() == 1).await;
    // Bookmarks and watch ends keep a quiet watch alive past the idle timeout.
    tokio::time::sleep(IDLE * 3).await;
    assert_eq!(h.double.stats().lists, 2, "{:?}", h.double.stats());
    assert_eq!(h.store.down_for(), None);

    h.double.hang_watches(None);
    let lists = h.double.stats().lists;
    let hung = tokio::time::Instant::now();
    h.double.delete_pod("default", "a").unwrap();
    h.double
        .create_pod(&pod("b", NODE, Some("198.18.0.1"), "Running"))
        .unwrap();
    eventually_within(5, "b at a's old address", || {
        holder(&h.store, "198.18.0.1").as_deref() == Some("b")
    })
    .await;
    let took = hung.elapsed();
    println!("a silent watch was replaced by a re-list after {took:?}");
    assert!(took >= IDLE, "{took:?}");
    assert!(h.double.stats().lists > lists, "{:?}", h.double.stats());
    assert_eq!(names(&h.store), ["b"]);

    // Released, it watches again (no more re-lists needed).
    h.double.recover();
    eventually_within(10, "the store current", || h.store.down_for().is_none()).await;
    h.double
        .create_pod(&pod("c", NODE, Some("198.18.0.3"), "Running"))
        .unwrap();
    eventually("c", || {
        holder(&h.store, "198.18.0.3").as_deref() == Some("c")
    })
    .await;
}

/// The API server restarts and comes back with other pods (the double forgets everything; a
/// real cluster's pods may have changed while the broker could not watch). The broker's
/// watcher resumes at its old resourceVersion, gets 410 Gone, re-lists and converges to what
/// the API has now: the pods it no longer has are gone from the store, new ones are in it.
#[tokio::test]
async fn relists_and_converges_after_the_api_server_restarts() {
    let first = double().await;
    let addr = first.addr();
    first
        .create_pod(&pod("a", NODE, Some("198.18.0.1"), "Running"))
        .unwrap();
    first
        .create_pod(&pod("b", NODE, Some("198.18.0.2"), "Running"))
        .unwrap();
    let store = PodStore::new();
    let cfg = KubeSourceConfig {
        node_name: NODE.into(),
        watch_namespaces: false,
        idle_timeout: IDLE,
    };
    let source = tokio::spawn(kube_source::run(client(&first), cfg, store.clone()));
    eventually("a and b", || names(&store) == ["a", "b"]).await;
    // More history, so the broker's resourceVersion is well past what a fresh server starts
    // handing out first.
    for i in 0..5 {
        first
            .create_pod(&pod(&format!("x{i}"), "node-2", None, "Pending"))
            .unwrap();
    }
    let old_rv = first.resource_version();
    first.shutdown().await;

    let mut second = None;
    for _ in 0..50 {
        match KubeDouble::start_with(
            addr,
            Options {
                bookmark_interval: Duration::from_millis(100),
            },
        )
        .await
        {
            Ok(d) => {
                second = Some(d);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let second = second.expect("rebinding the API double's address");
    // The API now has a (at a new address) and c; b is gone.
    second
        .create_pod(&pod("a", NODE, Some("198.18.0.9"), "Running"))
        .unwrap();
    second
        .create_pod(&pod("c", NODE, Some("198.18.0.3"), "Running"))
        .unwrap();
    eventually_within(15, "the store to match the restarted API", || {
        names(&store) == ["a", "c"]
    })
    .await;
    assert_eq!(holder(&store, "198.18.0.9").as_deref(), Some("a"));
    assert_eq!(holder(&store, "198.18.0.3").as_deref(), Some("c"));
    assert_eq!(holder(&store, "198.18.0.1"), None, "a's old address");
    assert_eq!(holder(&store, "198.18.0.2"), None, "b is gone from the API");
    let stats = second.stats();
    println!(
        "resumed at {old_rv}, restarted API at {}: {stats:?}",
        second.resource_version()
    );
    assert!(stats.expired >= 1 && stats.lists >= 1, "{stats:?}");
    source.abort();
}
