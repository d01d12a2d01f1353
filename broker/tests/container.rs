//! The container-credentials door (`GET /v1/credentials`) through the IMDS router, with
//! tokens issued and reviewed by the Kubernetes API double (TokenRequest, TokenReview).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod as KPod;
use meshiam_broker::cache::{CacheConfig, CredentialCache};
use meshiam_broker::clock::Clock;
use meshiam_broker::container::{ContainerAuth, Reviewer};
use meshiam_broker::metrics::Metrics;
use meshiam_broker::node_imds::NodeImds;
use meshiam_broker::pods::{Namespace, Pod, PodPhase, PodStore};
use meshiam_broker::policy::{self, BaseArn, PolicyConfig, RolePolicy};
use meshiam_broker::testing::FakeSts;
use meshiam_broker::{Broker, ServeConfig};
use meshiam_imds::{TokenIssuer, container, headers};
use meshiam_kube_double::KubeDouble;
use tower::ServiceExt;

const BASE: &str = "arn:aws:iam::123456789012:role/";

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn reason(&self) -> &str {
        self.headers
            .get(headers::REASON)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

struct Setup {
    _double: KubeDouble,
    client: kube::Client,
    broker: Arc<Broker>,
    myapp_ip: &'static str,
    other_ip: &'static str,
}

fn kpod(ns: &str, name: &str, sa: &str) -> KPod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"serviceAccountName": sa, "nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
    }))
    .unwrap()
}

async fn setup() -> Setup {
    // kube (ring) and the AWS SDK both bring a rustls provider: choose, as main does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = KubeDouble::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = kube::Client::try_from(kube::Config::new(double.url().parse().unwrap())).unwrap();
    let store = PodStore::new();
    for (name, ip, role) in [
        ("myapp", "198.18.1.10", "myapp-iam-role"),
        ("other", "198.18.1.11", "other-role"),
    ] {
        let created = double.create_pod(&kpod("default", name, name)).unwrap();
        let mut annotations = BTreeMap::new();
        annotations.insert(policy::ROLE.to_string(), role.to_string());
        store.upsert_pod(Pod {
            namespace: "default".into(),
            name: name.into(),
            uid: created.metadata.uid.unwrap(),
            ips: vec![ip.parse().unwrap()],
            service_account: name.into(),
            node: "node-1".into(),
            host_network: false,
            phase: PodPhase::Running,
            annotations,
        });
    }
    store.replace_namespaces([Namespace::new("default", BTreeMap::new())]);
    store.mark_pods_synced();
    store.mark_namespaces_synced();
    let clock = Clock::System;
    let metrics = Metrics::new();
    let sts = Arc::new(FakeSts::new(clock.clone()));
    let broker = Arc::new(Broker {
        store,
        policy: RolePolicy::new(PolicyConfig {
            base_arn: Some(BaseArn::parse(BASE).unwrap()),
            ..PolicyConfig::default()
        }),
        cache: CredentialCache::new(
            sts,
            CacheConfig {
                jitter: Duration::ZERO,
                ..CacheConfig::default()
            },
            clock.clone(),
            metrics.clone(),
        ),
        issuer: TokenIssuer::new([7; 64]),
        node_imds: NodeImds::new(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
            Duration::from_secs(1),
        ),
        metrics,
        clock,
        serve: ServeConfig {
            ip_wait: Duration::from_millis(50),
            ..ServeConfig::default()
        },
        container: ContainerAuth::new("meshiam", Reviewer::Kube(client.clone())),
    });
    Setup {
        _double: double,
        client,
        broker,
        myapp_ip: "198.18.1.10",
        other_ip: "198.18.1.11",
    }
}

impl Setup {
    /// A projected-volume token, as the kubelet gets it: TokenRequest bound to the pod.
    async fn token(&self, pod: &str, sa: &str, audience: &str, bound: bool) -> String {
        let uid = self.broker.store.pods_snapshot_uid(pod);
        let mut spec = serde_json::json!({"audiences": [audience], "expirationSeconds": 3600});
        if bound {
            spec["boundObjectRef"] =
                serde_json::json!({"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid});
        }
        let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
        let req = http::Request::post(format!(
            "/api/v1/namespaces/default/serviceaccounts/{sa}/token"
        ))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
        let v: serde_json::Value = self.client.request(req).await.unwrap();
        v["status"]["token"].as_str().unwrap().to_string()
    }

    async fn call(&self, peer: &str, method: Method, path: &str, h: &[(&str, &str)]) -> Answer {
        let addr = SocketAddr::new(peer.parse::<IpAddr>().unwrap(), 43_210);
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in h {
            req = req.header(*k, *v);
        }
        let resp = meshiam_broker::router(self.broker.clone())
            .layer(MockConnectInfo(addr))
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// As the filter calls: a broker token first, then the GET with the pod's token.
    async fn container(&self, peer: &str, auth: Option<&str>) -> Answer {
        let put = self
            .call(
                peer,
                Method::PUT,
                "/latest/api/token",
                &[(headers::TOKEN_TTL, "21600")],
            )
            .await;
        assert_eq!(put.status, StatusCode::OK);
        let mut h = vec![(headers::TOKEN, put.body.as_str())];
        if let Some(a) = auth {
            h.push((container::AUTHORIZATION, a));
        }
        self.call(peer, Method::GET, container::PATH, &h).await
    }
}

trait UidOf {
    fn pods_snapshot_uid(&self, name: &str) -> String;
}

impl UidOf for PodStore {
    fn pods_snapshot_uid(&self, name: &str) -> String {
        let ip: IpAddr = match name {
            "myapp" => "198.18.1.10",
            _ => "198.18.1.11",
        }
        .parse()
        .unwrap();
        match self.lookup_ip(ip) {
            meshiam_broker::pods::IpLookup::Pod(p) => p.uid.clone(),
            _ => panic!("no pod at {ip}"),
        }
    }
}

#[tokio::test]
async fn the_pods_own_token_gets_its_role_in_the_pod_identity_format() {
    let s = setup().await;
    let token = s.token("myapp", "myapp", "meshiam", true).await;
    let a = s.container(s.myapp_ip, Some(&token)).await;
    assert_eq!(a.status, StatusCode::OK, "{} {}", a.reason(), a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    for k in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
        assert!(v[k].as_str().is_some_and(|s| !s.is_empty()), "{k} in {v}");
    }
    assert_eq!(v["AccountId"], "123456789012");
    assert!(v["Expiration"].as_str().unwrap().ends_with('Z'));
    let until: u64 = a.headers[container::TOKEN_EXPIRES]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(until > Clock::System.now());
    // The verdict is cached by the token's digest: a second call does not ask the API.
    let again = s.container(s.myapp_ip, Some(&token)).await;
    assert_eq!(again.status, StatusCode::OK);
    let m = s.broker.metrics.encode();
    assert!(
        m.contains("meshiam_broker_token_reviews_total{result=\"cached\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn missing_invalid_and_other_pods_tokens_are_refused() {
    let s = setup().await;
    let a = s.container(s.myapp_ip, None).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::UNAUTHORIZED, "container-token-missing")
    );
    let a = s.container(s.myapp_ip, Some("not-a-token")).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::UNAUTHORIZED, "container-token-invalid")
    );
    // Right pod, wrong audience (the API server's default one).
    let api_token = s
        .token("myapp", "myapp", "https://kubernetes.default.svc", true)
        .await;
    let a = s.container(s.myapp_ip, Some(&api_token)).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::UNAUTHORIZED, "container-token-invalid")
    );
    // myapp's valid token, presented by the other pod: its own address, not myapp's role.
    let mine = s.token("myapp", "myapp", "meshiam", true).await;
    let a = s.container(s.other_ip, Some(&mine)).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::FORBIDDEN, "container-token-other-pod")
    );
    assert!(!a.body.contains("AccessKeyId"));
    // A token of the right service account but bound to no pod.
    let unbound = s.token("myapp", "myapp", "meshiam", false).await;
    let a = s.container(s.myapp_ip, Some(&unbound)).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::FORBIDDEN, "container-token-unbound")
    );
    // Sent twice.
    let put = s
        .call(
            s.myapp_ip,
            Method::PUT,
            "/latest/api/token",
            &[(headers::TOKEN_TTL, "60")],
        )
        .await;
    let a = s
        .call(
            s.myapp_ip,
            Method::GET,
            container::PATH,
            &[
                (headers::TOKEN, put.body.as_str()),
                (container::AUTHORIZATION, mine.as_str()),
                (container::AUTHORIZATION, mine.as_str()),
            ],
        )
        .await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::BAD_REQUEST, "container-token-repeated")
    );
    // The same rule as every read: no broker token, no answer (--direct-mode required).
    let a = s
        .call(
            s.myapp_ip,
            Method::GET,
            container::PATH,
            &[(container::AUTHORIZATION, mine.as_str())],
        )
        .await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::UNAUTHORIZED, "token-required")
    );
    let a = s.call(s.myapp_ip, Method::POST, container::PATH, &[]).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn no_verdict_fails_closed() {
    let s = setup().await;
    let token = s.token("myapp", "myapp", "meshiam", true).await;
    s._double.fail(503, None);
    let a = s.container(s.myapp_ip, Some(&token)).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::SERVICE_UNAVAILABLE, "token-review-unavailable")
    );
    s._double.recover();
    let a = s.container(s.myapp_ip, Some(&token)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.reason());

    // A broker without an API server (pod source file) never answers the door.
    let mut b = setup().await;
    let token = b.token("myapp", "myapp", "meshiam", true).await;
    let broker = Arc::get_mut(&mut b.broker).unwrap();
    broker.container = ContainerAuth::disabled();
    let a = b.container(b.myapp_ip, Some(&token)).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::SERVICE_UNAVAILABLE, "token-review-unavailable")
    );
}
