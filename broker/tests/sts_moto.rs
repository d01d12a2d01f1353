//! The broker binary against a real STS emulator (moto_server) over HTTP: AssumeRole with the
//! right ARN, session name, external id and tags; refresh ahead of the minimum lifetime; and
//! behaviour while STS is down or slow. Everything listens on loopback; each test starts
//! (and kills) its own moto and broker. Callers are told apart by their loopback source
//! address (127.0.0.x), as pods are by theirs.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshiam_imds::Credentials;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A child process killed (and reaped) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for_port(port: u16, what: &str) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// moto_server (STS emulator) on `port`.
async fn start_moto(port: u16) -> Proc {
    let bin = workspace().join(".venv/bin/moto_server");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup to create the Python virtualenv with moto",
        bin.display()
    );
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let p = Proc(child);
    wait_for_port(port, "moto_server").await;
    p
}

/// A TCP proxy in front of moto that records what the broker sends and can add a delay.
#[derive(Clone)]
struct Proxy {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
    delay_ms: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            port: listener.local_addr().unwrap().port(),
            seen: Arc::default(),
            delay_ms: Arc::default(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            p.seen.lock().unwrap().extend_from_slice(&buf[..n]);
                            let d = p.delay_ms.load(Ordering::SeqCst);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_millis(d)).await;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        proxy
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

struct Broker {
    _proc: Proc,
    addr: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Broker {
    async fn start(sts_port: u16, pods_yaml: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods.yaml");
        std::fs::write(&pods, pods_yaml).unwrap();
        let (port, admin_port) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshiam-broker"));
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--pods-file",
            pods.to_str().unwrap(),
            "--pods-file-poll",
            "100ms",
            "--region",
            "us-east-1",
            "--prefetch-jitter",
            "0s",
            "--log-format",
            "json",
        ])
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "AWS_ENDPOINT_URL_STS",
            format!("http://127.0.0.1:{sts_port}"),
        )
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_SESSION_TOKEN", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("no-credentials"),
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        let proc = Proc(cmd.spawn().expect("the broker starts"));
        let b = Broker {
            _proc: proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
        };
        // Ready = pods file loaded and base role ARN discovered through STS.
        let t0 = Instant::now();
        loop {
            if let Ok(r) = get(b.admin, "127.0.0.1", "/readyz", &[]).await
                && r.status == 200
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "broker not ready:\n{}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Replaces the pods file atomically (the broker polls it).
    fn write_pods(&self, yaml: &str) {
        let tmp = self.dir.path().join("pods.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("pods.yaml")).unwrap();
    }

    /// A read as the filter makes it: a broker token first (refused for a caller the
    /// broker cannot identify: the read then says why), then the GET with it.
    async fn call(&self, from: &str, path: &str) -> Answer {
        let put = request(
            self.addr,
            from,
            "PUT",
            "/latest/api/token",
            &[
                ("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
                ("x-meshiam-filter", "it"),
            ],
        )
        .await
        .unwrap();
        let token = (put.status == 200).then_some(put.body);
        let mut h = vec![("x-meshiam-filter", "it")];
        if let Some(t) = &token {
            h.push(("x-aws-ec2-metadata-token", t.as_str()));
        }
        get(self.addr, from, path, &h).await.unwrap()
    }

    async fn metrics(&self) -> String {
        get(self.admin, "127.0.0.1", "/metrics", &[])
            .await
            .unwrap()
            .body
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 request from the loopback source address `from`.
async fn request(
    to: SocketAddr,
    from: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Answer> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))?;
    let mut s = sock.connect(to).await?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_string(),
    })
}

async fn get(
    to: SocketAddr,
    from: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Answer> {
    request(to, from, "GET", path, headers).await
}

const PODS: &str = r#"
pods:
  - namespace: default
    name: myapp
    ips: ["127.0.0.2"]
    serviceAccount: myapp-sa
    node: node-1
    annotations:
      iam.amazonaws.com/role: myapp-iam-role
      iam.amazonaws.com/external-id: ext-123
  - namespace: default
    name: plain
    ips: ["127.0.0.3"]
"#;

fn with_pod(base: &str, name: &str, ip: &str, role: &str) -> String {
    format!(
        "{base}  - namespace: default\n    name: {name}\n    ips: [\"{ip}\"]\n    annotations:\n      iam.amazonaws.com/role: {role}\n"
    )
}

/// GetCallerIdentity with the credentials the broker handed out, straight at moto.
async fn caller_arn(sts_port: u16, c: &Credentials) -> String {
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(format!("http://127.0.0.1:{sts_port}"))
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            Some(c.token.clone()),
            None,
            "meshiam-test",
        ))
        .build();
    aws_sdk_sts::Client::from_conf(conf)
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity")
        .arn()
        .unwrap_or_default()
        .to_string()
}

async fn creds_of(b: &Broker, from: &str, role: &str) -> Credentials {
    let a = b.call(from, &format!("{CREDS}{role}")).await;
    assert_eq!(a.status, 200, "{a:?}\n{}", b.log());
    Credentials::from_imds_json(&a.body).expect("an IMDS credential document")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assume_role_with_the_right_arn_session_external_id_and_tags() {
    let moto_port = free_port();
    let _moto = start_moto(moto_port).await;
    let proxy = Proxy::start(moto_port).await;
    let b = Broker::start(
        proxy.port,
        PODS,
        &[
            "--session-tags",
            "--cluster-name",
            "it-cluster",
            "--ip-wait",
            "300ms",
        ],
    )
    .await;

    let list = b.call("127.0.0.2", CREDS).await;
    assert_eq!((list.status, list.body.as_str()), (200, "myapp-iam-role"));
    let c = creds_of(&b, "127.0.0.2", "myapp-iam-role").await;
    assert!(c.remaining(now()) >= 1790, "{}", c.remaining(now()));
    assert_eq!(
        caller_arn(moto_port, &c).await,
        "arn:aws:sts::123456789012:assumed-role/myapp-iam-role/default.myapp"
    );

    // What went over the wire to STS (form-encoded AssumeRole).
    let wire = proxy.seen();
    for needle in [
        "Action=AssumeRole",
        "RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fmyapp-iam-role",
        "RoleSessionName=default.myapp",
        "ExternalId=ext-123",
        "DurationSeconds=3600",
        "Tags.member.1.Key=kubernetes-cluster-name",
        "Tags.member.1.Value=it-cluster",
        "Tags.member.2.Key=kubernetes-namespace",
        "Tags.member.2.Value=default",
        "Tags.member.4.Key=kubernetes-pod-name",
        "Tags.member.4.Value=myapp",
        "Tags.member.5.Key=kubernetes-service-account",
        "Tags.member.5.Value=myapp-sa",
        "Action=GetCallerIdentity",
    ] {
        assert!(wire.contains(needle), "{needle} not sent to STS:\n{wire}");
    }
    // One AssumeRole for the pod (prefetched at start), however many requests.
    for _ in 0..5 {
        creds_of(&b, "127.0.0.2", "myapp-iam-role").await;
    }
    assert_eq!(proxy.seen().matches("Action=AssumeRole").count(), 1);

    // Refusals through the real server.
    let other = b.call("127.0.0.3", &format!("{CREDS}myapp-iam-role")).await;
    assert_eq!(other.status, 404);
    assert_eq!(other.headers["x-meshiam-reason"], "no-role");
    let t0 = Instant::now();
    let unknown = b.call("127.0.0.9", CREDS).await;
    assert_eq!(
        (unknown.status, unknown.headers["x-meshiam-reason"].as_str()),
        (403, "unknown-pod")
    );
    assert!(t0.elapsed() >= Duration::from_millis(300));

    // The IMDSv2 token PUT: a token bound to the calling pod.
    let put = request(
        b.addr,
        "127.0.0.2",
        "PUT",
        "/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", "60")],
    )
    .await
    .unwrap();
    assert_eq!(put.status, 200);
    assert_eq!(put.headers["x-aws-ec2-metadata-token-ttl-seconds"], "60");
    let token = put.body.clone();
    let ok = get(
        b.addr,
        "127.0.0.2",
        CREDS,
        &[("x-aws-ec2-metadata-token", &token)],
    )
    .await
    .unwrap();
    assert_eq!((ok.status, ok.body.as_str()), (200, "myapp-iam-role"));
    let stolen = get(
        b.addr,
        "127.0.0.3",
        CREDS,
        &[("x-aws-ec2-metadata-token", &token)],
    )
    .await
    .unwrap();
    assert_eq!(stolen.status, 401);

    // The audit trail names pod, role, session and key id, never the secret or the token.
    let log = b.log();
    assert!(log.contains("\"outcome\":\"issued\""), "{log}");
    assert!(log.contains(&c.access_key_id));
    assert!(log.contains("\"session_name\":\"default.myapp\""));
    assert!(!log.contains(&c.secret_access_key) && !log.contains(&c.token));
    assert!(!log.contains(token.as_str()), "no broker token in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_refreshed_before_the_minimum_lifetime() {
    let moto_port = free_port();
    let _moto = start_moto(moto_port).await;
    // 900 s sessions of which 893 s must be left in every answer; background refresh
    // starts 2 s earlier. So a session is replaced after about 5 s.
    let b = Broker::start(
        moto_port,
        PODS,
        &[
            "--session-duration",
            "900s",
            "--min-remaining",
            "893s",
            "--refresh-margin",
            "2s",
            "--maintenance-interval",
            "500ms",
        ],
    )
    .await;
    let first = creds_of(&b, "127.0.0.2", "myapp-iam-role").await;
    let t0 = Instant::now();
    let mut keys = vec![first.access_key_id.clone()];
    while t0.elapsed() < Duration::from_secs(12) {
        let c = creds_of(&b, "127.0.0.2", "myapp-iam-role").await;
        // Whole seconds on both sides: allow one of rounding.
        assert!(
            c.remaining(now()) + 1 >= 893,
            "answer with {} s left",
            c.remaining(now())
        );
        if keys.last() != Some(&c.access_key_id) {
            keys.push(c.access_key_id.clone());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        keys.len() >= 2,
        "credentials were never refreshed: {keys:?}"
    );
    let m = b.metrics().await;
    assert!(
        m.contains("meshiam_broker_cache_refreshes_total{purpose=\"refresh\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_down_or_slow() {
    let moto_port = free_port();
    let mut moto = Some(start_moto(moto_port).await);
    let proxy = Proxy::start(moto_port).await;
    let b = Broker::start(
        proxy.port,
        PODS,
        &[
            "--sts-timeout",
            "1s",
            "--negative-cache-ttl",
            "300ms",
            "--sts-backoff-base",
            "200ms",
            "--sts-backoff-max",
            "1s",
            "--maintenance-interval",
            "500ms",
        ],
    )
    .await;
    let cached = creds_of(&b, "127.0.0.2", "myapp-iam-role").await;

    // STS goes away.
    drop(moto.take());
    let again = creds_of(&b, "127.0.0.2", "myapp-iam-role").await;
    assert_eq!(
        again.access_key_id, cached.access_key_id,
        "still-valid credentials are served"
    );

    // A pod with a new role appears: quick 5xx, not a hang.
    let pods = with_pod(PODS, "newcomer", "127.0.0.4", "new-role");
    b.write_pods(&pods);
    let t0 = Instant::now();
    while b.call("127.0.0.4", CREDS).await.status != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "pods file not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let down = b.call("127.0.0.4", &format!("{CREDS}new-role")).await;
    assert!(matches!(down.status, 502..=504), "{down:?}");
    assert!(
        down.headers["x-meshiam-reason"].starts_with("sts-"),
        "{down:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        !down.body.contains("Connection") && down.body.len() < 40,
        "{}",
        down.body
    );

    // STS comes back: the broker recovers by itself within its backoff.
    let _moto = start_moto(moto_port).await;
    let t0 = Instant::now();
    loop {
        let a = b.call("127.0.0.4", &format!("{CREDS}new-role")).await;
        if a.status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no recovery: {a:?}\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // STS becomes slower than the broker's budget: a timely 504, and recovery after.
    proxy.set_delay(Duration::from_secs(3));
    let pods = with_pod(&pods, "slowpoke", "127.0.0.5", "slow-role");
    b.write_pods(&pods);
    let t0 = Instant::now();
    while b.call("127.0.0.5", CREDS).await.status != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "pods file not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let slow = b.call("127.0.0.5", &format!("{CREDS}slow-role")).await;
    assert!(matches!(slow.status, 503 | 504), "{slow:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    // Meanwhile cached credentials still come at once.
    let t0 = Instant::now();
    creds_of(&b, "127.0.0.2", "myapp-iam-role").await;
    assert!(t0.elapsed() < Duration::from_millis(500));
    proxy.set_delay(Duration::ZERO);
    let t0 = Instant::now();
    loop {
        let a = b.call("127.0.0.5", &format!("{CREDS}slow-role")).await;
        if a.status == 200 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no recovery: {a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = b.metrics().await;
    assert!(
        m.contains("meshiam_broker_sts_calls_total{result=\"timeout\"}"),
        "{m}"
    );
    assert!(
        m.contains("meshiam_broker_sts_calls_total{result=\"unavailable\"}"),
        "{m}"
    );
}
