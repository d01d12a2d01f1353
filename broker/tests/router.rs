//! The IMDS and admin routers, driven with `oneshot` and a mocked peer address (the
//! caller's identity), against a fake STS and a fake node IMDS.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use meshiam_broker::admin::AdminConfig;
use meshiam_broker::cache::{CacheConfig, CredentialCache};
use meshiam_broker::clock::Clock;
use meshiam_broker::imds::DirectMode;
use meshiam_broker::metrics::Metrics;
use meshiam_broker::node_imds::NodeImds;
use meshiam_broker::pods::Resource;
use meshiam_broker::pods::{Namespace, Pod, PodKey, PodPhase, PodStore};
use meshiam_broker::policy::{self, BaseArn, PolicyConfig, Restriction, RolePolicy};
use meshiam_broker::sts::StsErrorKind;
use meshiam_broker::testing::FakeSts;
use meshiam_broker::{Broker, ServeConfig, admin, background};
use meshiam_imds::{Credentials, TokenIssuer, headers};
use tower::ServiceExt;

const BASE: &str = "arn:aws:iam::123456789012:role/";
const T0: u64 = 1_767_225_600;
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn pod(ns: &str, name: &str, ip: &str, role: Option<&str>) -> Pod {
    let mut annotations = BTreeMap::new();
    if let Some(r) = role {
        annotations.insert(policy::ROLE.to_string(), r.to_string());
    }
    Pod {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        ips: vec![ip.parse().unwrap()],
        service_account: format!("{name}-sa"),
        node: "node-1".into(),
        host_network: false,
        phase: PodPhase::Running,
        annotations,
    }
}

struct Opts {
    restriction: Restriction,
    default_role: Option<&'static str>,
    direct_mode: DirectMode,
    node_imds: String,
    session_tags: bool,
    max_staleness: Duration,
    ip_wait: Duration,
    max_concurrency: usize,
    max_pod_waiters: usize,
    max_pod_waiters_per_peer: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            restriction: Restriction::Off,
            default_role: None,
            direct_mode: DirectMode::Required,
            node_imds: "http://127.0.0.1:9".into(),
            session_tags: false,
            max_staleness: ServeConfig::default().max_staleness,
            ip_wait: Duration::from_millis(100),
            max_concurrency: ServeConfig::default().max_concurrency,
            max_pod_waiters: ServeConfig::default().max_pod_waiters,
            max_pod_waiters_per_peer: ServeConfig::default().max_pod_waiters_per_peer,
        }
    }
}

struct Harness {
    broker: Arc<Broker>,
    sts: Arc<FakeSts>,
    clock: Clock,
}

fn harness(o: Opts) -> Harness {
    let clock = Clock::manual(T0);
    let sts = Arc::new(FakeSts::new(clock.clone()));
    let metrics = Metrics::new();
    let store = PodStore::new();
    for p in [
        pod("default", "myapp", "198.18.1.10", Some("myapp-iam-role")),
        pod("default", "norole", "198.18.1.11", None),
        pod("default", "pathy", "198.18.1.12", Some("team/pathy")),
        pod(
            "default",
            "arny",
            "198.18.1.13",
            Some("arn:aws:iam::999999999999:role/x/arny"),
        ),
        pod("restricted", "allowed", "198.18.2.10", Some("allowed-app")),
        pod("restricted", "denied", "198.18.2.11", Some("other-app")),
        pod("kiam", "fine", "198.18.4.10", Some("kiam-app")),
        pod("kiam", "bad", "198.18.4.11", Some("kiam-other")),
        pod("default", "twin-a", "198.18.3.3", Some("r")),
        pod("default", "twin-b", "198.18.3.3", Some("r")),
        Pod {
            host_network: true,
            ..pod("kube-system", "agent", "198.18.0.1", Some("node-stuff"))
        },
    ] {
        store.upsert_pod(p);
    }
    let ns = |name: &str, k: &str, v: &str| {
        Namespace::new(name, [(k.to_string(), v.to_string())].into_iter().collect())
    };
    store.replace_namespaces([
        Namespace::new("default", BTreeMap::new()),
        ns("restricted", policy::ALLOWED_ROLES, r#"["allowed-*"]"#),
        ns(
            "kiam",
            policy::PERMITTED,
            "arn:aws:iam::123456789012:role/kiam-app",
        ),
    ]);
    store.mark_pods_synced();
    store.mark_namespaces_synced();
    let cache = CredentialCache::new(
        sts.clone(),
        CacheConfig {
            jitter: Duration::ZERO,
            sts_timeout: Duration::from_millis(500),
            ..CacheConfig::default()
        },
        clock.clone(),
        metrics.clone(),
    );
    let broker = Arc::new(Broker {
        store,
        policy: RolePolicy::new(PolicyConfig {
            base_arn: Some(BaseArn::parse(BASE).unwrap()),
            default_role: o.default_role.map(str::to_string),
            restriction: o.restriction,
            session_tags: o.session_tags,
            cluster_name: Some("test-cluster".into()),
            ..PolicyConfig::default()
        }),
        cache,
        issuer: TokenIssuer::new([7; 64]),
        node_imds: NodeImds::new(
            &o.node_imds,
            Duration::from_secs(1),
            Duration::from_secs(300),
        ),
        metrics,
        clock: clock.clone(),
        serve: ServeConfig {
            ip_wait: o.ip_wait,
            direct_mode: o.direct_mode,
            max_staleness: o.max_staleness,
            max_concurrency: o.max_concurrency,
            max_pod_waiters: o.max_pod_waiters,
            max_pod_waiters_per_peer: o.max_pod_waiters_per_peer,
            ..ServeConfig::default()
        },
        container: meshiam_broker::container::ContainerAuth::disabled(),
    });
    Harness { broker, sts, clock }
}

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

async fn call_on(
    app: Router,
    peer: &str,
    method: Method,
    path: &str,
    hdrs: &[(&str, &str)],
) -> Answer {
    let addr = SocketAddr::new(peer.parse::<IpAddr>().unwrap(), 43_210);
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in hdrs {
        req = req.header(*k, *v);
    }
    let resp = app
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

impl Harness {
    /// A filter call-out, as the filter makes it: a broker token from the token PUT first
    /// (refused for a caller the broker cannot identify: the read then says why), then the
    /// GET with the token and `x-meshiam-filter`.
    async fn filter(&self, peer: &str, path: &str) -> Answer {
        self.filter_as(peer, path, &[]).await
    }

    async fn filter_as(&self, peer: &str, path: &str, extra: &[(&str, &str)]) -> Answer {
        let token = self.token(peer).await;
        let mut h = vec![(headers::FILTER, "0.1.0")];
        if let Some(t) = &token {
            h.push((headers::TOKEN, t.as_str()));
        }
        h.extend_from_slice(extra);
        call_on(
            meshiam_broker::router(self.broker.clone()),
            peer,
            Method::GET,
            path,
            &h,
        )
        .await
    }

    /// A broker token for the pod at `peer`, if the broker gives one.
    async fn token(&self, peer: &str) -> Option<String> {
        let put = self
            .direct(
                peer,
                Method::PUT,
                "/latest/api/token",
                &[(headers::FILTER, "0.1.0"), (headers::TOKEN_TTL, "21600")],
            )
            .await;
        (put.status == StatusCode::OK).then_some(put.body)
    }

    async fn direct(&self, peer: &str, method: Method, path: &str, h: &[(&str, &str)]) -> Answer {
        call_on(
            meshiam_broker::router(self.broker.clone()),
            peer,
            method,
            path,
            h,
        )
        .await
    }

    /// The admin port with debug endpoints on, asked from the node's loopback.
    async fn admin(&self, path: &str) -> Answer {
        self.admin_from("127.0.0.1", true, path).await
    }

    async fn admin_from(&self, peer: &str, debug_endpoints: bool, path: &str) -> Answer {
        call_on(
            admin::router_with(self.broker.clone(), AdminConfig { debug_endpoints }),
            peer,
            Method::GET,
            path,
            &[],
        )
        .await
    }
}

#[tokio::test]
async fn the_caller_gets_its_role_name_and_credentials() {
    let h = harness(Opts::default());
    let list = h.filter("198.18.1.10", CREDS).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body, "myapp-iam-role", "bare, no newline");
    assert_eq!(list.headers["content-type"], headers::TEXT_PLAIN);

    let creds = h
        .filter("198.18.1.10", &format!("{CREDS}myapp-iam-role"))
        .await;
    assert_eq!(creds.status, StatusCode::OK);
    assert_eq!(creds.headers["content-type"], headers::APPLICATION_JSON);
    let c = Credentials::from_imds_json(&creds.body).unwrap();
    assert!(c.remaining(h.clock.now()) >= 1800);
    assert!(
        creds
            .body
            .contains("\"Expiration\":\"2026-01-01T01:00:00Z\""),
        "{}",
        creds.body
    );
    let reqs = h.sts.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].role_arn, format!("{BASE}myapp-iam-role"));
    assert_eq!(reqs[0].session_name, "default.myapp");
    assert_eq!(reqs[0].duration_secs, 3600);

    // Dated versions are the same paths; the cache answers.
    let again = h
        .filter(
            "198.18.1.10",
            "/2021-03-23/meta-data/iam/security-credentials/myapp-iam-role",
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(h.sts.calls(), 1);
    // IPv4-mapped IPv6 peers are the IPv4 pod.
    let mapped = h.filter("::ffff:198.18.1.10", CREDS).await;
    assert_eq!(mapped.body, "myapp-iam-role");
}

#[tokio::test]
async fn a_claimed_identity_that_differs_is_refused_and_counted() {
    let h = harness(Opts::default());
    let ok = h
        .filter_as(
            "198.18.1.10",
            CREDS,
            &[
                (headers::POD_NAMESPACE, "default"),
                (headers::POD_NAME, "myapp"),
            ],
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    for claim in [
        vec![
            (headers::POD_NAMESPACE, "default"),
            (headers::POD_NAME, "pathy"),
        ],
        vec![(headers::POD_NAMESPACE, "other")],
        vec![(headers::POD_NAME, "norole")],
    ] {
        let bad = h
            .filter_as("198.18.1.10", &format!("{CREDS}myapp-iam-role"), &claim)
            .await;
        assert_eq!(bad.status, StatusCode::FORBIDDEN, "{claim:?}");
        assert_eq!(bad.reason(), "identity-mismatch");
        assert!(!bad.body.contains("myapp"), "no detail in the body");
    }
    assert_eq!(h.broker.metrics.identity_mismatches(), 3);
    assert_eq!(h.sts.calls(), 0);
    let m = h.admin("/metrics").await;
    assert!(
        m.body
            .contains("meshiam_broker_identity_mismatches_total 3"),
        "{}",
        m.body
    );
}

#[tokio::test]
async fn unknown_host_network_and_shared_addresses_are_refused() {
    let h = harness(Opts::default());
    let t0 = std::time::Instant::now();
    let unknown = h.filter("198.18.9.9", CREDS).await;
    assert_eq!(
        (unknown.status, unknown.reason()),
        (StatusCode::FORBIDDEN, "unknown-pod")
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "waited for the store"
    );
    let host = h.filter("198.18.0.1", CREDS).await;
    assert_eq!(
        (host.status, host.reason()),
        (StatusCode::FORBIDDEN, "host-network")
    );
    let twins = h.filter("198.18.3.3", CREDS).await;
    assert_eq!(
        (twins.status, twins.reason()),
        (StatusCode::FORBIDDEN, "ambiguous-ip")
    );
    assert_eq!(h.sts.calls(), 0);
}

#[tokio::test]
async fn a_pod_that_appears_during_the_wait_is_served() {
    // A wait far longer than the pod's 30 ms delay, so a loaded machine cannot make it late.
    let h = harness(Opts {
        ip_wait: Duration::from_secs(3),
        ..Opts::default()
    });
    let store = h.broker.store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        store.upsert_pod(pod("default", "late", "198.18.1.50", Some("late-role")));
    });
    let a = h.filter("198.18.1.50", CREDS).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "late-role"));
}

#[tokio::test]
async fn a_finished_pod_releases_its_address() {
    let h = harness(Opts::default());
    let mut twin = pod("default", "twin-b", "198.18.3.3", Some("r"));
    twin.phase = PodPhase::Succeeded;
    h.broker.store.upsert_pod(twin);
    let a = h.filter("198.18.3.3", CREDS).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "r"));
}

#[tokio::test]
async fn role_forms_name_path_and_arn() {
    let h = harness(Opts::default());
    assert_eq!(h.filter("198.18.1.12", CREDS).await.body, "pathy");
    assert_eq!(
        h.filter("198.18.1.12", &format!("{CREDS}pathy"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(h.filter("198.18.1.13", CREDS).await.body, "arny");
    assert_eq!(
        h.filter("198.18.1.13", &format!("{CREDS}arny"))
            .await
            .status,
        StatusCode::OK
    );
    let arns: Vec<String> = h.sts.requests().into_iter().map(|r| r.role_arn).collect();
    assert_eq!(
        arns,
        vec![
            format!("{BASE}team/pathy"),
            "arn:aws:iam::999999999999:role/x/arny".to_string()
        ]
    );
}

#[tokio::test]
async fn no_role_is_404_unless_there_is_a_default() {
    let h = harness(Opts::default());
    let a = h.filter("198.18.1.11", CREDS).await;
    assert_eq!((a.status, a.reason()), (StatusCode::NOT_FOUND, "no-role"));
    let h = harness(Opts {
        default_role: Some("fallback-role"),
        ..Opts::default()
    });
    assert_eq!(h.filter("198.18.1.11", CREDS).await.body, "fallback-role");
    let c = h
        .filter("198.18.1.11", &format!("{CREDS}fallback-role"))
        .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(h.sts.requests()[0].role_arn, format!("{BASE}fallback-role"));
    // An annotated pod keeps its own role.
    assert_eq!(h.filter("198.18.1.10", CREDS).await.body, "myapp-iam-role");
}

#[tokio::test]
async fn another_role_than_the_pods_own_gets_nothing() {
    let h = harness(Opts::default());
    for other in ["pathy", "admin", "myapp-iam-role2"] {
        let a = h.filter("198.18.1.10", &format!("{CREDS}{other}")).await;
        assert_eq!(
            (a.status, a.reason()),
            (StatusCode::NOT_FOUND, "not-pod-role"),
            "{other}"
        );
        assert_eq!(a.body, "Not Found");
    }
    // A pod without a role asking for someone's role.
    let a = h
        .filter("198.18.1.11", &format!("{CREDS}myapp-iam-role"))
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(h.sts.calls(), 0);
}

#[tokio::test]
async fn kube2iam_allowed_roles_restriction() {
    let h = harness(Opts {
        restriction: Restriction::AllowedRoles,
        ..Opts::default()
    });
    assert_eq!(h.filter("198.18.2.10", CREDS).await.body, "allowed-app");
    let ok = h
        .filter("198.18.2.10", &format!("{CREDS}allowed-app"))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    for path in [CREDS.to_string(), format!("{CREDS}other-app")] {
        let a = h.filter("198.18.2.11", &path).await;
        assert_eq!(
            (a.status, a.reason()),
            (StatusCode::FORBIDDEN, "role-not-permitted")
        );
    }
    // The default namespace has no allowed-roles annotation: nothing is permitted there.
    let a = h.filter("198.18.1.10", CREDS).await;
    assert_eq!(a.reason(), "role-not-permitted");
    assert_eq!(h.sts.calls(), 1);
}

#[tokio::test]
async fn dot_segments_cannot_walk_out_of_an_allowed_path() {
    // `allowed-*` matches across `/`, so `allowed-x/../admin` matched it; IAM role paths hold
    // no `.` or `..` segments, and the annotation is refused as malformed.
    let h = harness(Opts {
        restriction: Restriction::AllowedRoles,
        ..Opts::default()
    });
    let roles = [
        "allowed-x/../admin",
        "allowed-x/./admin",
        "arn:aws:iam::123456789012:role/allowed-x/../admin",
    ];
    for (i, role) in roles.iter().enumerate() {
        let ip = format!("198.18.2.{}", 20 + i);
        h.broker
            .store
            .upsert_pod(pod("restricted", &format!("dots{i}"), &ip, Some(role)));
        for path in [CREDS.to_string(), format!("{CREDS}admin")] {
            let a = h.filter(&ip, &path).await;
            println!("{role} {path} -> {} {}", a.status, a.reason());
            assert_eq!(
                (a.status, a.reason()),
                (StatusCode::FORBIDDEN, "invalid-annotation"),
                "{role} {path}"
            );
        }
    }
    assert_eq!(h.sts.calls(), 0);
}

#[tokio::test]
async fn kiam_permitted_restriction() {
    let h = harness(Opts {
        restriction: Restriction::Permitted,
        ..Opts::default()
    });
    assert_eq!(
        h.filter("198.18.4.10", &format!("{CREDS}kiam-app"))
            .await
            .status,
        StatusCode::OK
    );
    let a = h.filter("198.18.4.11", &format!("{CREDS}kiam-other")).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::FORBIDDEN, "role-not-permitted")
    );
    assert_eq!(h.sts.calls(), 1);
}

#[tokio::test]
async fn tokens_are_bound_to_the_pod_and_unique() {
    let h = harness(Opts {
        direct_mode: DirectMode::Optional,
        ..Opts::default()
    });
    let put = h
        .direct(
            "198.18.1.10",
            Method::PUT,
            "/latest/api/token",
            &[(headers::TOKEN_TTL, "21600")],
        )
        .await;
    assert_eq!(put.status, StatusCode::OK);
    assert_eq!(put.headers[headers::TOKEN_TTL], "21600");
    assert_eq!(put.headers["content-type"], headers::TEXT_PLAIN);
    let token = put.body.clone();
    let get = |peer: &'static str, t: Option<String>| {
        let h = &h;
        async move {
            let hd: Vec<(&str, &str)> = t
                .as_deref()
                .map(|t| (headers::TOKEN, t))
                .into_iter()
                .collect();
            h.direct(peer, Method::GET, CREDS, &hd).await
        }
    };
    let ok = get("198.18.1.10", Some(token.clone())).await;
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (StatusCode::OK, "myapp-iam-role")
    );
    // Unique: a second token in the same second differs, and both work.
    let again = h.token("198.18.1.10").await.unwrap();
    assert_ne!(again, token);
    assert_eq!(get("198.18.1.10", Some(again)).await.status, StatusCode::OK);
    // Another pod cannot use it; a made-up one is refused; IMDSv1 is allowed (optional).
    let stolen = get("198.18.1.12", Some(token.clone())).await;
    assert_eq!(
        (stolen.status, stolen.reason()),
        (StatusCode::UNAUTHORIZED, "token-invalid")
    );
    let junk = get("198.18.1.10", Some("junk".into())).await;
    assert_eq!(
        (junk.status, junk.reason()),
        (StatusCode::UNAUTHORIZED, "token-invalid")
    );
    assert_eq!(get("198.18.1.10", None).await.status, StatusCode::OK);
    // The token expires with its TTL.
    h.clock.advance(21_600);
    let expired = get("198.18.1.10", Some(token)).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);

    // A token is for a pod the broker can identify, and the claimed identity must match.
    let ttl = [(headers::TOKEN_TTL, "60")];
    let unknown = h
        .direct("198.18.9.9", Method::PUT, "/latest/api/token", &ttl)
        .await;
    assert_eq!(
        (unknown.status, unknown.reason()),
        (StatusCode::FORBIDDEN, "unknown-pod")
    );
    let node = h
        .direct("198.18.0.1", Method::PUT, "/latest/api/token", &ttl)
        .await;
    assert_eq!(
        (node.status, node.reason()),
        (StatusCode::FORBIDDEN, "host-network")
    );
    let claimed = h
        .direct(
            "198.18.1.10",
            Method::PUT,
            "/latest/api/token",
            &[(headers::TOKEN_TTL, "60"), (headers::POD_NAME, "pathy")],
        )
        .await;
    assert_eq!(
        (claimed.status, claimed.reason()),
        (StatusCode::FORBIDDEN, "identity-mismatch")
    );

    // The token PUT's rules.
    type Case<'a> = (
        Method,
        &'a str,
        &'a [(&'a str, &'a str)],
        StatusCode,
        &'a str,
    );
    let cases: &[Case] = &[
        (
            Method::PUT,
            "/latest/api/token",
            &[],
            StatusCode::BAD_REQUEST,
            "bad-token-ttl",
        ),
        (
            Method::PUT,
            "/latest/api/token",
            &[(headers::TOKEN_TTL, "0")],
            StatusCode::BAD_REQUEST,
            "bad-token-ttl",
        ),
        (
            Method::PUT,
            "/latest/api/token",
            &[(headers::TOKEN_TTL, "21601")],
            StatusCode::BAD_REQUEST,
            "bad-token-ttl",
        ),
        (
            Method::PUT,
            "/latest/api/token",
            &[(headers::TOKEN_TTL, "60"), ("x-forwarded-for", "10.0.0.1")],
            StatusCode::FORBIDDEN,
            "forwarded-token-request",
        ),
        (
            Method::PUT,
            "/2021-03-23/api/token",
            &[(headers::TOKEN_TTL, "60")],
            StatusCode::FORBIDDEN,
            "versioned-token-path",
        ),
        (
            Method::GET,
            "/latest/api/token",
            &[],
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
        ),
        (
            Method::POST,
            CREDS,
            &[],
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
        ),
    ];
    for (m, p, hd, status, reason) in cases {
        let a = h.direct("198.18.1.10", m.clone(), p, hd).await;
        assert_eq!((a.status, a.reason()), (*status, *reason), "{m} {p} {hd:?}");
    }
}

#[tokio::test]
async fn the_filter_marker_relaxes_nothing() {
    // The default, `required`: no read without a valid token, marker or not, forged
    // identity claims or not.
    let h = harness(Opts::default());
    let marker = [(headers::FILTER, "0.1.0")];
    for hd in [
        &[][..],
        &marker[..],
        &[
            (headers::FILTER, "0.1.0"),
            (headers::POD_NAMESPACE, "default"),
            (headers::POD_NAME, "myapp"),
        ][..],
    ] {
        for path in [CREDS.to_string(), format!("{CREDS}myapp-iam-role")] {
            let a = h.direct("198.18.1.10", Method::GET, &path, hd).await;
            assert_eq!(
                (a.status, a.reason()),
                (StatusCode::UNAUTHORIZED, "token-required"),
                "{path} {hd:?}"
            );
            assert!(!a.body.contains("AccessKeyId"));
        }
        let head = h.direct("198.18.1.10", Method::HEAD, CREDS, hd).await;
        assert_eq!(head.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(h.sts.calls(), 0);
    // With a token, the same read works, with or without the marker.
    let t = h.token("198.18.1.10").await.unwrap();
    for hd in [
        vec![(headers::TOKEN, t.as_str())],
        vec![(headers::TOKEN, t.as_str()), (headers::FILTER, "0.1.0")],
    ] {
        let a = h.direct("198.18.1.10", Method::GET, CREDS, &hd).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::OK, "myapp-iam-role")
        );
    }
    // `optional`: the marker does not make a token necessary or unnecessary either.
    let h = harness(Opts {
        direct_mode: DirectMode::Optional,
        ..Opts::default()
    });
    for hd in [&[][..], &marker[..]] {
        let a = h.direct("198.18.1.10", Method::GET, CREDS, hd).await;
        assert_eq!(a.status, StatusCode::OK, "{hd:?}");
        let bad = h
            .direct(
                "198.18.1.10",
                Method::GET,
                CREDS,
                &[hd, &[(headers::TOKEN, "junk")][..]].concat(),
            )
            .await;
        assert_eq!(
            (bad.status, bad.reason()),
            (StatusCode::UNAUTHORIZED, "token-invalid"),
            "{hd:?}"
        );
    }
}

#[tokio::test]
async fn a_pod_can_demand_imdsv2_under_optional() {
    let h = harness(Opts {
        direct_mode: DirectMode::Optional,
        ..Opts::default()
    });
    for (name, ip, value, needs_token) in [
        ("strict", "198.18.5.10", "required", true),
        ("typo", "198.18.5.11", "Requried", true),
        ("relaxed", "198.18.5.12", "optional", false),
        ("shouty", "198.18.5.13", "OPTIONAL", false),
    ] {
        let mut p = pod("default", name, ip, Some("myapp-iam-role"));
        p.annotations
            .insert(meshiam_broker::imds::IMDSV2_ANNOTATION.into(), value.into());
        h.broker.store.upsert_pod(p);
        for hd in [&[][..], &[(headers::FILTER, "0.1.0")][..]] {
            let a = h.direct(ip, Method::GET, CREDS, hd).await;
            if needs_token {
                assert_eq!(
                    (a.status, a.reason()),
                    (StatusCode::UNAUTHORIZED, "token-required"),
                    "{name} {hd:?}"
                );
            } else {
                assert_eq!(a.status, StatusCode::OK, "{name} {hd:?}");
            }
        }
        let t = h.token(ip).await.unwrap();
        let a = h
            .direct(ip, Method::GET, CREDS, &[(headers::TOKEN, t.as_str())])
            .await;
        assert_eq!(a.status, StatusCode::OK, "{name}");
    }
    // Under `required` the annotation cannot relax anything.
    let h = harness(Opts::default());
    let mut p = pod("default", "relaxed", "198.18.5.12", Some("myapp-iam-role"));
    p.annotations.insert(
        meshiam_broker::imds::IMDSV2_ANNOTATION.into(),
        "optional".into(),
    );
    h.broker.store.upsert_pod(p);
    let a = h.direct("198.18.5.12", Method::GET, CREDS, &[]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_token_dies_with_its_pod() {
    for mode in [DirectMode::Required, DirectMode::Optional] {
        let h = harness(Opts {
            direct_mode: mode,
            ..Opts::default()
        });
        let old = h.token("198.18.1.10").await.unwrap();
        assert_eq!(
            h.direct("198.18.1.10", Method::GET, CREDS, &[(headers::TOKEN, &old)])
                .await
                .status,
            StatusCode::OK
        );
        // The pod goes; another pod gets its address (a new pod, or the same name again
        // as a StatefulSet does: either way a new UID).
        h.broker.store.remove_pod(&PodKey::new("default", "myapp"));
        for (name, uid) in [("newcomer", "uid-newcomer"), ("myapp", "uid-myapp-2")] {
            let mut next = pod("default", name, "198.18.1.10", Some("myapp-iam-role"));
            next.uid = uid.into();
            h.broker.store.upsert_pod(next);
            let a = h
                .direct("198.18.1.10", Method::GET, CREDS, &[(headers::TOKEN, &old)])
                .await;
            assert_eq!(
                (a.status, a.reason()),
                (StatusCode::UNAUTHORIZED, "token-invalid"),
                "{mode:?} {name}"
            );
            // Its own token works.
            let fresh = h.token("198.18.1.10").await.unwrap();
            let a = h
                .direct(
                    "198.18.1.10",
                    Method::GET,
                    CREDS,
                    &[(headers::TOKEN, &fresh)],
                )
                .await;
            assert_eq!(a.status, StatusCode::OK, "{mode:?} {name}");
            h.broker.store.remove_pod(&PodKey::new("default", name));
        }
    }
}

#[tokio::test]
async fn extended_invalid_and_unlisted_paths_are_404() {
    let h = harness(Opts::default());
    let cases = [
        (
            "/latest/meta-data/iam/security-credentials-extended/myapp-iam-role",
            "extended-not-served",
        ),
        (
            "/latest/meta-data/iam/security-credentials-extended/",
            "extended-not-served",
        ),
        ("/latest/meta-data/local-ipv4", "path-not-allowed"),
        ("/latest/user-data", "path-not-allowed"),
        (
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "path-not-allowed",
        ),
        (
            "/latest/meta-data/../meta-data/iam/security-credentials/",
            "invalid-path",
        ),
        ("/nope", "invalid-path"),
        (
            "/latest/meta-data/iam/security-credentials/a/b",
            "invalid-path",
        ),
    ];
    for (p, reason) in cases {
        let a = h.filter("198.18.1.10", p).await;
        assert_eq!(
            (a.status, a.reason()),
            (StatusCode::NOT_FOUND, reason),
            "{p}"
        );
        assert_eq!(a.body, "Not Found");
    }
    assert_eq!(h.sts.calls(), 0);
}

#[tokio::test]
async fn iam_info_and_head() {
    let h = harness(Opts::default());
    let info = h.filter("198.18.1.10", "/latest/meta-data/iam/info").await;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(info.headers["content-type"], headers::APPLICATION_JSON);
    let fields = meshiam_imds::creds::parse_flat_object(&info.body).unwrap();
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("Code"), "Success");
    assert_eq!(
        get("InstanceProfileArn"),
        "arn:aws:iam::123456789012:instance-profile/myapp-iam-role"
    );
    assert!(get("InstanceProfileId").starts_with("AIPA"));
    assert_eq!(
        h.filter("198.18.1.11", "/latest/meta-data/iam/info")
            .await
            .reason(),
        "no-role"
    );

    let t = h.token("198.18.1.10").await.unwrap();
    let head = h
        .direct("198.18.1.10", Method::HEAD, CREDS, &[(headers::TOKEN, &t)])
        .await;
    assert_eq!((head.status, head.body.as_str()), (StatusCode::OK, ""));
}

/// A node IMDS that wants its own IMDSv2 token; counts GETs.
async fn fake_node_imds() -> (String, Arc<AtomicUsize>) {
    use axum::routing::{get, put};
    let gets = Arc::new(AtomicUsize::new(0));
    let g = gets.clone();
    let answer = move |hm: HeaderMap, value: &'static str| {
        let g = g.clone();
        async move {
            g.fetch_add(1, Ordering::SeqCst);
            if hm.get(headers::TOKEN).and_then(|v| v.to_str().ok()) == Some("node-token") {
                (StatusCode::OK, value)
            } else {
                (StatusCode::UNAUTHORIZED, "")
            }
        }
    };
    let a1 = answer.clone();
    let app = Router::new()
        .route(
            "/latest/api/token",
            put(|hm: HeaderMap| async move {
                if hm.contains_key(headers::TOKEN_TTL) {
                    (StatusCode::OK, "node-token")
                } else {
                    (StatusCode::BAD_REQUEST, "")
                }
            }),
        )
        .route(
            "/latest/meta-data/placement/region",
            get(move |hm| a1(hm, "us-east-1")),
        )
        .route(
            "/latest/meta-data/placement/availability-zone",
            get(move |hm| answer(hm, "us-east-1a")),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, gets)
}

#[tokio::test]
async fn allow_listed_paths_come_from_the_node_imds_and_are_cached() {
    let (url, gets) = fake_node_imds().await;
    let h = harness(Opts {
        node_imds: url,
        ..Opts::default()
    });
    let region = h
        .filter("198.18.1.10", "/latest/meta-data/placement/region")
        .await;
    assert_eq!(
        (region.status, region.body.as_str()),
        (StatusCode::OK, "us-east-1")
    );
    let az = h
        .filter(
            "198.18.1.12",
            "/2021-03-23/meta-data/placement/availability-zone",
        )
        .await;
    assert_eq!(az.body, "us-east-1a");
    for _ in 0..3 {
        assert_eq!(
            h.filter("198.18.1.11", "/latest/meta-data/placement/region")
                .await
                .body,
            "us-east-1"
        );
    }
    assert_eq!(gets.load(Ordering::SeqCst), 2, "one GET per path");
    // Only pods get them.
    let a = h
        .filter("198.18.0.1", "/latest/meta-data/placement/region")
        .await;
    assert_eq!(a.reason(), "host-network");
    // A node IMDS that is down is a 502.
    let h = harness(Opts::default());
    let a = h
        .filter("198.18.1.10", "/latest/meta-data/placement/region")
        .await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::BAD_GATEWAY, "node-imds-unavailable")
    );
}

#[tokio::test]
async fn sts_failures_are_gateway_errors_without_sts_text() {
    for (kind, status, reason) in [
        (StsErrorKind::Denied, StatusCode::BAD_GATEWAY, "sts-denied"),
        (
            StsErrorKind::Throttled,
            StatusCode::SERVICE_UNAVAILABLE,
            "sts-throttled",
        ),
        (
            StsErrorKind::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "sts-unavailable",
        ),
        (
            StsErrorKind::Timeout,
            StatusCode::GATEWAY_TIMEOUT,
            "sts-timeout",
        ),
    ] {
        let h = harness(Opts::default());
        h.sts.fail_with(Some(kind));
        let a = h
            .filter("198.18.1.10", &format!("{CREDS}myapp-iam-role"))
            .await;
        assert_eq!((a.status, a.reason()), (status, reason));
        assert!(!a.body.contains("Fake"), "{}", a.body);
    }
    // A slow STS is a timeout too.
    let h = harness(Opts::default());
    h.sts.set_delay(Duration::from_secs(3));
    let a = h
        .filter("198.18.1.10", &format!("{CREDS}myapp-iam-role"))
        .await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::GATEWAY_TIMEOUT, "sts-timeout")
    );
}

#[tokio::test]
async fn cached_credentials_survive_an_sts_outage() {
    let h = harness(Opts::default());
    let path = format!("{CREDS}myapp-iam-role");
    let first = h.filter("198.18.1.10", &path).await;
    h.sts.fail_with(Some(StsErrorKind::Unavailable));
    h.clock.advance(2400); // 20 minutes left: due, but STS is down.
    let second = h.filter("198.18.1.10", &path).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(first.body, second.body);
    let other = h.filter("198.18.1.12", &format!("{CREDS}pathy")).await;
    assert_eq!(other.status, StatusCode::SERVICE_UNAVAILABLE);
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn prefetch_on_new_pods_and_drop_when_gone() {
    let h = harness(Opts::default());
    let task = tokio::spawn(background::run(
        h.broker.clone(),
        Duration::from_secs(3600),
        true,
    ));
    // Existing role-annotated pods are prefetched at start (not the ambiguous pair's
    // duplicate key, not the host-network pod).
    until("initial prefetch", || h.broker.cache.len() >= 5).await;
    let before = h.sts.calls();
    h.broker
        .store
        .upsert_pod(pod("default", "fresh", "198.18.1.60", Some("fresh-role")));
    until("prefetch of the new pod", || h.sts.calls() == before + 1).await;
    assert_eq!(
        h.sts.requests().last().unwrap().session_name,
        "default.fresh"
    );
    // The pod's first request is a cache hit.
    let a = h.filter("198.18.1.60", &format!("{CREDS}fresh-role")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.sts.calls(), before + 1);
    let m = h.admin("/metrics").await;
    assert!(
        m.body.contains("meshiam_broker_cache_hits_total 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("meshiam_broker_cache_refreshes_total{purpose=\"prefetch\"}"),
        "{}",
        m.body
    );
    // A pod without a role is not prefetched.
    h.broker
        .store
        .upsert_pod(pod("default", "plain", "198.18.1.61", None));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.sts.calls(), before + 1);

    // Gone: its credentials are dropped.
    let n = h.broker.cache.len();
    h.broker.store.remove_pod(&PodKey::new("default", "fresh"));
    until("GC", || h.broker.cache.len() == n - 1).await;
    // A finished pod too.
    let mut done = pod("default", "myapp", "198.18.1.10", Some("myapp-iam-role"));
    done.phase = PodPhase::Succeeded;
    h.broker.store.upsert_pod(done);
    until("GC of a finished pod", || h.broker.cache.len() == n - 2).await;
    task.abort();
}

#[tokio::test]
async fn session_tags_reach_sts() {
    let h = harness(Opts {
        session_tags: true,
        ..Opts::default()
    });
    h.filter("198.18.1.10", &format!("{CREDS}myapp-iam-role"))
        .await;
    let tags = &h.sts.requests()[0].tags;
    let want: Vec<(String, String)> = [
        ("kubernetes-cluster-name", "test-cluster"),
        ("kubernetes-namespace", "default"),
        ("kubernetes-node-name", "node-1"),
        ("kubernetes-pod-name", "myapp"),
        ("kubernetes-service-account", "myapp-sa"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(tags, &want);
}

#[tokio::test]
async fn admin_health_readiness_and_explanations() {
    let h = harness(Opts {
        restriction: Restriction::AllowedRoles,
        ..Opts::default()
    });
    assert_eq!(h.admin("/healthz").await.status, StatusCode::OK);
    assert_eq!(h.admin("/readyz").await.status, StatusCode::OK);
    h.filter("198.18.2.10", &format!("{CREDS}allowed-app"))
        .await;

    let e = h.admin("/debug/pods/restricted/allowed").await;
    assert_eq!(e.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
    assert_eq!(v["verdict"], "served");
    assert_eq!(v["decision"]["roleArn"], format!("{BASE}allowed-app"));
    assert_eq!(v["decision"]["sessionName"], "restricted.allowed");
    assert_eq!(v["decision"]["restriction"]["permitted"], true);
    assert_eq!(v["cache"]["state"], "fresh");
    assert!(v["cache"]["expiration"].is_string(), "{v}");
    assert!(
        !e.body.contains("ASIAFAKE") && !e.body.contains("accessKeyId"),
        "no access key id on the admin port: {}",
        e.body
    );
    assert!(
        !e.body.contains("fake-secret") && !e.body.contains("fake-token"),
        "{}",
        e.body
    );

    let d: serde_json::Value =
        serde_json::from_str(&h.admin("/debug/pods/restricted/denied").await.body).unwrap();
    assert_eq!(d["verdict"], "role-not-permitted");
    assert_eq!(d["decision"]["restriction"]["permitted"], false);
    let t: serde_json::Value =
        serde_json::from_str(&h.admin("/debug/pods/default/twin-a").await.body).unwrap();
    assert_eq!(t["verdict"], "not-served-identity");
    assert!(
        t["addresses"][0]["lookup"]
            .as_str()
            .unwrap()
            .starts_with("ambiguous")
    );
    assert_eq!(
        h.admin("/debug/pods/default/nobody").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.admin("/debug/pods").await.status, StatusCode::OK);

    let m = h.admin("/metrics").await.body;
    for needle in [
        "meshiam_broker_requests_total{path=\"credentials\",outcome=\"ok\"} 1",
        "meshiam_broker_sts_calls_total{result=\"ok\"} 1",
        "meshiam_broker_sts_call_duration_seconds_count 1",
        "meshiam_broker_pods_tracked 11",
        "meshiam_broker_cache_misses_total{purpose=\"request\"} 1",
    ] {
        assert!(m.contains(needle), "{needle} not in\n{m}");
    }

    // Not ready until the store has synced.
    let store = PodStore::new();
    let b = Broker {
        store,
        policy: RolePolicy::new(PolicyConfig::default()),
        cache: h.broker.cache.clone(),
        issuer: TokenIssuer::new([1; 64]),
        node_imds: NodeImds::new(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
            Duration::from_secs(1),
        ),
        metrics: Metrics::new(),
        clock: Clock::System,
        serve: ServeConfig::default(),
        container: meshiam_broker::container::ContainerAuth::disabled(),
    };
    let r = call_on(
        admin::router(Arc::new(b)),
        "127.0.0.1",
        Method::GET,
        "/readyz",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("pod store"), "{}", r.body);
}

/// Captures log output of the current thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The threads whose log output is being captured, and where to.
static CAPTURING: Mutex<Vec<(std::thread::ThreadId, Captured)>> = Mutex::new(Vec::new());

/// Captures the JSON log lines (`meshiam=info`) written on this thread from now on. One global
/// subscriber routes each line to the buffer of the thread that wrote it: a scoped subscriber
/// (`set_default`) lost lines when tests ran in parallel under load, as other threads without
/// one changed tracing's global level and interest caches.
fn capture_this_thread() -> Captured {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let route = || -> Box<dyn std::io::Write> {
            let me = std::thread::current().id();
            match CAPTURING.lock().unwrap().iter().find(|(t, _)| *t == me) {
                Some((_, c)) => Box::new(c.clone()),
                None => Box::new(std::io::sink()),
            }
        };
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(route)
            .with_env_filter("meshiam=info")
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
    let out = Captured::default();
    CAPTURING
        .lock()
        .unwrap()
        .push((std::thread::current().id(), out.clone()));
    out
}

#[tokio::test]
async fn one_audit_line_per_issue_or_refusal_without_secrets() {
    // The requests run on this thread (a current-thread runtime).
    let out = capture_this_thread();
    let h = harness(Opts::default());
    h.filter("198.18.1.10", &format!("{CREDS}myapp-iam-role"))
        .await;
    h.filter("198.18.1.10", &format!("{CREDS}pathy")).await;
    h.filter_as("198.18.1.10", CREDS, &[(headers::POD_NAME, "evil")])
        .await;
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let audit: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "meshiam::audit")
        .collect();
    assert_eq!(audit.len(), 3, "{text}");
    let f = |i: usize, k: &str| audit[i]["fields"][k].as_str().unwrap_or("").to_string();
    assert_eq!(f(0, "outcome"), "issued");
    assert_eq!(f(0, "pod"), "myapp");
    assert_eq!(f(0, "namespace"), "default");
    assert_eq!(f(0, "role_arn"), format!("{BASE}myapp-iam-role"));
    assert_eq!(f(0, "session_name"), "default.myapp");
    assert_eq!(f(0, "access_key_id"), "ASIAFAKE00000001");
    assert_eq!(f(1, "outcome"), "not-pod-role");
    assert_eq!(f(2, "outcome"), "identity-mismatch");
    assert!(text.contains("meshiam::security"), "{text}");
    assert!(
        !text.contains("fake-secret") && !text.contains("fake-token"),
        "{text}"
    );
}

#[tokio::test]
async fn debug_endpoints_are_off_by_default_and_only_for_the_node_loopback() {
    let h = harness(Opts::default());
    h.filter("198.18.1.10", &format!("{CREDS}myapp-iam-role"))
        .await;
    // Off (the default): not there at all, from anywhere.
    for peer in ["127.0.0.1", "198.18.1.11"] {
        for path in ["/debug/pods", "/debug/pods/default/myapp"] {
            let a = h.admin_from(peer, false, path).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{peer} {path}");
            assert!(!a.body.contains("myapp-iam-role"), "{}", a.body);
        }
    }
    // On: refused to a pod, another node, the node's own pod-facing address, or a pod of
    // the local stack's loopback mode (127.1.0.x).
    for peer in [
        "198.18.1.11",
        "10.0.0.7",
        "198.18.0.1",
        "127.1.0.10",
        "fd00::5",
    ] {
        for path in ["/debug/pods", "/debug/pods/default/myapp"] {
            let a = h.admin_from(peer, true, path).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{peer} {path}");
            assert_eq!(a.reason(), "debug-loopback-only");
            assert!(
                !a.body.contains("myapp") && !a.body.contains("arn:"),
                "{}",
                a.body
            );
        }
    }
    // On, from the node's loopback (IPv4, IPv6, IPv4-mapped): answered.
    for peer in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        let a = h.admin_from(peer, true, "/debug/pods").await;
        assert_eq!(a.status, StatusCode::OK, "{peer}");
        assert!(a.body.contains("myapp-iam-role"), "{}", a.body);
        assert!(!a.body.contains("ASIAFAKE"), "{}", a.body);
    }
    // Probes and scrapes work from anywhere and name no pod, role or key.
    for debug_endpoints in [false, true] {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let a = h.admin_from("198.18.1.11", debug_endpoints, path).await;
            assert_eq!(a.status, StatusCode::OK, "{path}");
            for secret in ["myapp", "arn:aws", "ASIAFAKE", "198.18.1.10"] {
                assert!(
                    !a.body.contains(secret),
                    "{path} shows {secret}: {}",
                    a.body
                );
            }
        }
    }
}

#[tokio::test]
async fn a_stale_pod_store_refuses_every_request_until_it_relists() {
    let h = harness(Opts {
        max_staleness: Duration::from_millis(300),
        ..Opts::default()
    });
    let creds = format!("{CREDS}myapp-iam-role");
    assert_eq!(h.filter("198.18.1.10", &creds).await.status, StatusCode::OK);

    // The watch fails: within the bound, still served.
    h.broker.store.mark_down(Resource::Pods);
    assert_eq!(h.filter("198.18.1.10", &creds).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(350)).await;

    // Past the bound: every path, every way in, the token PUT included.
    let ttl = [(headers::TOKEN_TTL, "60")];
    let answers = [
        (
            "call-out credentials",
            h.filter("198.18.1.10", &creds).await,
        ),
        ("call-out role list", h.filter("198.18.1.10", CREDS).await),
        (
            "call-out placement",
            h.filter("198.18.1.10", "/latest/meta-data/placement/region")
                .await,
        ),
        (
            "direct credentials",
            h.direct("198.18.1.10", Method::GET, &creds, &[]).await,
        ),
        (
            "direct token PUT",
            h.direct("198.18.1.10", Method::PUT, "/latest/api/token", &ttl)
                .await,
        ),
        (
            "unknown address",
            h.direct("198.18.9.9", Method::GET, CREDS, &[]).await,
        ),
    ];
    for (what, a) in &answers {
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
        assert_eq!(a.reason(), "pod-store-stale", "{what}");
        assert!(!a.body.contains("myapp"), "{what}: {}", a.body);
    }
    let r = h.admin_from("198.18.1.11", false, "/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.body.contains("pod-store-stale") && r.body.contains("pods watch has been down for"),
        "{}",
        r.body
    );
    let m = h.admin_from("198.18.1.11", false, "/metrics").await.body;
    assert!(
        m.contains(
            "meshiam_broker_requests_total{path=\"credentials\",outcome=\"pod-store-stale\"} 2"
        ),
        "{m}"
    );
    let stale: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("meshiam_broker_pod_store_stale_seconds "))
        .expect("the staleness gauge")
        .parse()
        .unwrap();
    assert!(stale >= 0.3, "{stale}");

    // The namespace side going down too changes nothing; the pods re-listing alone does not
    // bring service back while the namespaces are still down.
    h.broker.store.mark_down(Resource::Namespaces);
    h.broker.store.mark_pods_synced();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let a = h.filter("198.18.1.10", &creds).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::SERVICE_UNAVAILABLE, "pod-store-stale")
    );

    // Both re-listed: served again, ready again.
    h.broker.store.mark_namespaces_synced();
    assert_eq!(h.filter("198.18.1.10", &creds).await.status, StatusCode::OK);
    let t = h
        .direct("198.18.1.10", Method::PUT, "/latest/api/token", &ttl)
        .await;
    assert_eq!(t.status, StatusCode::OK);
    assert_eq!(
        h.admin_from("198.18.1.11", false, "/readyz").await.status,
        StatusCode::OK
    );
    let m = h.admin_from("198.18.1.11", false, "/metrics").await.body;
    assert!(
        m.contains("meshiam_broker_pod_store_stale_seconds 0.0"),
        "{m}"
    );
}

#[tokio::test]
async fn a_role_change_in_the_pod_store_applies_to_the_next_request() {
    let h = harness(Opts::default());
    let me = "198.18.1.10";
    let old_creds = format!("{CREDS}myapp-iam-role");
    assert_eq!(h.filter(me, CREDS).await.body, "myapp-iam-role");
    assert_eq!(h.filter(me, &old_creds).await.status, StatusCode::OK);

    // The annotation now names another role: no per-pod decision is kept between requests.
    h.broker
        .store
        .upsert_pod(pod("default", "myapp", me, Some("new-role")));
    let list = h.filter(me, CREDS).await;
    assert_eq!(
        (list.status, list.body.as_str()),
        (StatusCode::OK, "new-role")
    );
    let old = h.filter(me, &old_creds).await;
    assert_eq!(
        (old.status, old.reason()),
        (StatusCode::NOT_FOUND, "not-pod-role")
    );
    assert!(!old.body.contains("AccessKeyId"));
    let new = h.filter(me, &format!("{CREDS}new-role")).await;
    assert_eq!(new.status, StatusCode::OK);
    assert!(Credentials::from_imds_json(&new.body).is_ok());

    // Removed: nothing, with the reason.
    h.broker.store.upsert_pod(pod("default", "myapp", me, None));
    let list = h.filter(me, CREDS).await;
    assert_eq!(
        (list.status, list.reason()),
        (StatusCode::NOT_FOUND, "no-role")
    );
    let gone = h.filter(me, &format!("{CREDS}new-role")).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert!(!gone.body.contains("AccessKeyId"));
}

#[tokio::test]
async fn only_the_exact_token_path_issues_tokens() {
    let h = harness(Opts::default());
    let ttl = [(headers::TOKEN_TTL, "60")];
    for p in [
        "/latest/api/token/",
        "/latest/api/token?x=1",
        "/latest/api/token?",
    ] {
        let a = h.direct("198.18.1.10", Method::PUT, p, &ttl).await;
        assert_eq!(
            (a.status, a.reason(), a.body.as_str()),
            (StatusCode::NOT_FOUND, "invalid-path", "Not Found"),
            "{p}"
        );
        assert!(a.headers.get(headers::TOKEN_TTL).is_none(), "{p}");
    }
    let a = h
        .direct("198.18.1.10", Method::PUT, "/latest/api/token", &ttl)
        .await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn credentials_with_a_trailing_slash_are_404() {
    let h = harness(Opts::default());
    for p in [
        "/latest/meta-data/iam/security-credentials/myapp-iam-role/",
        "/2021-03-23/meta-data/iam/security-credentials/myapp-iam-role/",
        "/latest/meta-data/iam/info/",
    ] {
        let a = h.filter("198.18.1.10", p).await;
        assert_eq!(
            (a.status, a.reason()),
            (StatusCode::NOT_FOUND, "invalid-path"),
            "{p}"
        );
        assert!(!a.body.contains("AccessKeyId"));
        let a = h.direct("198.18.1.10", Method::GET, p, &[]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{p}");
    }
    assert_eq!(h.sts.calls(), 0);
}

#[tokio::test]
async fn a_repeated_ttl_or_token_header_is_400() {
    let h = harness(Opts::default());
    let me = "198.18.1.10";
    let twice = [(headers::TOKEN_TTL, "60"), (headers::TOKEN_TTL, "99999")];
    let a = h.direct(me, Method::PUT, "/latest/api/token", &twice).await;
    assert_eq!(
        (a.status, a.reason(), a.body.as_str()),
        (
            StatusCode::BAD_REQUEST,
            "repeated-imds-header",
            "Bad Request"
        )
    );
    let same = [(headers::TOKEN_TTL, "60"), (headers::TOKEN_TTL, "60")];
    let a = h.direct(me, Method::PUT, "/latest/api/token", &same).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    let t = h
        .direct(
            me,
            Method::PUT,
            "/latest/api/token",
            &[(headers::TOKEN_TTL, "60")],
        )
        .await
        .body;
    let tokens = [(headers::TOKEN, t.as_str()), (headers::TOKEN, "junk")];
    let a = h.direct(me, Method::GET, CREDS, &tokens).await;
    assert_eq!(
        (a.status, a.reason()),
        (StatusCode::BAD_REQUEST, "repeated-imds-header")
    );
    let one = h
        .direct(me, Method::GET, CREDS, &[(headers::TOKEN, &t)])
        .await;
    assert_eq!(
        (one.status, one.body.as_str()),
        (StatusCode::OK, "myapp-iam-role")
    );
}

/// A request from an unknown address waits for the pod store in a slot of its own: known
/// pods are served at once even with every shared slot's worth of waiters, and waiters past
/// their caps are refused at once with the reason (issue 10: 3,000 unknown requests made a
/// known pod's call-outs time out).
#[tokio::test]
async fn unknown_callers_wait_in_capped_slots_of_their_own() {
    let h = harness(Opts {
        ip_wait: Duration::from_secs(3),
        max_concurrency: 1,
        max_pod_waiters: 3,
        max_pod_waiters_per_peer: 2,
        ..Opts::default()
    });
    // One router, as the broker serves: the slots are the router's.
    let app = meshiam_broker::router(h.broker.clone());
    let put = |peer: &'static str| {
        let app = app.clone();
        async move {
            call_on(
                app,
                peer,
                Method::PUT,
                "/latest/api/token",
                &[(headers::TOKEN_TTL, "60")],
            )
            .await
        }
    };
    let waiting: Vec<_> = ["198.18.9.9", "198.18.9.9", "198.18.9.8"]
        .into_iter()
        .map(|peer| tokio::spawn(put(peer)))
        .collect();
    until("three waiters", || {
        h.broker
            .metrics
            .encode()
            .contains("meshiam_broker_pod_waiters 3")
    })
    .await;

    // Past the per-address cap, and past the total: refused at once, saying why.
    for peer in ["198.18.9.9", "198.18.9.7"] {
        let start = std::time::Instant::now();
        let refused = put(peer).await;
        println!(
            "{peer} past the cap: {} {}",
            refused.status,
            refused.reason()
        );
        assert_eq!(
            (refused.status, refused.reason()),
            (StatusCode::SERVICE_UNAVAILABLE, "pod-wait-limit")
        );
        assert!(start.elapsed() < Duration::from_secs(1), "answered at once");
    }

    // A known pod is served now, though --max-concurrency is 1 and three requests wait.
    let start = std::time::Instant::now();
    let token = call_on(
        app.clone(),
        "198.18.1.10",
        Method::PUT,
        "/latest/api/token",
        &[(headers::TOKEN_TTL, "60")],
    )
    .await;
    assert_eq!(token.status, StatusCode::OK);
    let creds = call_on(
        app.clone(),
        "198.18.1.10",
        Method::GET,
        &format!("{CREDS}myapp-iam-role"),
        &[(headers::TOKEN, token.body.as_str())],
    )
    .await;
    assert_eq!(creds.status, StatusCode::OK, "{}", creds.reason());
    let took = start.elapsed();
    println!("known pod served in {took:?} while three requests wait");
    assert!(took < Duration::from_secs(1));

    // The waiters end as before (nobody appeared), and free their slots.
    for w in waiting {
        let a = w.await.unwrap();
        assert_eq!(
            (a.status, a.reason()),
            (StatusCode::FORBIDDEN, "unknown-pod")
        );
    }
    assert!(
        h.broker
            .metrics
            .encode()
            .contains("meshiam_broker_pod_waiters 0")
    );
    assert!(
        h.broker
            .metrics
            .encode()
            .contains("outcome=\"pod-wait-limit\"")
    );
}
