//! The filter's decisions, end to end through the mock host: every status code the issue
//! names, the token's cross-worker and cross-pod rules, the cache and fail-closed paths.

#[cfg(test)]
mod decisions {

    use std::rc::Rc;

    use meshiam_imds::Credentials;

    use crate::broker_session::{self, BrokerToken};
    use crate::config::{self, Config};
    use crate::flow::{Action, RequestFlow, Shared};
    use crate::host::{CalloutResponse, Host, Level};
    use crate::metrics;
    use crate::mock::MockHost;
    use crate::secret;

    const IMDS: &str = "169.254.169.254";
    const ROLE_LIST: &str = "/latest/meta-data/iam/security-credentials/";
    const CREDS: &str = "/latest/meta-data/iam/security-credentials/myapp-iam-role";
    const NOW: u64 = 1_767_225_600;

    const POD_IP: &str = "10.1.0.7";

    /// The broker token a running sidecar already holds (see `broker_session_*` tests for
    /// how it gets one).
    const BROKER_TOKEN: &str = "broker-session-token-0001";

    /// A pod's sidecar: node metadata as Istio sets it, secret created as on_configure does,
    /// requests from the application (the pod's own address, as an iptables REDIRECT keeps it),
    /// and a broker session already set up.
    fn pod_with(cfg: Config) -> (MockHost, Rc<Shared>) {
        let (h, s) = fresh_pod_with(cfg);
        let t = BrokerToken {
            token: BROKER_TOKEN.into(),
            expiry: NOW + 21_600,
        };
        assert!(broker_session::store(&h, &t));
        (h, s)
    }

    /// A sidecar that has not talked to the broker yet.
    fn fresh_pod_with(cfg: Config) -> (MockHost, Rc<Shared>) {
        let h = MockHost::new()
            .property(&["xds", "node", "metadata", "NAMESPACE"], "default")
            .property(&["xds", "node", "metadata", "NAME"], "myapp-7d9f")
            .property(&["xds", "node", "metadata", "INSTANCE_IPS"], POD_IP)
            .property(&["source", "address"], "10.1.0.7:41234");
        assert_eq!(secret::ensure(&h), Ok(()));
        (h, Rc::new(Shared::new(cfg)))
    }

    fn pod() -> (MockHost, Rc<Shared>) {
        pod_with(Config::default())
    }

    /// Sends one request; returns the flow (for a pending call-out) and the action.
    fn send(
        h: &MockHost,
        s: &Rc<Shared>,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> (RequestFlow, Action) {
        let mut headers = vec![(":method", method), (":path", path), (":authority", IMDS)];
        headers.extend_from_slice(extra);
        h.set_request(&headers);
        let mut flow = RequestFlow::new(s.clone());
        let action = flow.on_request_headers(h);
        (flow, action)
    }

    fn creds_doc(expiration: u64) -> String {
        Credentials {
            access_key_id: "ASIAEXAMPLEKEY".into(),
            secret_access_key: "wJalrXUtnFEMI/SECRET".into(),
            token: "FwoGZXIvYXdzSESSIONTOKEN".into(),
            expiration,
            last_updated: NOW,
        }
        .to_imds_json()
    }

    fn ok(body: &str, ct: &str) -> CalloutResponse {
        CalloutResponse {
            status: Some(200),
            content_type: Some(ct.into()),
            reason: None,
            body: body.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn status(code: u16, reason: &str) -> CalloutResponse {
        CalloutResponse {
            status: Some(code),
            content_type: Some("text/plain".into()),
            reason: Some(reason.into()),
            body: b"short text".to_vec(),
            ..Default::default()
        }
    }

    /// GET through the broker: asserts a call-out was made, feeds `resp`, returns the reply.
    fn via_broker(
        h: &MockHost,
        s: &Rc<Shared>,
        path: &str,
        resp: CalloutResponse,
    ) -> crate::mock::Reply {
        let before = h.dispatched.borrow().len();
        let (mut flow, action) = send(h, s, "GET", path, &[]);
        assert_eq!(action, Action::Pause);
        assert_eq!(
            h.dispatched.borrow().len(),
            before + 1,
            "no call-out for {path}"
        );
        let replies = h.replies.borrow().len();
        flow.on_callout_response(h, resp);
        assert_eq!(
            h.replies.borrow().len(),
            replies + 1,
            "no answer for {path}"
        );
        h.last_reply().unwrap_or_else(|| panic!("no reply"))
    }

    fn local(
        h: &MockHost,
        s: &Rc<Shared>,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> crate::mock::Reply {
        let calls = h.dispatched.borrow().len();
        let (_, action) = send(h, s, method, path, extra);
        assert_eq!(action, Action::Pause);
        assert_eq!(
            h.dispatched.borrow().len(),
            calls,
            "unexpected call-out for {method} {path}"
        );
        h.last_reply()
            .unwrap_or_else(|| panic!("no reply to {method} {path}"))
    }

    fn token(h: &MockHost, s: &Rc<Shared>, ttl: &str) -> String {
        let r = local(
            h,
            s,
            "PUT",
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", ttl)],
        );
        assert_eq!(r.status, 200);
        r.text()
    }

    #[test]
    fn non_metadata_traffic_passes_untouched() {
        let (h, s) = pod();
        h.set_request(&[
            (":method", "POST"),
            (":path", "/latest/meta-data/iam/security-credentials/"),
            (":authority", "api.example.com"),
            ("x-meshiam-pod-name", "x"),
        ]);
        let mut flow = RequestFlow::new(s.clone());
        assert_eq!(flow.on_request_headers(&h), Action::Continue);
        assert!(h.replies.borrow().is_empty());
        assert!(h.dispatched.borrow().is_empty());
        assert!(
            h.metrics.borrow().is_empty(),
            "passthrough must not cost metrics"
        );
        assert_eq!(
            h.property_reads(),
            1,
            "passthrough reads the destination only, never the source or the pod's addresses"
        );
        // Nothing to do when a call-out answer arrives for a passthrough stream.
        flow.on_callout_response(&h, ok("x", "text/plain"));
        assert!(h.replies.borrow().is_empty());
    }

    #[test]
    fn role_list_comes_from_the_broker_bare_and_with_the_filters_identity() {
        let (h, s) = pod();
        let (mut flow, action) = send(
            &h,
            &s,
            "GET",
            "/latest/meta-data/iam/security-credentials/?x=1",
            &[
                ("x-meshiam-pod-name", "someone-else"),
                ("x-meshiam-pod-namespace", "kube-system"),
                ("x-aws-ec2-metadata-token-ttl-seconds", "5"),
                ("authorization", "secret"),
            ],
        );
        assert_eq!(action, Action::Pause);
        let call = h.dispatched.borrow()[0].clone();
        assert_eq!(call.cluster, "meshiam_broker");
        assert_eq!(call.timeout_ms, 2500);
        let names: Vec<&str> = call.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                ":method",
                ":path",
                ":authority",
                ":scheme",
                "x-meshiam-filter",
                "x-meshiam-pod-namespace",
                "x-meshiam-pod-name",
                "x-aws-ec2-metadata-token"
            ]
        );
        // The sidecar's broker token, never the application's.
        assert_eq!(call.header("x-aws-ec2-metadata-token"), Some(BROKER_TOKEN));
        assert_eq!(call.header(":method"), Some("GET"));
        assert_eq!(
            call.header(":path"),
            Some(ROLE_LIST),
            "query string dropped"
        );
        assert_eq!(call.header(":authority"), Some("meshiam-broker"));
        assert_eq!(
            call.header("x-meshiam-filter"),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(call.header("x-meshiam-pod-namespace"), Some("default"));
        assert_eq!(call.header("x-meshiam-pod-name"), Some("myapp-7d9f"));
        flow.on_callout_response(&h, ok("myapp-iam-role\n", "text/plain"));
        let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_deref(), Some(b"myapp-iam-role".as_slice()));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(h.metric("meshiam.requests.role_list.200"), 1);
        assert_eq!(h.metric(metrics::CALLOUTS), 1);
    }

    #[test]
    fn identity_from_config_and_omitted_when_unknown() {
        let cfg = config::parse(
            br#"{"identity":{"source":"config","namespace":"team-a","name":"web-0"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (h, s) = pod_with(cfg);
        send(&h, &s, "GET", ROLE_LIST, &[]);
        let call = h.dispatched.borrow()[0].clone();
        assert_eq!(call.header("x-meshiam-pod-namespace"), Some("team-a"));
        assert_eq!(call.header("x-meshiam-pod-name"), Some("web-0"));

        let h = MockHost::new().property(&["source", "address"], "127.0.0.1:41234");
        let s = Rc::new(Shared::new(Config::default()));
        send(
            &h,
            &s,
            "GET",
            ROLE_LIST,
            &[("x-meshiam-pod-name", "forged")],
        );
        let call = h.dispatched.borrow()[0].clone();
        assert_eq!(call.header("x-meshiam-pod-name"), None);
        assert_eq!(call.header("x-meshiam-pod-namespace"), None);
        assert!(
            h.logs
                .borrow()
                .iter()
                .any(|(_, m)| m.contains("identity unknown"))
        );
    }

    #[test]
    fn credentials_are_relayed_as_json_then_cached_while_fresh() {
        let (h, s) = pod();
        let r = via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-meshiam-source"), Some("broker"));
        let c = Credentials::from_imds_json(&r.text()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.access_key_id, "ASIAEXAMPLEKEY");
        assert_eq!(c.expiration, NOW + 3600);

        // Fresh: answered from the cache by another worker VM, without a call-out.
        let other = h.other_vm();
        h.advance(config::DEFAULT_CACHE_FRESH_SECONDS - 1);
        let r = local(
            &other,
            &s,
            "GET",
            "/2021-03-23/meta-data/iam/security-credentials/myapp-iam-role",
            &[],
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-meshiam-source"), Some("cache"));
        assert_eq!(Credentials::from_imds_json(&r.text()), Ok(c));
        assert_eq!(other.metric(metrics::CACHE_HITS), 1);

        // No longer fresh: asks the broker again.
        h.advance(1);
        via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
    }

    #[test]
    fn iam_info_and_allow_listed_paths_go_to_the_broker() {
        let cfg = config::parse(br#"{"allowPaths":["meta-data/placement/region"]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let (h, s) = pod_with(cfg);
        let info = r#"{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","InstanceProfileArn":"arn:aws:iam::1:instance-profile/x","InstanceProfileId":"AIPA"}"#;
        let r = via_broker(
            &h,
            &s,
            "/latest/meta-data/iam/info",
            ok(info, "application/json"),
        );
        assert_eq!((r.status, r.text().as_str()), (200, info));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let r = via_broker(
            &h,
            &s,
            "/latest/meta-data/placement/region",
            ok("eu-west-1", "text/plain"),
        );
        assert_eq!((r.status, r.text().as_str()), (200, "eu-west-1"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(
            h.dispatched.borrow()[1].header(":path"),
            Some("/latest/meta-data/placement/region")
        );
    }

    #[test]
    fn status_404_for_unknown_extended_and_unlisted_paths() {
        let (h, s) = pod();
        for p in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/iam/security-credentials-extended/myapp-iam-role",
            "/latest/user-data",
            "/latest/meta-data/../iam/security-credentials/",
            "/nope",
        ] {
            let r = local(&h, &s, "GET", p, &[]);
            assert_eq!((r.status, r.text().as_str()), (404, "Not Found"), "{p}");
            assert_eq!(r.header("content-type"), Some("text/plain"));
        }
        assert_eq!(h.metric("meshiam.requests.extended.404"), 1);
        assert_eq!(h.metric("meshiam.requests.other.404"), 2);
    }

    #[test]
    fn broker_refusals_are_relayed() {
        let (h, s) = pod();
        let r = via_broker(&h, &s, ROLE_LIST, status(404, "no-role"));
        assert_eq!((r.status, r.text().as_str()), (404, "short text"));
        let r = via_broker(&h, &s, CREDS, status(403, "identity-mismatch"));
        assert_eq!(r.status, 403);
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert!(
            h.logs
                .borrow()
                .iter()
                .any(|(_, m)| m.contains("identity-mismatch"))
        );
        // Refusals are not cached.
        via_broker(&h, &s, CREDS, status(404, "no-role"));
    }

    #[test]
    fn token_put_issues_a_token_and_echoes_the_ttl() {
        let (h, s) = pod();
        let r = local(
            &h,
            &s,
            "PUT",
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-aws-ec2-metadata-token-ttl-seconds"),
            Some("21600")
        );
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.text().len(), meshiam_imds::token::TOKEN_LEN);
        assert_eq!(h.metric(metrics::TOKENS_ISSUED), 1);
        assert_eq!(h.metric("meshiam.requests.token.200"), 1);
    }

    #[test]
    fn token_put_refusals_400_403_405() {
        let (h, s) = pod();
        let ttl = "x-aws-ec2-metadata-token-ttl-seconds";
        for bad in [None, Some("0"), Some("21601"), Some("abc"), Some("")] {
            let extra: Vec<(&str, &str)> = bad.map(|v| (ttl, v)).into_iter().collect();
            let r = local(&h, &s, "PUT", "/latest/api/token", &extra);
            assert_eq!(
                (r.status, r.text().as_str()),
                (400, "Bad Request"),
                "{bad:?}"
            );
        }
        let r = local(
            &h,
            &s,
            "PUT",
            "/latest/api/token",
            &[(ttl, "60"), ("x-forwarded-for", "10.0.0.1")],
        );
        assert_eq!(r.status, 403);
        let r = local(&h, &s, "PUT", "/2021-03-23/api/token", &[(ttl, "60")]);
        assert_eq!(r.status, 403);
        let r = local(&h, &s, "GET", "/latest/api/token", &[]);
        assert_eq!(r.status, 405);
        for m in ["POST", "DELETE", "PATCH", "PUT"] {
            let r = local(&h, &s, m, CREDS, &[(ttl, "60")]);
            assert_eq!(
                (r.status, r.text().as_str()),
                (405, "Method Not Allowed"),
                "{m}"
            );
        }
        assert!(h.dispatched.borrow().is_empty());
    }

    #[test]
    fn token_is_valid_on_every_worker_vm_of_the_pod_for_its_whole_ttl() {
        let (h, s) = pod();
        let t = token(&h, &s, "60");
        // Another worker VM of the same Envoy: own VM state, same shared data.
        let other = h.other_vm();
        assert_eq!(secret::ensure(&other), Ok(()));
        let s2 = Rc::new(Shared::new(Config::default()));
        h.advance(59);
        let (_, action) = send(
            &other,
            &s2,
            "GET",
            ROLE_LIST,
            &[("x-aws-ec2-metadata-token", &t)],
        );
        assert_eq!(action, Action::Pause);
        assert_eq!(
            other.dispatched.borrow().len(),
            1,
            "valid token must reach the broker"
        );
        assert!(other.replies.borrow().is_empty());
        // Expired: 401.
        h.advance(1);
        let r = local(
            &other,
            &s2,
            "GET",
            ROLE_LIST,
            &[("x-aws-ec2-metadata-token", &t)],
        );
        assert_eq!((r.status, r.text().as_str()), (401, "Unauthorized"));
    }

    #[test]
    fn token_of_another_pod_or_garbage_is_401() {
        let (a, sa) = pod();
        let (b, sb) = pod(); // same names, but another Envoy: another secret
        let t = token(&a, &sa, "600");
        let r = local(
            &b,
            &sb,
            "GET",
            ROLE_LIST,
            &[("x-aws-ec2-metadata-token", &t)],
        );
        assert_eq!(r.status, 401);
        let r = local(
            &a,
            &sa,
            "GET",
            ROLE_LIST,
            &[("x-aws-ec2-metadata-token", "not-a-token")],
        );
        assert_eq!(r.status, 401);
        assert!(b.dispatched.borrow().is_empty() && a.dispatched.borrow().is_empty());
    }

    #[test]
    fn imdsv1_works_unless_imdsv2_is_required() {
        let (h, s) = pod();
        let (_, action) = send(&h, &s, "GET", ROLE_LIST, &[]);
        assert_eq!(action, Action::Pause);
        assert_eq!(h.dispatched.borrow().len(), 1);

        let cfg = config::parse(br#"{"requireImdsv2":true}"#).unwrap_or_else(|e| panic!("{e}"));
        let (h, s) = pod_with(cfg);
        let r = local(&h, &s, "GET", ROLE_LIST, &[]);
        assert_eq!(r.status, 401);
        let r = local(&h, &s, "HEAD", CREDS, &[]);
        assert_eq!((r.status, r.body.clone()), (401, None));
        let t = token(&h, &s, "60");
        let r = local(&h, &s, "GET", CREDS, &[]);
        assert_eq!(r.status, 401, "the token must be sent, it was not");
        let (_, action) = send(
            &h,
            &s,
            "GET",
            ROLE_LIST,
            &[("x-aws-ec2-metadata-token", &t)],
        );
        assert_eq!(action, Action::Pause);
        assert_eq!(h.dispatched.borrow().len(), 1);
    }

    #[test]
    fn head_is_answered_without_a_body() {
        let (h, s) = pod();
        let (mut flow, _) = send(&h, &s, "HEAD", ROLE_LIST, &[]);
        assert_eq!(h.dispatched.borrow()[0].header(":method"), Some("GET"));
        flow.on_callout_response(&h, ok("myapp-iam-role", "text/plain"));
        let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!((r.status, r.body), (200, None));
        let r = local(&h, &s, "HEAD", "/latest/user-data", &[]);
        assert_eq!((r.status, r.body), (404, None));
    }

    #[test]
    fn broker_failures_are_502_503_504_without_cached_credentials() {
        let (h, s) = pod();
        // Each says why: the broker's reason code when it gave one (reduced to safe
        // characters), else the filter's own.
        for (resp, want, reason) in [
            (status(500, "internal"), 502, "internal"),
            (status(502, "sts-failed"), 502, "sts-failed"),
            (status(503, "sts-throttled"), 503, "sts-throttled"),
            (status(503, "sts-unavailable"), 503, "sts-unavailable"),
            (status(504, "sts-timeout"), 504, "sts-timeout"),
            (status(503, "x\nSECRET y"), 503, "xSECRETy"),
            // Envoy's own 503 for a reset call-out carries no reason.
            (status(503, ""), 503, "broker-unavailable"),
            (CalloutResponse::default(), 503, "broker-unavailable"),
            (status(302, "moved"), 502, "broker-bad-answer"),
            (
                ok("{not json", "application/json"),
                502,
                "broker-bad-answer",
            ),
            (
                ok(&creds_doc(NOW - 1), "application/json"),
                502,
                "broker-bad-answer",
            ),
        ] {
            let r = via_broker(&h, &s, CREDS, resp);
            assert_eq!(r.status, want);
            assert_eq!(r.header("content-type"), Some("text/plain"));
            assert_eq!(r.header("x-meshiam-reason"), Some(reason));
            assert!(!r.text().contains("Secret") && !r.text().contains("Access"));
        }
        let r = via_broker(&h, &s, ROLE_LIST, ok("two/roles", "text/plain"));
        assert_eq!(r.status, 502);
        assert_eq!(h.metric(metrics::CALLOUT_FAILURES), 12);
        // A relayed refusal carries the broker's reason too.
        let r = via_broker(&h, &s, CREDS, status(403, "identity-mismatch"));
        assert_eq!(
            (r.status, r.header("x-meshiam-reason")),
            (403, Some("identity-mismatch"))
        );
        // The proxy refuses to start the call-out (no such cluster): 503 at once.
        h.dispatch_fails.set(true);
        let r = local(&h, &s, "GET", CREDS, &[]);
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-meshiam-reason"), Some("broker-unavailable"));
    }

    #[test]
    fn stale_credentials_are_served_while_the_broker_is_down() {
        let (h, s) = pod();
        via_broker(&h, &s, ROLE_LIST, ok("myapp-iam-role", "text/plain"));
        via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
        h.advance(600);
        let r = via_broker(&h, &s, CREDS, CalloutResponse::default());
        assert_eq!(
            (r.status, r.header("x-meshiam-source")),
            (200, Some("stale"))
        );
        assert_eq!(
            Credentials::from_imds_json(&r.text()).map(|c| c.expiration),
            Ok(NOW + 3600)
        );
        let r = via_broker(&h, &s, ROLE_LIST, status(503, "sts-unavailable"));
        assert_eq!((r.status, r.text().as_str()), (200, "myapp-iam-role"));
        assert_eq!(h.metric(metrics::STALE_SERVES), 2);
        // 5 minutes or less left: not served, fail closed.
        h.advance(3600 - 600 - 300);
        let r = via_broker(&h, &s, CREDS, status(504, "timeout"));
        assert_eq!(r.status, 504);
        let r = via_broker(&h, &s, ROLE_LIST, CalloutResponse::default());
        assert_eq!(r.status, 503);
        // A broker refusal is never overridden by the cache.
        h.advance(0);
        let r = via_broker(&h, &s, CREDS, status(403, "identity-mismatch"));
        assert_eq!(r.status, 403);
    }

    #[test]
    fn stale_is_only_for_credentials_of_that_role() {
        let cfg = config::parse(
            br#"{"allowPaths":["meta-data/placement/region"],"cacheFreshSeconds":0}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (h, s) = pod_with(cfg);
        via_broker(
            &h,
            &s,
            "/latest/meta-data/placement/region",
            ok("eu-west-1", "text/plain"),
        );
        via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
        let r = via_broker(
            &h,
            &s,
            "/latest/meta-data/placement/region",
            CalloutResponse::default(),
        );
        assert_eq!(r.status, 503);
        let r = via_broker(
            &h,
            &s,
            "/latest/meta-data/iam/security-credentials/other-role",
            CalloutResponse::default(),
        );
        assert_eq!(r.status, 503);
        // cacheFreshSeconds 0: every request asks the broker, and stale still works.
        let r = via_broker(&h, &s, CREDS, CalloutResponse::default());
        assert_eq!(r.status, 200);
    }

    #[test]
    fn logs_never_contain_credentials_tokens_or_secrets() {
        let (h, s) = pod();
        let t = token(&h, &s, "60");
        via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
        h.advance(30);
        via_broker(
            &h,
            &s,
            CREDS,
            ok(
                "{\"AccessKeyId\":\"ASIALEAK\",\"SecretAccessKey\":\"LEAKSECRET\"}",
                "application/json",
            ),
        );
        via_broker(&h, &s, CREDS, status(500, "x\nSECRETREASON"));
        local(
            &h,
            &s,
            "GET",
            ROLE_LIST,
            &[("x-aws-ec2-metadata-token", "bad-token-value")],
        );
        // The broker session: a 401, a new token, a refused token answer.
        let (mut flow, _) = send(&h, &s, "GET", ROLE_LIST, &[]);
        flow.on_callout_response(&h, status(401, "token-invalid"));
        flow.on_callout_response(&h, broker_token_answer("fresh-broker-token"));
        flow.on_callout_response(&h, status(401, "token-invalid"));
        let (mut flow, _) = send(&h, &s, "GET", ROLE_LIST, &[]);
        flow.on_callout_response(&h, broker_token_answer("broken broker token"));
        let (secret_bytes, _) = h.shared_get(secret::KEY);
        let secret_hex: String = secret_bytes
            .unwrap_or_default()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for (_, line) in h.logs.borrow().iter() {
            for needle in [
                t.as_str(),
                "wJalr",
                "SESSIONTOKEN",
                "LEAKSECRET",
                "ASIALEAK",
                "bad-token-value",
                BROKER_TOKEN,
                "fresh-broker-token",
                "broken",
                &secret_hex[..16],
                "\n",
            ] {
                assert!(!line.contains(needle), "log line leaks {needle:?}: {line}");
            }
        }
        assert!(!h.logs.borrow().is_empty());
    }

    /// The same sidecar, seen from a connection that came from `addr`.
    fn from(h: &MockHost, addr: &str) -> MockHost {
        let h = h.other_vm().property(&["source", "address"], addr);
        assert_eq!(secret::ensure(&h), Ok(()));
        h
    }

    #[test]
    fn only_the_pod_itself_is_answered() {
        let (h, s) = pod();
        // Another pod, the node, Istio's inbound passthrough: 403, no token, no call-out.
        for addr in [
            "10.1.0.8:50000",
            "10.1.0.1:50000",
            "127.0.0.6:50000",
            "[fd00::8]:1",
        ] {
            let other = from(&h, addr);
            for (method, path, extra) in [
                ("GET", CREDS, vec![]),
                ("GET", ROLE_LIST, vec![]),
                ("GET", "/latest/meta-data/iam/info", vec![]),
                ("GET", "/latest/meta-data/placement/region", vec![]),
                (
                    "PUT",
                    "/latest/api/token",
                    vec![("x-aws-ec2-metadata-token-ttl-seconds", "60")],
                ),
            ] {
                let r = local(&other, &s, method, path, &extra);
                assert_eq!(
                    (r.status, r.text().as_str()),
                    (403, "metadata is answered only to the pod itself"),
                    "{addr} {method} {path}"
                );
                assert_eq!(r.header("x-meshiam-reason"), Some("source-not-pod"));
                assert_eq!(r.header("content-type"), Some("text/plain"));
                assert_eq!(r.header("x-meshiam-source"), None);
            }
            assert!(other.dispatched.borrow().is_empty(), "{addr}");
            assert_eq!(other.metric(metrics::SOURCE_REFUSALS), 5, "{addr}");
            assert_eq!(other.metric(metrics::TOKENS_ISSUED), 0, "{addr}");
            assert_eq!(other.metric("meshiam.requests.credentials.403"), 1);
            assert_eq!(other.metric("meshiam.requests.token.403"), 1);
            let logs = other.logs.borrow();
            let warned = logs
                .iter()
                .filter(|(l, m)| *l == Level::Warn && m.contains("refused (source-not-pod)"))
                .count();
            assert_eq!(warned, 5, "{addr}: {logs:?}");
        }
        // A HEAD is refused without a body.
        let other = from(&h, "10.1.0.8:50000");
        let r = local(&other, &s, "HEAD", CREDS, &[]);
        assert_eq!((r.status, r.body), (403, None));
        // The pod itself, by its address and by loopback: served.
        for addr in ["10.1.0.7:50000", "127.0.0.1:50000", "[::1]:50000"] {
            let me = from(&h, addr);
            let (_, action) = send(&me, &s, "GET", CREDS, &[]);
            assert_eq!(action, Action::Pause);
            assert_eq!(me.dispatched.borrow().len(), 1, "{addr}");
            assert_eq!(me.metric(metrics::SOURCE_REFUSALS), 0);
        }
    }

    #[test]
    fn a_cached_answer_or_a_token_of_the_pod_does_not_help_another_source() {
        let (h, s) = pod();
        let t = token(&h, &s, "600");
        via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
        let other = from(&h, "10.1.0.8:50000");
        let r = local(
            &other,
            &s,
            "GET",
            CREDS,
            &[("x-aws-ec2-metadata-token", &t)],
        );
        assert_eq!(r.status, 403);
        assert!(!r.text().contains("ASIA"));
        assert_eq!(other.metric(metrics::CACHE_HITS), 0);
        // The pod itself still gets the cached answer.
        let r = local(&h, &s, "GET", CREDS, &[("x-aws-ec2-metadata-token", &t)]);
        assert_eq!(
            (r.status, r.header("x-meshiam-source")),
            (200, Some("cache"))
        );
    }

    fn last_call(h: &MockHost) -> crate::mock::Dispatched {
        h.dispatched
            .borrow()
            .last()
            .cloned()
            .unwrap_or_else(|| panic!("no call-out"))
    }

    fn broker_token_answer(token: &str) -> CalloutResponse {
        CalloutResponse {
            status: Some(200),
            content_type: Some("text/plain".into()),
            reason: None,
            body: token.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn broker_session_is_fetched_once_and_shared_by_every_vm() {
        let (h, s) = fresh_pod_with(Config::default());
        let (mut flow, action) = send(&h, &s, "GET", ROLE_LIST, &[]);
        assert_eq!(action, Action::Pause);
        let put = last_call(&h);
        assert_eq!(put.header(":method"), Some("PUT"));
        assert_eq!(put.header(":path"), Some("/latest/api/token"));
        assert_eq!(
            put.header("x-aws-ec2-metadata-token-ttl-seconds"),
            Some("21600")
        );
        assert_eq!(put.header("x-meshiam-pod-namespace"), Some("default"));
        assert_eq!(put.header("x-meshiam-pod-name"), Some("myapp-7d9f"));
        assert_eq!(put.header("x-aws-ec2-metadata-token"), None);
        assert!(h.replies.borrow().is_empty(), "no answer before the read");
        flow.on_callout_response(&h, broker_token_answer("tok-A\n"));
        let read = last_call(&h);
        assert_eq!(read.header(":method"), Some("GET"));
        assert_eq!(read.header(":path"), Some(ROLE_LIST));
        assert_eq!(read.header("x-aws-ec2-metadata-token"), Some("tok-A"));
        flow.on_callout_response(&h, ok("myapp-iam-role", "text/plain"));
        let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
        assert_eq!((r.status, r.text().as_str()), (200, "myapp-iam-role"));

        // Every later read of every worker VM uses that token: one call-out per read.
        let other = h.other_vm();
        h.advance(3600);
        for vm in [&h, &other] {
            let before = vm.dispatched.borrow().len();
            let (mut flow, _) = send(vm, &s, "GET", CREDS, &[]);
            assert_eq!(vm.dispatched.borrow().len(), before + 1);
            assert_eq!(
                last_call(vm).header("x-aws-ec2-metadata-token"),
                Some("tok-A")
            );
            flow.on_callout_response(vm, ok(&creds_doc(NOW + 7200), "application/json"));
            assert_eq!(vm.last_reply().map(|r| r.status), Some(200));
            h.advance(60);
        }
        assert_eq!(h.metric(metrics::BROKER_TOKENS), 1);
        assert_eq!(other.metric(metrics::BROKER_TOKENS), 0);
    }

    #[test]
    fn broker_session_is_renewed_five_minutes_before_expiry() {
        let (h, s) = pod();
        h.advance(21_600 - 301);
        let (mut flow, _) = send(&h, &s, "GET", ROLE_LIST, &[]);
        assert_eq!(
            last_call(&h).header("x-aws-ec2-metadata-token"),
            Some(BROKER_TOKEN)
        );
        flow.on_callout_response(&h, ok("myapp-iam-role", "text/plain"));
        h.advance(1);
        let (mut flow, _) = send(&h, &s, "GET", CREDS, &[]);
        assert_eq!(last_call(&h).header(":method"), Some("PUT"));
        flow.on_callout_response(&h, broker_token_answer("tok-B"));
        assert_eq!(
            last_call(&h).header("x-aws-ec2-metadata-token"),
            Some("tok-B")
        );
        flow.on_callout_response(&h, ok(&creds_doc(NOW + 21_600 + 3600), "application/json"));
        assert_eq!(h.last_reply().map(|r| r.status), Some(200));
        assert_eq!(
            broker_session::current(&h).map(|t| t.token),
            Some("tok-B".to_string())
        );
    }

    #[test]
    fn unknown_or_forwarded_sources_and_unknown_pod_addresses_fail_closed() {
        let (h, s) = pod();
        for (addr, reason) in [
            ("", "source-unknown"),
            ("envoy://internal_client_address/", "source-unknown"),
        ] {
            let other = from(&h, addr);
            let r = local(&other, &s, "GET", CREDS, &[]);
            assert_eq!(
                (r.status, r.header("x-meshiam-reason")),
                (403, Some(reason))
            );
            assert!(
                other
                    .logs
                    .borrow()
                    .iter()
                    .any(|(_, m)| m.contains("from unknown refused"))
            );
        }
        // With use_remote_address: false Envoy takes the source from X-Forwarded-For.
        let other = from(&h, "127.0.0.1:0");
        let r = local(
            &other,
            &s,
            "GET",
            CREDS,
            &[("x-forwarded-for", "127.0.0.1")],
        );
        assert_eq!(
            (r.status, r.header("x-meshiam-reason")),
            (403, Some("source-forwarded"))
        );
        // A connection's own source, with an unrelated X-Forwarded-For: served; a token PUT
        // with it is refused as IMDS does.
        let (_, action) = send(&h, &s, "GET", CREDS, &[("x-forwarded-for", "192.0.2.1")]);
        assert_eq!(action, Action::Pause);
        assert_eq!(h.dispatched.borrow().len(), 1);
        let r = local(
            &h,
            &s,
            "PUT",
            "/latest/api/token",
            &[
                ("x-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("x-forwarded-for", "192.0.2.1"),
            ],
        );
        assert_eq!(
            (r.status, r.header("x-meshiam-reason")),
            (403, Some("forwarded-token-request"))
        );

        // No INSTANCE_IPS and no podIps: loopback only, and one warning.
        let h = MockHost::new()
            .property(&["xds", "node", "metadata", "NAMESPACE"], "default")
            .property(&["xds", "node", "metadata", "NAME"], "myapp-7d9f")
            .property(&["source", "address"], "10.1.0.7:41234");
        assert_eq!(secret::ensure(&h), Ok(()));
        let s = Rc::new(Shared::new(Config::default()));
        for _ in 0..2 {
            let r = local(&h, &s, "GET", CREDS, &[]);
            assert_eq!(
                (r.status, r.header("x-meshiam-reason")),
                (403, Some("pod-ips-unknown"))
            );
        }
        let unknown = h
            .logs
            .borrow()
            .iter()
            .filter(|(_, m)| m.contains("addresses are unknown"))
            .count();
        assert_eq!(unknown, 1);
        let lo = from(&h, "127.0.0.1:41234");
        send(&lo, &s, "GET", CREDS, &[]);
        assert_eq!(lo.dispatched.borrow().len(), 1);

        // podIps in the plugin config overrides INSTANCE_IPS.
        let cfg = config::parse(br#"{"podIps":["10.9.9.9"]}"#).unwrap_or_else(|e| panic!("{e}"));
        let (h, s) = pod_with(cfg);
        let r = local(&h, &s, "GET", CREDS, &[]);
        assert_eq!(r.header("x-meshiam-reason"), Some("source-not-pod"));
        let me = from(&h, "10.9.9.9:5");
        send(&me, &s, "GET", CREDS, &[]);
        assert_eq!(me.dispatched.borrow().len(), 1);
    }

    #[test]
    fn broker_401_means_a_new_token_and_one_retry() {
        let (h, s) = pod();
        let (mut flow, _) = send(&h, &s, "GET", CREDS, &[]);
        flow.on_callout_response(&h, status(401, "token-invalid"));
        // The old token is gone; a new one is asked for, then the read again.
        assert_eq!(broker_session::current(&h), None);
        assert_eq!(last_call(&h).header(":method"), Some("PUT"));
        assert!(h.replies.borrow().is_empty());
        flow.on_callout_response(&h, broker_token_answer("tok-new"));
        assert_eq!(
            last_call(&h).header("x-aws-ec2-metadata-token"),
            Some("tok-new")
        );
        flow.on_callout_response(&h, ok(&creds_doc(NOW + 3600), "application/json"));
        let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
        assert_eq!(
            (r.status, r.header("x-meshiam-source")),
            (200, Some("broker"))
        );
        assert_eq!(h.dispatched.borrow().len(), 3);
        assert_eq!(h.metric(metrics::BROKER_TOKEN_RETRIES), 1);

        // A second 401 right after a fresh token is a broker failure: still-valid cached
        // credentials, else fail closed; never a loop, never relayed as the app's 401.
        h.advance(600);
        let (mut flow, _) = send(&h, &s, "GET", CREDS, &[]);
        flow.on_callout_response(&h, status(401, "token-invalid"));
        flow.on_callout_response(&h, broker_token_answer("tok-newer"));
        flow.on_callout_response(&h, status(401, "token-invalid"));
        let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
        assert_eq!(
            (r.status, r.header("x-meshiam-source")),
            (200, Some("stale"))
        );
        assert_eq!(h.dispatched.borrow().len(), 6, "one retry only");

        let (h, s) = pod();
        let (mut flow, _) = send(&h, &s, "GET", ROLE_LIST, &[]);
        flow.on_callout_response(&h, status(401, "token-invalid"));
        flow.on_callout_response(&h, broker_token_answer("tok-x"));
        flow.on_callout_response(&h, status(401, "token-invalid"));
        assert_eq!(h.last_reply().map(|r| r.status), Some(502));
        assert_eq!(h.dispatched.borrow().len(), 3);
    }

    #[test]
    fn a_failed_broker_token_is_a_failed_callout() {
        // Credentials cached while the broker was up, then the session is gone (say the
        // sidecar restarted its VMs) and the broker is down.
        let (h, s) = pod();
        via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
        for (resp, stale_status) in [
            (CalloutResponse::default(), 200),
            (status(503, "sts-unavailable"), 200),
            (status(500, "boom"), 200),
            (status(400, "bad-token-ttl"), 200),
            (broker_token_answer("not a token"), 200),
        ] {
            broker_session::forget(&h, BROKER_TOKEN);
            h.advance(60);
            let (mut flow, _) = send(&h, &s, "GET", CREDS, &[]);
            assert_eq!(last_call(&h).header(":method"), Some("PUT"));
            flow.on_callout_response(&h, resp);
            let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
            assert_eq!(
                (r.status, r.header("x-meshiam-source")),
                (stale_status, Some("stale"))
            );
            assert_eq!(
                last_call(&h).header(":method"),
                Some("PUT"),
                "no read without a token"
            );
        }
        // Nothing cached: fail closed with the failure's status.
        let (h, s) = fresh_pod_with(Config::default());
        for (resp, want) in [
            (CalloutResponse::default(), 503),
            (status(504, "timeout"), 504),
            (status(400, "bad-token-ttl"), 502),
        ] {
            let (mut flow, _) = send(&h, &s, "GET", CREDS, &[]);
            flow.on_callout_response(&h, resp);
            let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
            assert_eq!(r.status, want);
            assert!(!r.text().contains("Access"));
        }
        // A broker that will not identify the pod says so to the application, as it would
        // for the read; the cache does not override it.
        let (h, s) = pod();
        via_broker(
            &h,
            &s,
            CREDS,
            ok(&creds_doc(NOW + 3600), "application/json"),
        );
        broker_session::forget(&h, BROKER_TOKEN);
        h.advance(60);
        let (mut flow, _) = send(&h, &s, "GET", CREDS, &[]);
        flow.on_callout_response(&h, status(403, "unknown-pod"));
        let r = h.last_reply().unwrap_or_else(|| panic!("no reply"));
        assert_eq!((r.status, r.text().as_str()), (403, "short text"));
        // The proxy refuses to start the token call-out: 503 (or stale), at once.
        let (h, s) = fresh_pod_with(Config::default());
        h.dispatch_fails.set(true);
        let r = local(&h, &s, "GET", CREDS, &[]);
        assert_eq!(r.status, 503);
    }

    #[test]
    fn the_apps_token_is_checked_here_and_never_sent_to_the_broker() {
        let cfg = config::parse(br#"{"requireImdsv2":true}"#).unwrap_or_else(|e| panic!("{e}"));
        let (h, s) = pod_with(cfg);
        let app = token(&h, &s, "60");
        let (_, _) = send(&h, &s, "GET", CREDS, &[("x-aws-ec2-metadata-token", &app)]);
        let call = last_call(&h);
        assert_eq!(call.header("x-aws-ec2-metadata-token"), Some(BROKER_TOKEN));
        assert!(call.headers.iter().all(|(_, v)| v != &app));
    }

    #[test]
    fn callout_answer_without_a_pending_request_is_ignored() {
        let (h, s) = pod();
        let mut flow = RequestFlow::new(s);
        flow.on_callout_response(&h, ok("x", "text/plain"));
        assert!(h.replies.borrow().is_empty());
    }

    const FRESH: u64 = config::DEFAULT_CACHE_FRESH_SECONDS;

    /// Role list and credentials of `myapp-iam-role` in the sidecar cache, then past freshness.
    fn cached_then_due(h: &MockHost, s: &Rc<Shared>) {
        via_broker(h, s, ROLE_LIST, ok("myapp-iam-role", "text/plain"));
        via_broker(h, s, CREDS, ok(&creds_doc(NOW + 3600), "application/json"));
        h.advance(FRESH);
    }

    #[test]
    fn default_freshness_lets_a_role_change_through_within_5_seconds() {
        let fresh = Config::default().cache_fresh_seconds;
        assert!(fresh <= 4, "cacheFreshSeconds default {fresh}");
        let (h, s) = pod();
        cached_then_due(&h, &s);
        // The annotation now names another role: the broker says so at the next call-out.
        let r = via_broker(&h, &s, ROLE_LIST, ok("new-role", "text/plain"));
        assert_eq!((r.status, r.text().as_str()), (200, "new-role"));
        let r = local(&h, &s, "GET", ROLE_LIST, &[]);
        assert_eq!(
            (r.text().as_str(), r.header("x-meshiam-source")),
            ("new-role", Some("cache"))
        );
        // The old role's credentials went with the old list: a broker outage cannot bring
        // them back.
        let r = via_broker(&h, &s, CREDS, CalloutResponse::default());
        assert_eq!(r.status, 503);
        assert!(!r.text().contains("AccessKeyId"));
    }

    #[test]
    fn a_removed_role_is_forgotten_and_never_served_stale() {
        let (h, s) = pod();
        cached_then_due(&h, &s);
        let r = via_broker(&h, &s, ROLE_LIST, status(404, "no-role"));
        assert_eq!(r.status, 404);
        // Broker down now: neither the list nor the credentials come back from the cache.
        let r = via_broker(&h, &s, ROLE_LIST, CalloutResponse::default());
        assert_eq!(r.status, 503);
        let r = via_broker(&h, &s, CREDS, status(503, "sts-unavailable"));
        assert_eq!(r.status, 503);
        assert_eq!(h.metric(metrics::STALE_SERVES), 0);
    }

    #[test]
    fn refused_credentials_are_forgotten_with_the_list_that_named_them() {
        let (h, s) = pod();
        cached_then_due(&h, &s);
        let r = via_broker(&h, &s, CREDS, status(403, "role-not-permitted"));
        assert_eq!(r.status, 403);
        // The list named that role: it goes too, so the next list asks the broker.
        let r = via_broker(&h, &s, ROLE_LIST, CalloutResponse::default());
        assert_eq!(r.status, 503);
        let r = via_broker(&h, &s, CREDS, CalloutResponse::default());
        assert_eq!(r.status, 503);
    }

    #[test]
    fn load_refusals_keep_the_cache_for_an_outage() {
        let (h, s) = pod();
        cached_then_due(&h, &s);
        let r = via_broker(&h, &s, CREDS, status(429, "rate-limited"));
        assert_eq!(r.status, 429);
        let r = via_broker(&h, &s, CREDS, CalloutResponse::default());
        assert_eq!(
            (r.status, r.header("x-meshiam-source")),
            (200, Some("stale"))
        );
    }

    #[test]
    fn stale_credentials_only_for_the_role_the_cached_list_names() {
        let (h, s) = pod();
        cached_then_due(&h, &s);
        // The cached list names another role (as a write racing ours could leave it) while
        // the old role's credentials are still cached.
        let list = crate::cache::Entry {
            fetched: NOW,
            expiration: 0,
            content_type: "text/plain".into(),
            body: b"new-role".to_vec(),
        };
        assert!(crate::cache::put(
            &h,
            &meshiam_imds::Resource::RoleList,
            &list
        ));
        let r = via_broker(&h, &s, CREDS, CalloutResponse::default());
        assert_eq!(r.status, 503);
    }

    #[test]
    fn only_the_exact_token_path_issues_tokens() {
        let (h, s) = pod();
        let ttl = "x-aws-ec2-metadata-token-ttl-seconds";
        for p in [
            "/latest/api/token/",
            "/latest/api/token?x=1",
            "/latest/api/token?",
        ] {
            let r = local(&h, &s, "PUT", p, &[(ttl, "60")]);
            assert_eq!((r.status, r.text().as_str()), (404, "Not Found"), "{p}");
            assert_eq!(r.header("x-meshiam-reason"), Some("invalid-path"), "{p}");
            assert_eq!(r.header(ttl), None, "{p}");
        }
        assert_eq!(h.metric(metrics::TOKENS_ISSUED), 0);
        assert_eq!(
            local(&h, &s, "PUT", "/latest/api/token", &[(ttl, "60")]).status,
            200
        );
    }

    #[test]
    fn credentials_path_with_a_trailing_slash_is_404_without_a_callout() {
        let (h, s) = pod();
        let r = local(&h, &s, "GET", &format!("{CREDS}/"), &[]);
        assert_eq!((r.status, r.text().as_str()), (404, "Not Found"));
        let r = local(&h, &s, "GET", "/latest/meta-data/iam/info/", &[]);
        assert_eq!(r.status, 404);
        assert!(h.dispatched.borrow().is_empty());
    }

    #[test]
    fn a_repeated_ttl_or_token_header_is_400() {
        let (h, s) = pod();
        let ttl = "x-aws-ec2-metadata-token-ttl-seconds";
        let r = local(
            &h,
            &s,
            "PUT",
            "/latest/api/token",
            &[(ttl, "60"), (ttl, "99999")],
        );
        assert_eq!((r.status, r.text().as_str()), (400, "Bad Request"));
        assert_eq!(r.header("x-meshiam-reason"), Some("repeated-imds-header"));
        let r = local(
            &h,
            &s,
            "PUT",
            "/latest/api/token",
            &[(ttl, "60"), (ttl, "60")],
        );
        assert_eq!(r.status, 400);
        assert_eq!(h.metric(metrics::TOKENS_ISSUED), 0);
        let t = token(&h, &s, "60");
        let tok = "x-aws-ec2-metadata-token";
        let r = local(&h, &s, "GET", ROLE_LIST, &[(tok, &t), (tok, "junk")]);
        assert_eq!(r.status, 400);
        let r = local(&h, &s, "GET", ROLE_LIST, &[(tok, &t), (tok, &t)]);
        assert_eq!(r.status, 400);
        assert!(h.dispatched.borrow().is_empty());
        // One token is one token.
        let r = via_broker(&h, &s, ROLE_LIST, ok("myapp-iam-role", "text/plain"));
        assert_eq!(r.status, 200);
        let _ = send(&h, &s, "GET", ROLE_LIST, &[(tok, &t)]);
        assert_eq!(h.last_reply().map(|r| r.status), Some(200));
    }

    #[test]
    fn the_whole_header_map_is_read_only_for_token_puts_and_tokened_reads() {
        let (h, s) = pod();
        via_broker(&h, &s, ROLE_LIST, ok("myapp-iam-role", "text/plain"));
        local(&h, &s, "GET", ROLE_LIST, &[]);
        assert_eq!(
            h.header_map_reads(),
            0,
            "IMDSv1 reads read single headers only"
        );
        let t = token(&h, &s, "60");
        assert_eq!(h.header_map_reads(), 1);
        local(
            &h,
            &s,
            "GET",
            ROLE_LIST,
            &[("x-aws-ec2-metadata-token", &t)],
        );
        assert_eq!(h.header_map_reads(), 2);
    }
}

/// A VM without a valid configuration refuses metadata requests instead of letting them
/// through (issue 12: `Http { flow: None }` answered `Continue`).
#[cfg(test)]
mod unconfigured {
    use crate::flow::{self, Action, NOT_CONFIGURED_REASON};
    use crate::mock::MockHost;

    #[test]
    fn metadata_is_refused_and_other_traffic_passes() {
        let h = MockHost::new();
        for host in ["169.254.169.254", "[fd00:ec2::254]", "169.254.169.254:80"] {
            h.set_request(&[
                (":method", "GET"),
                (":path", "/latest/meta-data/iam/security-credentials/"),
                (":authority", host),
            ]);
            assert_eq!(flow::unconfigured(&h), Action::Pause, "{host}");
            let r = h.last_reply().expect("a refusal");
            assert_eq!(r.status, 503);
            assert_eq!(r.header("x-meshiam-reason"), Some(NOT_CONFIGURED_REASON));
        }
        assert!(
            h.dispatched.borrow().is_empty(),
            "no call-out without config"
        );
        let replies = h.replies.borrow().len();
        h.set_request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "example.com"),
        ]);
        assert_eq!(flow::unconfigured(&h), Action::Continue);
        assert_eq!(
            h.replies.borrow().len(),
            replies,
            "ordinary traffic untouched"
        );
    }
}
