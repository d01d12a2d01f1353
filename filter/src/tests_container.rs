//! The container-credentials door (`GET http://169.254.170.23/v1/credentials`) through the
//! mock host: which requests are its, the token rules the filter applies itself, what it
//! sends the broker, and that a cached answer only goes back to the token it was given for.

use std::rc::Rc;

use meshiam_imds::{Credentials, container, headers};

use crate::broker_session::{self, BrokerToken};
use crate::config::{self, Config};
use crate::flow::{Action, RequestFlow, Shared};
use crate::host::CalloutResponse;
use crate::mock::{MockHost, Reply};
use crate::{metrics, secret};

const NOW: u64 = 1_767_225_600;
const POD_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJteWFwcCJ9.c2ln";
const OTHER_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvdGhlciJ9.c2ln";

fn pod() -> (MockHost, Rc<Shared>) {
    let h = MockHost::new()
        .property(&["xds", "node", "metadata", "NAMESPACE"], "default")
        .property(&["xds", "node", "metadata", "NAME"], "myapp")
        .property(&["xds", "node", "metadata", "INSTANCE_IPS"], "10.1.0.7")
        .property(&["source", "address"], "10.1.0.7:41234");
    assert_eq!(secret::ensure(&h), Ok(()));
    let t = BrokerToken {
        token: "broker-token".into(),
        expiry: NOW + 21_600,
    };
    assert!(broker_session::store(&h, &t));
    (h, Rc::new(Shared::new(Config::default())))
}

fn send(
    h: &MockHost,
    s: &Rc<Shared>,
    method: &str,
    authority: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> (RequestFlow, Action) {
    let mut hs = vec![
        (":method", method),
        (":path", path),
        (":authority", authority),
    ];
    hs.extend_from_slice(extra);
    h.set_request(&hs);
    let mut flow = RequestFlow::new(s.clone());
    let action = flow.on_request_headers(h);
    (flow, action)
}

fn get(h: &MockHost, s: &Rc<Shared>, token: Option<&str>) -> (RequestFlow, Action) {
    let auth: Vec<(&str, &str)> = token
        .map(|t| vec![(container::AUTHORIZATION, t)])
        .unwrap_or_default();
    send(h, s, "GET", container::HOST_V4, container::PATH, &auth)
}

fn doc(expiration: u64) -> String {
    container::render(
        &Credentials {
            access_key_id: "ASIAEXAMPLEKEY".into(),
            secret_access_key: "wJalrXUtnFEMI/SECRET".into(),
            token: "FwoGZXIvYXdzSESSIONTOKEN".into(),
            expiration,
            last_updated: NOW,
        },
        Some("123456789012"),
    )
}

fn broker_ok(token_until: u64) -> CalloutResponse {
    CalloutResponse {
        status: Some(200),
        content_type: Some("application/json".into()),
        token_expires: Some(token_until),
        body: doc(NOW + 3600).into_bytes(),
        ..Default::default()
    }
}

fn refused(status: u16, reason: &str) -> CalloutResponse {
    CalloutResponse {
        status: Some(status),
        content_type: Some("text/plain".into()),
        reason: Some(reason.into()),
        body: b"Unauthorized".to_vec(),
        ..Default::default()
    }
}

fn last(h: &MockHost) -> Reply {
    h.last_reply().expect("a reply")
}

#[test]
fn the_door_is_known_by_host_and_by_original_destination() {
    let cfg = Config::default();
    assert_eq!(cfg.container_hosts, config::DEFAULT_CONTAINER_HOSTS);
    let (h, s) = pod();
    for authority in ["169.254.170.23", "169.254.170.23:80", "[FD00:EC2::23]"] {
        let (_f, action) = send(&h, &s, "GET", authority, container::PATH, &[]);
        assert_eq!(action, Action::Pause, "{authority}");
        assert_eq!(
            last(&h).header(headers::REASON),
            Some("container-token-missing"),
            "{authority}"
        );
    }
    let h = h.property(&["destination", "address"], "169.254.170.23:80");
    let (_f, action) = send(&h, &s, "GET", "credentials.local", container::PATH, &[]);
    assert_eq!(action, Action::Pause);
    assert_eq!(last(&h).status, 401);
    // Not the door: another port, another address.
    let (h, s) = pod();
    let (_f, action) = send(&h, &s, "GET", "169.254.170.23:8080", container::PATH, &[]);
    assert_eq!(action, Action::Continue);
    let (_f, action) = send(&h, &s, "GET", "169.254.170.2", container::PATH, &[]);
    assert_eq!(action, Action::Continue);
    // An empty door list closes it.
    let cfg = config::parse(br#"{"containerHosts":[],"containerAddresses":[]}"#).unwrap();
    let s = Rc::new(Shared::new(cfg));
    let (_f, action) = send(&h, &s, "GET", "169.254.170.23", container::PATH, &[]);
    assert_eq!(action, Action::Continue);
    assert!(config::parse(br#"{"containerHosts":["169.254.169.254"]}"#).is_err());
}

#[test]
fn the_filter_refuses_what_it_can_tell_without_the_broker() {
    let (h, s) = pod();
    let (_f, _) = get(&h, &s, None);
    let r = last(&h);
    assert_eq!(
        (r.status, r.header(headers::REASON)),
        (401, Some("container-token-missing"))
    );
    let (_f, _) = get(&h, &s, Some(""));
    assert_eq!(
        last(&h).header(headers::REASON),
        Some("container-token-missing")
    );
    let (_f, _) = get(&h, &s, Some("two words"));
    assert_eq!(
        last(&h).header(headers::REASON),
        Some("container-token-invalid")
    );
    let twice = [
        (container::AUTHORIZATION, POD_TOKEN),
        (container::AUTHORIZATION, POD_TOKEN),
    ];
    let (_f, _) = send(&h, &s, "GET", container::HOST_V4, container::PATH, &twice);
    let r = last(&h);
    assert_eq!(
        (r.status, r.header(headers::REASON)),
        (400, Some("container-token-repeated"))
    );
    let auth = [(container::AUTHORIZATION, POD_TOKEN)];
    for p in [
        "/v1/credentials/",
        "/v1/credentials?x=1",
        "/latest/meta-data/iam/security-credentials/",
        "/",
    ] {
        let (_f, _) = send(&h, &s, "GET", container::HOST_V4, p, &auth);
        assert_eq!(last(&h).status, 404, "{p}");
    }
    let (_f, _) = send(&h, &s, "POST", container::HOST_V4, container::PATH, &auth);
    assert_eq!(last(&h).status, 405);
    assert!(
        h.dispatched.borrow().is_empty(),
        "no call-out for any of these"
    );
    assert_eq!(h.metric(&metrics::request("container", 401)), 3);
    // Another pod's connection: refused before anything else.
    let h = h.property(&["source", "address"], "10.1.0.99:5555");
    let (_f, _) = get(&h, &s, Some(POD_TOKEN));
    let r = last(&h);
    assert_eq!(
        (r.status, r.header(headers::REASON)),
        (403, Some("source-not-pod"))
    );
    assert_eq!(h.metric(&metrics::request("container", 403)), 1);
}

#[test]
fn the_broker_decides_and_the_answer_goes_back_only_to_that_token() {
    let (h, s) = pod();
    let (mut flow, action) = get(&h, &s, Some(POD_TOKEN));
    assert_eq!(action, Action::Pause);
    let call = h.dispatched.borrow().last().cloned().unwrap();
    assert_eq!(call.header(":path"), Some(container::PATH));
    assert_eq!(call.header(container::AUTHORIZATION), Some(POD_TOKEN));
    assert_eq!(call.header(headers::TOKEN), Some("broker-token"));
    assert_eq!(call.header(headers::POD_NAME), Some("myapp"));
    flow.on_callout_response(&h, broker_ok(NOW + 600));
    let r = last(&h);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.text();
    for k in [
        "\"AccessKeyId\"",
        "\"SecretAccessKey\"",
        "\"Token\"",
        "\"AccountId\":\"123456789012\"",
        "\"Expiration\":\"2026-01-01T01:00:00Z\"",
    ] {
        assert!(body.contains(k), "{k} in {body}");
    }
    // Same token within the freshness window: from the cache, no call-out.
    let calls = h.dispatched.borrow().len();
    let (_f, _) = get(&h, &s, Some(POD_TOKEN));
    assert_eq!(last(&h).header(crate::flow::SOURCE_HEADER), Some("cache"));
    assert_eq!(h.dispatched.borrow().len(), calls);
    // Another token never gets that answer: the broker is asked, and refuses it.
    let (mut flow, _) = get(&h, &s, Some(OTHER_TOKEN));
    assert_eq!(h.dispatched.borrow().len(), calls + 1);
    flow.on_callout_response(&h, refused(403, "container-token-other-pod"));
    let r = last(&h);
    assert_eq!(
        (r.status, r.header(headers::REASON)),
        (403, Some("container-token-other-pod"))
    );
    assert!(!r.text().contains("AccessKeyId"));

    // The broker goes down: the pod's own token still gets the still-valid answer, while
    // the verdict holds; another token gets nothing.
    h.advance(10);
    let (mut flow, _) = get(&h, &s, Some(POD_TOKEN));
    flow.on_callout_response(&h, CalloutResponse::default());
    assert_eq!(last(&h).header(crate::flow::SOURCE_HEADER), Some("stale"));
    let (mut flow, _) = get(&h, &s, Some(OTHER_TOKEN));
    flow.on_callout_response(&h, CalloutResponse::default());
    assert_eq!(last(&h).status, 503);
    // Past the verdict (minus staleMinRemainingSeconds): no more stale answers.
    h.advance(300);
    let (mut flow, _) = get(&h, &s, Some(POD_TOKEN));
    flow.on_callout_response(&h, CalloutResponse::default());
    assert_eq!(last(&h).status, 503);
}

#[test]
fn a_refused_pod_token_is_the_applications_answer_not_a_broker_session_retry() {
    let (h, s) = pod();
    let (mut flow, _) = get(&h, &s, Some(POD_TOKEN));
    flow.on_callout_response(&h, refused(401, "container-token-invalid"));
    let r = last(&h);
    assert_eq!(
        (r.status, r.header(headers::REASON)),
        (401, Some("container-token-invalid"))
    );
    assert_eq!(h.metric(metrics::BROKER_TOKEN_RETRIES), 0);
    // A refused token's earlier answer is forgotten.
    let (mut flow, _) = get(&h, &s, Some(POD_TOKEN));
    flow.on_callout_response(&h, broker_ok(NOW + 600));
    h.advance(5);
    let (mut flow2, _) = get(&h, &s, Some(POD_TOKEN));
    flow2.on_callout_response(&h, refused(401, "container-token-invalid"));
    let (mut flow3, _) = get(&h, &s, Some(POD_TOKEN));
    flow3.on_callout_response(&h, CalloutResponse::default());
    assert_eq!(last(&h).status, 503, "no stale answer after a refusal");
    drop(flow);
    // The broker's own 401 for its session token is still retried with a new one.
    let (mut flow, _) = get(&h, &s, Some(POD_TOKEN));
    flow.on_callout_response(&h, refused(401, "token-invalid"));
    assert_eq!(h.metric(metrics::BROKER_TOKEN_RETRIES), 1);
}

#[test]
fn no_verdict_expiry_means_no_reuse() {
    let (h, s) = pod();
    let (mut flow, _) = get(&h, &s, Some(POD_TOKEN));
    flow.on_callout_response(
        &h,
        CalloutResponse {
            token_expires: None,
            ..broker_ok(0)
        },
    );
    assert_eq!(last(&h).status, 200);
    let calls = h.dispatched.borrow().len();
    let (_f, _) = get(&h, &s, Some(POD_TOKEN));
    assert_eq!(
        h.dispatched.borrow().len(),
        calls + 1,
        "asked the broker again"
    );
}
