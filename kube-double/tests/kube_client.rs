//! kube-rs, unmodified, against the double.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use meshiam_kube_double::KubeDouble;
use serde_json::json;

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "x"}]},
    }))
    .unwrap()
}

/// A kube client over plain HTTP. `kube::Client::try_from` would build a rustls connector,
/// which panics when the workspace build enables both of rustls's crypto providers (the
/// broker's AWS SDK brings aws-lc-rs next to kube's ring) and none is installed.
async fn client(double: &KubeDouble) -> kube::Client {
    use kube::client::ConfigExt;
    let config = kube::Config::new(double.url().parse().unwrap());
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .map_err(tower::BoxError::from)
        .service(http);
    kube::Client::new(service, config.default_namespace)
}

#[tokio::test]
async fn kube_api_crud_and_selectors() {
    let double = KubeDouble::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = client(&double).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("a", "node-1"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b", "node-2"))
        .await
        .unwrap();
    let err = pods
        .create(&PostParams::default(), &pod("a", "node-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));

    let patch = json!({"status": {"phase": "Running", "podIP": "198.18.0.7", "podIPs": [{"ip": "198.18.0.7"}]}});
    pods.patch_status("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let a = pods.get("a").await.unwrap();
    assert_eq!(a.status.unwrap().pod_ip.as_deref(), Some("198.18.0.7"));

    let listed = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("spec.nodeName=node-1"))
        .await
        .unwrap();
    let names: Vec<_> = listed
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a"]);
    assert!(listed.metadata.resource_version.is_some());

    pods.delete("b", &DeleteParams::default()).await.unwrap();
    assert!(pods.get_opt("b").await.unwrap().is_none());
    let nss: Api<Namespace> = Api::all(client);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    nss.create(&PostParams::default(), &ns).await.unwrap();
    assert_eq!(
        nss.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    double.shutdown().await;
}

#[tokio::test]
async fn kube_watcher_sees_initial_list_and_changes_both_list_strategies() {
    let double = KubeDouble::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    double.create_pod(&pod("a", "node-1")).unwrap();
    for config in [
        watcher::Config::default(),
        watcher::Config::default().streaming_lists(),
    ] {
        let client = client(&double).await;
        let api: Api<Pod> = Api::all(client);
        let mut events = watcher(api, config.fields("spec.nodeName=node-1")).boxed();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("watcher event")
                .expect("stream open")
                .expect("no error")
        };
        assert!(matches!(next().await, watcher::Event::Init));
        assert!(
            matches!(next().await, watcher::Event::InitApply(p) if p.metadata.name.as_deref() == Some("a"))
        );
        assert!(matches!(next().await, watcher::Event::InitDone));
        double.create_pod(&pod("c", "node-2")).unwrap();
        double.create_pod(&pod("b", "node-1")).unwrap();
        assert!(
            matches!(next().await, watcher::Event::Apply(p) if p.metadata.name.as_deref() == Some("b"))
        );
        double.delete_pod("default", "b").unwrap();
        assert!(
            matches!(next().await, watcher::Event::Delete(p) if p.metadata.name.as_deref() == Some("b"))
        );
        double.delete_pod("default", "c").unwrap();
    }
}
