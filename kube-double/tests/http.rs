//! The double at the HTTP level: what a client sees on the wire.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshiam_kube_double::{KubeDouble, Options};
use serde_json::{Value, json};

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    fn new(double: &KubeDouble) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: double.url(),
        }
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        ctype: &str,
        body: &str,
    ) -> hyper::Response<Incoming> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
            .expect("request timed out")
            .expect("request failed")
    }

    async fn send_as(&self, method: &str, path: &str, ctype: &str, body: &str) -> (u16, Value) {
        let res = self.raw(method, path, ctype, body).await;
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    async fn send(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.send_as(method, path, "application/json", &body.to_string())
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send_as("GET", path, "application/json", "").await
    }

    async fn watch(&self, path: &str) -> Watch {
        let res = self.raw("GET", path, "application/json", "").await;
        assert_eq!(res.status(), 200, "watch {path}");
        Watch {
            body: res.into_body(),
            buf: Vec::new(),
        }
    }
}

struct Watch {
    body: Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event, or `None` when the stream ended or nothing came within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).expect("event is one JSON line"));
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??;
            if let Ok(data) = frame.unwrap().into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(5))
            .await
            .expect("a watch event")
    }

    async fn next_non_bookmark(&mut self) -> Value {
        loop {
            let e = self.next().await;
            if e["type"] != "BOOKMARK" {
                return e;
            }
        }
    }

    /// True when the server ends the stream within `wait`.
    async fn ends_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(_)) => continue,
            }
        }
    }
}

fn pod(name: &str, node: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "198.18.0.1", "podIPs": [{"ip": "198.18.0.1"}]},
    })
}

async fn start() -> (KubeDouble, Http) {
    let double = KubeDouble::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Options {
            bookmark_interval: Duration::from_millis(100),
        },
    )
    .await
    .unwrap();
    let http = Http::new(&double);
    (double, http)
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn crud_with_statuses_and_conflicts() {
    let (_double, http) = start().await;
    let (code, a) = http
        .send(
            "POST",
            "/api/v1/namespaces/default/pods",
            pod("a", "node-1"),
        )
        .await;
    assert_eq!(code, 201);
    assert_eq!(a["kind"], "Pod");
    assert_eq!(a["metadata"]["namespace"], "default");
    assert!(!a["metadata"]["uid"].as_str().unwrap().is_empty());
    let (code, dup) = http
        .send(
            "POST",
            "/api/v1/namespaces/default/pods",
            pod("a", "node-1"),
        )
        .await;
    assert_eq!(
        (code, dup["kind"].as_str(), dup["reason"].as_str()),
        (409, Some("Status"), Some("AlreadyExists"))
    );
    let (code, missing) = http.get("/api/v1/namespaces/default/pods/nope").await;
    assert_eq!((code, missing["code"].as_u64()), (404, Some(404)));

    // Optimistic concurrency on PUT.
    let mut changed = a.clone();
    changed["status"]["phase"] = json!("Succeeded");
    let (code, b) = http
        .send("PUT", "/api/v1/namespaces/default/pods/a", changed.clone())
        .await;
    assert_eq!(code, 200);
    assert!(rv(&b) > rv(&a));
    let (code, stale) = http
        .send("PUT", "/api/v1/namespaces/default/pods/a", changed)
        .await;
    assert_eq!((code, stale["reason"].as_str()), (409, Some("Conflict")));

    // A merge patch on /status changes the status only.
    let (code, c) = http
        .send_as(
            "PATCH",
            "/api/v1/namespaces/default/pods/a/status",
            "application/merge-patch+json",
            r#"{"status": {"podIP": "198.18.0.9", "phase": "Running"}, "spec": {"nodeName": "x"}}"#,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(c["status"]["podIP"], "198.18.0.9");
    assert_eq!(c["spec"]["nodeName"], "node-1");

    let (code, gone) = http
        .send("DELETE", "/api/v1/namespaces/default/pods/a", Value::Null)
        .await;
    assert_eq!(code, 200);
    assert!(rv(&gone) > rv(&c));
    assert_eq!(http.get("/api/v1/namespaces/default/pods/a").await.0, 404);

    // Namespaces, and deleting one takes its pods with it.
    let (code, _) = http
        .send(
            "POST",
            "/api/v1/namespaces",
            json!({"metadata": {"name": "team", "annotations": {"k": "v"}}}),
        )
        .await;
    assert_eq!(code, 201);
    http.send("POST", "/api/v1/namespaces/team/pods", pod("t", "node-1"))
        .await;
    let (_, ns) = http.get("/api/v1/namespaces/team").await;
    assert_eq!(ns["status"]["phase"], "Active");
    assert_eq!(
        http.send("DELETE", "/api/v1/namespaces/team", Value::Null)
            .await
            .0,
        200
    );
    assert_eq!(http.get("/api/v1/namespaces/team/pods/t").await.0, 404);
}

#[tokio::test]
async fn lists_carry_kind_and_resource_version_and_honour_selectors() {
    let (double, http) = start().await;
    for (name, node) in [("a", "node-1"), ("b", "node-2"), ("c", "node-1")] {
        http.send("POST", "/api/v1/namespaces/default/pods", pod(name, node))
            .await;
    }
    http.send("POST", "/api/v1/namespaces/other/pods", pod("d", "node-1"))
        .await;
    let (code, list) = http
        .get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1")
        .await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(rv(&list), double.resource_version());
    assert_eq!(names(&list), ["a", "c", "d"]);
    let (_, list) = http
        .get("/api/v1/namespaces/default/pods?fieldSelector=spec.nodeName%21%3Dnode-1")
        .await;
    assert_eq!(names(&list), ["b"]);
    let (_, list) = http
        .get("/api/v1/pods?fieldSelector=metadata.name%3Dd,spec.nodeName%3Dnode-1")
        .await;
    assert_eq!(names(&list), ["d"]);
    let (_, list) = http.get("/api/v1/pods?labelSelector=app%3Da").await;
    assert_eq!(names(&list), ["a"]);
    let (code, status) = http.get("/api/v1/pods?fieldSelector=spec.bogus%3Dx").await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    let (_, list) = http.get("/api/v1/namespaces").await;
    assert_eq!(list["kind"], "NamespaceList");
}

#[tokio::test]
async fn pages_are_a_consistent_snapshot_until_compacted() {
    let (double, http) = start().await;
    for name in ["a", "b", "c"] {
        http.send("POST", "/api/v1/namespaces/default/pods", pod(name, "n"))
            .await;
    }
    let (_, page1) = http.get("/api/v1/pods?limit=2").await;
    assert_eq!(names(&page1), ["a", "b"]);
    assert_eq!(page1["metadata"]["remainingItemCount"], 1);
    let token = page1["metadata"]["continue"].as_str().unwrap().to_owned();
    // Changes after the first page do not show up in the rest of it.
    http.send("DELETE", "/api/v1/namespaces/default/pods/c", Value::Null)
        .await;
    let (code, page2) = http
        .get(&format!("/api/v1/pods?limit=2&continue={token}"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(names(&page2), ["c"]);
    assert_eq!(rv(&page2), rv(&page1));
    assert!(page2["metadata"]["continue"].is_null());
    // Without a limit: everything, no continue.
    let (_, all) = http.get("/api/v1/pods").await;
    assert_eq!(names(&all), ["a", "b"]);
    // Exact reads of an old version work until compaction, then 410 Expired.
    let (code, exact) = http
        .get(&format!(
            "/api/v1/pods?resourceVersion={}&resourceVersionMatch=Exact",
            rv(&page1)
        ))
        .await;
    assert_eq!(
        (code, names(&exact)),
        (200, vec!["a".into(), "b".into(), "c".into()])
    );
    double.compact();
    let (code, status) = http
        .get(&format!("/api/v1/pods?limit=2&continue={token}"))
        .await;
    assert_eq!((code, status["reason"].as_str()), (410, Some("Expired")));
    let (code, _) = http
        .get(&format!(
            "/api/v1/pods?resourceVersion={}&resourceVersionMatch=Exact",
            rv(&page1)
        ))
        .await;
    assert_eq!(code, 410);
    // NotOlderThan (kube-rs's "any" list) is served from the latest state.
    let (code, _) = http
        .get("/api/v1/pods?resourceVersion=0&resourceVersionMatch=NotOlderThan")
        .await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn watch_replays_history_then_streams_live() {
    let (_double, http) = start().await;
    let (_, list) = http.get("/api/v1/pods").await;
    let from = rv(&list);
    http.send(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("a", "node-1"),
    )
    .await;
    http.send_as(
        "PATCH",
        "/api/v1/namespaces/default/pods/a/status",
        "application/merge-patch+json",
        r#"{"status": {"phase": "Succeeded"}}"#,
    )
    .await;
    http.send("DELETE", "/api/v1/namespaces/default/pods/a", Value::Null)
        .await;
    let mut w = http
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={from}&fieldSelector=spec.nodeName%3Dnode-1"
        ))
        .await;
    let mut last = from;
    for (want, phase) in [
        ("ADDED", "Running"),
        ("MODIFIED", "Succeeded"),
        ("DELETED", "Succeeded"),
    ] {
        let e = w.next().await;
        assert_eq!(e["type"], want);
        assert_eq!(e["object"]["kind"], "Pod");
        assert_eq!(e["object"]["status"]["phase"], phase);
        assert!(rv(&e["object"]) > last);
        last = rv(&e["object"]);
    }
    // Live: another node's pod is not seen; ours is.
    http.send(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("other", "node-2"),
    )
    .await;
    http.send(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("b", "node-1"),
    )
    .await;
    let e = w.next().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("b"))
    );
}

#[tokio::test]
async fn objects_entering_and_leaving_a_selector_are_added_and_deleted() {
    let (_double, http) = start().await;
    http.send(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("a", "node-1"),
    )
    .await;
    let mut w = http
        .watch("/api/v1/pods?watch=1&labelSelector=app%3Dweb")
        .await;
    let relabel = |v: &str| format!(r#"{{"metadata": {{"labels": {{"app": "{v}"}}}}}}"#);
    http.send_as(
        "PATCH",
        "/api/v1/namespaces/default/pods/a",
        "application/merge-patch+json",
        &relabel("web"),
    )
    .await;
    http.send_as(
        "PATCH",
        "/api/v1/namespaces/default/pods/a",
        "application/merge-patch+json",
        &relabel("db"),
    )
    .await;
    assert_eq!(w.next().await["type"], "ADDED");
    assert_eq!(w.next().await["type"], "DELETED");
}

#[tokio::test]
async fn watch_without_version_starts_with_synthetic_adds() {
    let (_double, http) = start().await;
    http.send("POST", "/api/v1/namespaces/default/pods", pod("a", "n"))
        .await;
    let mut w = http.watch("/api/v1/pods?watch=true").await;
    let e = w.next().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("a"))
    );
}

#[tokio::test]
async fn streaming_list_ends_initial_events_with_a_bookmark() {
    let (double, http) = start().await;
    for name in ["a", "b"] {
        http.send("POST", "/api/v1/namespaces/default/pods", pod(name, "n"))
            .await;
    }
    let mut w = http
        .watch("/api/v1/pods?watch=true&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0")
        .await;
    assert_eq!(w.next().await["type"], "ADDED");
    assert_eq!(w.next().await["type"], "ADDED");
    let end = w.next().await;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(rv(&end["object"]), double.resource_version());
    let (code, _) = http
        .get("/api/v1/pods?watch=true&sendInitialEvents=true")
        .await;
    assert_eq!(code, 422);
}

#[tokio::test]
async fn bookmarks_carry_the_current_version_only_when_allowed() {
    let (double, http) = start().await;
    let (_, list) = http.get("/api/v1/pods").await;
    let mut quiet = http
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            rv(&list)
        ))
        .await;
    let mut w = http
        .watch(&format!(
            "/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={}",
            rv(&list)
        ))
        .await;
    http.send("POST", "/api/v1/namespaces/default/pods", pod("a", "n"))
        .await;
    assert_eq!(w.next().await["type"], "ADDED");
    let b = w.next().await;
    assert_eq!(b["type"], "BOOKMARK");
    assert_eq!(b["object"]["kind"], "Pod");
    assert_eq!(b["object"]["apiVersion"], "v1");
    assert_eq!(rv(&b["object"]), double.resource_version());
    assert_eq!(quiet.next().await["type"], "ADDED");
    assert!(
        quiet
            .next_within(Duration::from_millis(400))
            .await
            .is_none()
    );
    assert!(double.stats().bookmarks >= 1);
}

#[tokio::test]
async fn a_compacted_version_gets_an_expired_error_event() {
    let (double, http) = start().await;
    let (_, list) = http.get("/api/v1/pods").await;
    http.send("POST", "/api/v1/namespaces/default/pods", pod("a", "n"))
        .await;
    // A watch that is keeping up is not affected by compaction.
    let mut live = http
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            rv(&list)
        ))
        .await;
    assert_eq!(live.next().await["type"], "ADDED");
    double.compact();
    let mut w = http
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            rv(&list)
        ))
        .await;
    let e = w.next().await;
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(w.ends_within(Duration::from_secs(2)).await);
    assert_eq!(double.stats().expired, 1);
    http.send("POST", "/api/v1/namespaces/default/pods", pod("b", "n"))
        .await;
    assert_eq!(live.next().await["object"]["metadata"]["name"], "b");
}

#[tokio::test]
async fn watches_end_on_timeout_and_on_request() {
    let (double, http) = start().await;
    let mut timed = http.watch("/api/v1/pods?watch=true&timeoutSeconds=1").await;
    let t0 = std::time::Instant::now();
    assert!(timed.ends_within(Duration::from_secs(3)).await);
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let mut w = http.watch("/api/v1/namespaces?watch=true").await;
    double.close_watches();
    assert!(w.ends_within(Duration::from_secs(2)).await);
    // New watches work again.
    let mut w = http.watch("/api/v1/namespaces?watch=true").await;
    double
        .create_namespace(&serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap())
        .unwrap();
    assert_eq!(w.next_non_bookmark().await["type"], "ADDED");
}

#[tokio::test]
async fn hung_watches_send_nothing_and_do_not_end_until_released() {
    let (double, http) = start().await;
    let (_, list) = http.get("/api/v1/pods").await;
    let mut open = http
        .watch(&format!(
            "/api/v1/pods?watch=true&allowWatchBookmarks=true&timeoutSeconds=1&resourceVersion={}",
            rv(&list)
        ))
        .await;
    assert_eq!(open.next().await["type"], "BOOKMARK");
    let (code, body) = http.send("POST", "/_double/hang-watches", json!({})).await;
    assert_eq!((code, &body["hang"]), (200, &json!(true)));
    // A change, bookmarks due every 100 ms, a 1 s timeout: nothing comes, nothing ends.
    http.send("POST", "/api/v1/namespaces/default/pods", pod("a", "n"))
        .await;
    let mut new = http
        .watch("/api/v1/pods?watch=true&allowWatchBookmarks=true")
        .await;
    let bookmarks = double.stats().bookmarks;
    assert!(
        open.next_within(Duration::from_millis(1500))
            .await
            .is_none()
    );
    assert!(new.next_within(Duration::from_millis(100)).await.is_none());
    assert_eq!(double.stats().bookmarks, bookmarks);
    // Lists still answer.
    let (code, list) = http.get("/api/v1/pods").await;
    assert_eq!((code, names(&list)), (200, vec!["a".to_string()]));

    // Released: the new watch goes on from where it stood, the open one is past its timeout.
    let (code, _) = http.send("POST", "/_double/recover", json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(new.next_non_bookmark().await["type"], "ADDED");
    assert!(open.ends_within(Duration::from_secs(2)).await);

    // A timed hang releases itself.
    double.hang_watches(Some(Duration::from_millis(300)));
    let mut w = http.watch("/api/v1/pods?watch=true").await;
    assert!(w.next_within(Duration::from_millis(100)).await.is_none());
    assert_eq!(
        w.next_within(Duration::from_secs(2)).await.unwrap()["type"],
        "ADDED"
    );
}

#[tokio::test]
async fn admin_endpoints_inject_faults_and_load_pods_files() {
    let (double, http) = start().await;
    let yaml = r#"
pods:
  - namespace: default
    name: myapp
    ips: ["198.18.1.10"]
    serviceAccount: myapp
    node: node-1
    annotations:
      iam.amazonaws.com/role: myapp-iam-role
  - namespace: restricted
    name: other
    ips: ["198.18.1.11"]
    node: node-1
namespaces:
  - name: restricted
    annotations:
      iam.amazonaws.com/allowed-roles: '["allowed-*"]'
"#;
    let (code, res) = http
        .send_as("POST", "/_double/pods", "application/yaml", yaml)
        .await;
    assert_eq!((code, res["applied"]["pods"].as_u64()), (200, Some(2)));
    let (_, p) = http.get("/api/v1/namespaces/default/pods/myapp").await;
    assert_eq!(p["status"]["podIPs"][0]["ip"], "198.18.1.10");
    assert_eq!(p["spec"]["serviceAccountName"], "myapp");
    let (_, nss) = http.get("/api/v1/namespaces").await;
    assert_eq!(names(&nss), ["default", "restricted"]);
    // Applying again changes nothing.
    let rv0 = double.resource_version();
    http.send_as("POST", "/_double/pods", "application/yaml", yaml)
        .await;
    assert_eq!(double.resource_version(), rv0);

    assert_eq!(
        http.send("POST", "/_double/fail?status=503", Value::Null)
            .await
            .0,
        200
    );
    let (code, st) = http.get("/api/v1/pods").await;
    assert_eq!(
        (code, st["reason"].as_str()),
        (503, Some("ServiceUnavailable"))
    );
    // Admin endpoints keep working during an outage.
    let (code, stats) = http.get("/_double/stats").await;
    assert_eq!(
        (code, stats["stats"]["injectedFailures"].as_u64()),
        (200, Some(1))
    );
    http.send("POST", "/_double/recover", Value::Null).await;
    assert_eq!(http.get("/api/v1/pods").await.0, 200);

    http.send("POST", "/_double/fail?status=500&ms=200", Value::Null)
        .await;
    assert_eq!(http.get("/api/v1/pods").await.0, 500);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(http.get("/api/v1/pods").await.0, 200);

    http.send("POST", "/_double/slow?delayMs=300&ms=1000", Value::Null)
        .await;
    let t0 = std::time::Instant::now();
    http.get("/api/v1/pods").await;
    assert!(t0.elapsed() >= Duration::from_millis(300));
    http.send("POST", "/_double/recover", Value::Null).await;

    let (code, res) = http
        .send_as(
            "DELETE",
            "/_double/pods",
            "application/yaml",
            "pods:\n  - {namespace: default, name: myapp}\n",
        )
        .await;
    assert_eq!((code, res["deleted"]["pods"].as_u64()), (200, Some(1)));
    assert_eq!(
        http.get("/api/v1/namespaces/default/pods/myapp").await.0,
        404
    );

    let (_, list) = http.get("/api/v1/pods").await;
    let mut w = http
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            rv(&list)
        ))
        .await;
    http.send("POST", "/_double/close-watches", Value::Null)
        .await;
    assert!(w.ends_within(Duration::from_secs(2)).await);
    http.send("DELETE", "/api/v1/namespaces/restricted", Value::Null)
        .await;
    let (_, c) = http.send("POST", "/_double/compact", Value::Null).await;
    assert_eq!(c["compactedTo"], double.resource_version().to_string());
    let mut w = http
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            rv(&list)
        ))
        .await;
    assert_eq!(w.next().await["object"]["code"], 410);
}

#[tokio::test]
async fn discovery_endpoints_answer() {
    let (_double, http) = start().await;
    assert_eq!(http.get("/version").await.1["major"], "1");
    assert_eq!(http.get("/api").await.1["versions"][0], "v1");
    let (_, res) = http.get("/api/v1").await;
    assert_eq!(res["kind"], "APIResourceList");
}

/// A watch resumed at a resourceVersion the double never issued gets an `ERROR` event with a
/// 410 `Expired` Status inside a 200 response (what the apiserver sends and what kube-rs's
/// watcher answers with a re-list), not an empty stream that silently skips changes.
#[tokio::test]
async fn watch_at_a_resource_version_never_issued_is_gone() {
    let (double, http) = start().await;
    http.send(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("a", "node-1"),
    )
    .await;
    let now = double.resource_version();
    let mut w = http
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            now + 5
        ))
        .await;
    let e = w.next().await;
    println!("watch at {} (current {now}) answered {e}", now + 5);
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(w.ends_within(Duration::from_secs(2)).await);
    // The current one is fine: no ERROR, the next change arrives.
    let mut w = http
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={now}"))
        .await;
    http.send(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("b", "node-1"),
    )
    .await;
    let e = w.next().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("b"))
    );
    assert_eq!(double.stats().expired, 1);
}

/// Restarted on the same address, the double is a new API server: every resourceVersion it
/// hands out is newer than any of the old run's, and a watch resumed at an old one (the
/// broker's, from before the restart) gets 410 so the client re-lists instead of keeping
/// pods the API no longer has.
#[tokio::test]
async fn a_restarted_double_expires_the_old_runs_resource_versions() {
    let (first, http) = start().await;
    let addr = first.addr();
    for name in ["a", "b", "c"] {
        http.send(
            "POST",
            "/api/v1/namespaces/default/pods",
            pod(name, "node-1"),
        )
        .await;
    }
    let (_, before) = http.get("/api/v1/pods").await;
    let old_rv = rv(&before);
    first.shutdown().await;

    let mut second = None;
    for _ in 0..50 {
        match KubeDouble::start_with(addr, Options::default()).await {
            Ok(d) => {
                second = Some(d);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let second = second.expect("rebinding the double's address");
    let http = Http::new(&second);
    http.send(
        "POST",
        "/api/v1/namespaces/default/pods",
        pod("z", "node-1"),
    )
    .await;
    let (_, after) = http.get("/api/v1/pods").await;
    println!(
        "before the restart: rv {old_rv} {:?}; after: rv {} {:?}",
        names(&before),
        rv(&after),
        names(&after)
    );
    assert_eq!(names(&after), ["z"]);
    assert!(rv(&after) > old_rv, "resourceVersions went backwards");
    let mut w = http
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={old_rv}"))
        .await;
    let e = w.next().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410))
    );
    // A list at the old resourceVersion with Exact is too old as well.
    let (code, _) = http
        .get(&format!(
            "/api/v1/pods?resourceVersion={old_rv}&resourceVersionMatch=Exact"
        ))
        .await;
    assert_eq!(code, 410);
}
