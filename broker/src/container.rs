//! The container-credentials door (`GET /v1/credentials`, EKS Pod Identity's endpoint): the
//! token rule.
//!
//! The caller is still its TCP source address. On top of that, the request must carry the
//! pod's own projected service-account token in `Authorization`, with the configured
//! audience (`--container-token-audience`, default `meshiam`). The broker asks the Kubernetes
//! API (TokenReview) whether the token is valid for that audience and whom it names, and
//! accepts it only when it is bound to the pod at the caller's address (same namespace,
//! service account, pod name and pod UID). What that protects: a process that can reach the
//! door (an SSRF through the application, anything on the pod's network that is not the pod)
//! but cannot read the pod's token file gets nothing, and a token copied out of another pod
//! is refused here.
//!
//! Verdicts are cached by the token's SHA-256 (the token itself is never stored, logged or
//! compared in the clear): an accepted token until its `exp` (read from the JWT, unverified —
//! the API server verified it) but at most [`MAX_ACCEPTED_FOR`], a refused one for
//! [`REFUSED_FOR`]; failures to get a verdict are not cached.
//!
//! A flood of made-up tokens must not become a flood of API calls: a token that is not
//! shaped like a JWT is refused without asking, and each pod gets at most
//! [`REVIEWS_PER_POD`] uncached reviews per [`REVIEW_WINDOW`] seconds (past them `429
//! token-review-limit`). A pod's real token is reviewed once and then cached, so a pod that
//! only sends its own token never comes near the budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use meshiam_imds::container::token_digest;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::pods::Pod;

/// `--container-token-audience`'s default.
pub const DEFAULT_AUDIENCE: &str = "meshiam";
/// The longest an accepted token's verdict is reused without asking the API server again
/// (a deleted pod's token stays refused by the pod check meanwhile: its UID is gone).
pub const MAX_ACCEPTED_FOR: u64 = 600;
/// How long a refused token's verdict is reused (keeps a pod sending junk from turning each
/// request into an API call).
pub const REFUSED_FOR: u64 = 10;
/// An accepted token whose `exp` cannot be read is reused this long.
const UNKNOWN_EXP_FOR: u64 = 60;
/// Verdicts kept at most (expired ones are dropped first, then all).
const MAX_VERDICTS: usize = 4096;
/// Uncached reviews a pod may cause per [`REVIEW_WINDOW`] seconds.
pub const REVIEWS_PER_POD: u32 = 5;
/// The window of [`REVIEWS_PER_POD`], in seconds.
pub const REVIEW_WINDOW: u64 = 10;
/// The longest wait for the API server's verdict: under the filter's call-out timeout.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(2);

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Whom an accepted token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    /// `(name, uid)` for a pod-bound token (every projected token is).
    pub pod: Option<(String, String)>,
    /// Unix seconds the verdict holds until.
    pub until: u64,
}

/// A verdict on a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(Reviewed),
    /// Not a valid token for the audience; the API server's reason (never the token).
    Refused(String),
}

/// Why a token is not the calling pod's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("no Authorization token")]
    TokenMissing,
    #[error("Authorization sent more than once")]
    TokenRepeated,
    #[error("token refused by TokenReview: {0}")]
    TokenInvalid(String),
    #[error("token is for {token} but the caller is pod {pod}")]
    OtherPod { token: String, pod: String },
    #[error("token of {0} is not bound to a pod")]
    Unbound(String),
    #[error("no token verdict: {0}")]
    ReviewUnavailable(String),
    #[error("more than {REVIEWS_PER_POD} new tokens from this pod in {REVIEW_WINDOW} s")]
    ReviewLimit,
}

impl ContainerError {
    pub fn reason(&self) -> &'static str {
        match self {
            ContainerError::TokenMissing => "container-token-missing",
            ContainerError::TokenRepeated => "container-token-repeated",
            ContainerError::TokenInvalid(_) => "container-token-invalid",
            ContainerError::OtherPod { .. } => "container-token-other-pod",
            ContainerError::Unbound(_) => "container-token-unbound",
            ContainerError::ReviewUnavailable(_) => "token-review-unavailable",
            ContainerError::ReviewLimit => "token-review-limit",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ContainerError::TokenMissing | ContainerError::TokenInvalid(_) => 401,
            ContainerError::TokenRepeated => 400,
            ContainerError::OtherPod { .. } | ContainerError::Unbound(_) => 403,
            ContainerError::ReviewUnavailable(_) => 503,
            ContainerError::ReviewLimit => 429,
        }
    }
}

/// Who answers "is this token valid, and whose is it".
#[derive(Clone)]
pub enum Reviewer {
    /// The Kubernetes API (`--pod-source kube`).
    Kube(kube::Client),
    /// Nobody: every container-credentials request is refused `503
    /// token-review-unavailable` (`--pod-source file` has no API server to ask).
    None,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reviewer::Kube(_) => "Reviewer::Kube",
            Reviewer::None => "Reviewer::None",
        })
    }
}

/// The token rule of the container-credentials door, with its verdict cache.
#[derive(Debug)]
pub struct ContainerAuth {
    pub audience: String,
    reviewer: Reviewer,
    verdicts: Mutex<HashMap<String, (Verdict, u64)>>,
    /// Uncached reviews per pod UID: (window start, reviews in it).
    budgets: Mutex<HashMap<String, (u64, u32)>>,
}

impl ContainerAuth {
    pub fn new(audience: impl Into<String>, reviewer: Reviewer) -> Self {
        Self {
            audience: audience.into(),
            reviewer,
            verdicts: Mutex::new(HashMap::new()),
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// No reviewer: the door is shut (503 token-review-unavailable).
    pub fn disabled() -> Self {
        Self::new(DEFAULT_AUDIENCE, Reviewer::None)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Verdict, u64)>> {
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one of the pod's uncached reviews, or says the budget is spent.
    fn spend(&self, pod_uid: &str, now: u64) -> Result<(), ContainerError> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if budgets.len() >= MAX_VERDICTS {
            budgets.retain(|_, (start, _)| now < start.saturating_add(REVIEW_WINDOW));
        }
        let (start, used) = budgets.entry(pod_uid.to_string()).or_insert((now, 0));
        if now >= start.saturating_add(REVIEW_WINDOW) {
            (*start, *used) = (now, 0);
        }
        if *used >= REVIEWS_PER_POD {
            return Err(ContainerError::ReviewLimit);
        }
        *used += 1;
        Ok(())
    }

    /// The verdict on `token` sent by the pod `pod_uid` (cached, or from the API server).
    pub async fn review(
        &self,
        token: &str,
        pod_uid: &str,
        clock: &Clock,
        metrics: &Metrics,
    ) -> Result<Verdict, ContainerError> {
        let key = token_digest(token);
        let now = clock.now();
        if let Some((v, _)) = self.lock().get(&key).filter(|(_, u)| *u > now).cloned() {
            metrics.token_review("cached");
            return Ok(v);
        }
        if !jwt_shaped(token) {
            metrics.token_review("malformed");
            return Ok(Verdict::Refused("not a JSON Web Token".into()));
        }
        if let Err(e) = self.spend(pod_uid, now) {
            metrics.token_review("limited");
            return Err(e);
        }
        let client = match &self.reviewer {
            Reviewer::Kube(c) => c.clone(),
            Reviewer::None => {
                metrics.token_review("error");
                return Err(ContainerError::ReviewUnavailable(
                    "no Kubernetes API to review tokens with (--pod-source file)".into(),
                ));
            }
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api = Api::<TokenReview>::all(client);
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, async {
            api.create(&PostParams::default(), &review).await
        })
        .await;
        let answer = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                metrics.token_review("error");
                return Err(ContainerError::ReviewUnavailable(api_error(&e)));
            }
            Err(_) => {
                metrics.token_review("error");
                return Err(ContainerError::ReviewUnavailable(
                    "TokenReview timed out".into(),
                ));
            }
        };
        let verdict = read_verdict(answer, &self.audience, token, now);
        metrics.token_review(match verdict {
            Verdict::Accepted(_) => "authenticated",
            Verdict::Refused(_) => "refused",
        });
        let until = match &verdict {
            Verdict::Accepted(r) => r.until,
            Verdict::Refused(_) => now + REFUSED_FOR,
        };
        let mut verdicts = self.lock();
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.retain(|_, (_, u)| *u > now);
            if verdicts.len() >= MAX_VERDICTS {
                verdicts.clear();
            }
        }
        verdicts.insert(key, (verdict.clone(), until));
        Ok(verdict)
    }
}

/// Three non-empty base64url segments: what every service-account token is.
fn jwt_shaped(token: &str) -> bool {
    let mut parts = 0;
    for part in token.split('.') {
        parts += 1;
        if part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        {
            return false;
        }
    }
    parts == 3
}

/// A kube error as one line without request content (the token is in the request body, and
/// never in kube's error text, but keep only what is needed).
fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("API server answered {} {}", s.code, s.reason),
        other => {
            let s = other.to_string();
            s.chars().take(200).collect()
        }
    }
}

/// Reads the API server's TokenReview answer into a verdict.
fn read_verdict(answer: TokenReview, audience: &str, token: &str, now: u64) -> Verdict {
    let Some(status) = answer.status else {
        return Verdict::Refused("TokenReview answered without a status".into());
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .unwrap_or_else(|| "not authenticated".into())
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return Verdict::Refused(why);
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return Verdict::Refused(format!("token is not for audience {audience:?}"));
    }
    let Some(user) = status.user else {
        return Verdict::Refused("TokenReview answered without a user".into());
    };
    let username = user.username.unwrap_or_default();
    let Some((namespace, service_account)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Verdict::Refused(format!("{username:?} is not a service account"));
    };
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let pod = match (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) {
        (Some(n), Some(u)) if !n.is_empty() && !u.is_empty() => Some((n, u)),
        _ => None,
    };
    let exp = jwt_exp(token).unwrap_or(now + UNKNOWN_EXP_FOR);
    Verdict::Accepted(Reviewed {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod,
        until: exp.min(now + MAX_ACCEPTED_FOR),
    })
}

/// The `exp` claim of a JWT, without verifying it (the API server did).
pub fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = b64url_decode(payload)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_u64()
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// Whether an accepted token is the calling pod's own.
pub fn check_pod(r: &Reviewed, pod: &Pod) -> Result<(), ContainerError> {
    let who = format!("{}/{}", r.namespace, r.service_account);
    let Some((name, uid)) = &r.pod else {
        return Err(ContainerError::Unbound(format!("service account {who}")));
    };
    if r.namespace != pod.namespace
        || r.service_account != pod.service_account
        || *name != pod.name
        || *uid != pod.uid
    {
        return Err(ContainerError::OtherPod {
            token: format!("pod {}/{name} (service account {who})", r.namespace),
            pod: format!("{}/{}", pod.namespace, pod.name),
        });
    }
    Ok(())
}

/// Shared handle.
pub type SharedContainerAuth = Arc<ContainerAuth>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jwt_shaped_tokens_are_sent_for_review() {
        assert!(jwt_shaped("eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2ln"));
        for junk in [
            "", "abc", "a.b", "a.b.c.d", "a..c", "a.b.c ", "a.b/c.d", "a.b.c\n",
        ] {
            assert!(!jwt_shaped(junk), "{junk:?}");
        }
    }

    #[test]
    fn each_pod_has_a_budget_of_uncached_reviews() {
        let auth = ContainerAuth::disabled();
        for _ in 0..REVIEWS_PER_POD {
            assert_eq!(auth.spend("uid-a", 100), Ok(()));
        }
        assert_eq!(auth.spend("uid-a", 100), Err(ContainerError::ReviewLimit));
        assert_eq!(
            auth.spend("uid-a", 100 + REVIEW_WINDOW - 1),
            Err(ContainerError::ReviewLimit)
        );
        // Another pod's budget is its own; the window renews.
        assert_eq!(auth.spend("uid-b", 100), Ok(()));
        assert_eq!(auth.spend("uid-a", 100 + REVIEW_WINDOW), Ok(()));
        assert_eq!(ContainerError::ReviewLimit.reason(), "token-review-limit");
        assert_eq!(ContainerError::ReviewLimit.status(), 429);
    }

    #[test]
    fn reads_exp_from_a_jwt() {
        // {"exp":1767225600}
        let payload = "eyJleHAiOjE3NjcyMjU2MDB9";
        assert_eq!(jwt_exp(&format!("h.{payload}.s")), Some(1_767_225_600));
        assert_eq!(jwt_exp("opaque"), None);
        assert_eq!(jwt_exp("a.!!.c"), None);
        assert_eq!(b64url_decode("Zm9v"), Some(b"foo".to_vec()));
        assert_eq!(b64url_decode("Zm8"), Some(b"fo".to_vec()));
        assert_eq!(b64url_decode("-_8"), Some(vec![0xfb, 0xff]));
    }

    fn pod() -> Pod {
        Pod {
            namespace: "default".into(),
            name: "myapp".into(),
            uid: "u1".into(),
            service_account: "myapp".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_token_is_the_pods_only_when_it_names_its_uid() {
        let r = |ns: &str, sa: &str, pod: Option<(&str, &str)>| Reviewed {
            namespace: ns.into(),
            service_account: sa.into(),
            pod: pod.map(|(n, u)| (n.into(), u.into())),
            until: 0,
        };
        assert_eq!(
            check_pod(&r("default", "myapp", Some(("myapp", "u1"))), &pod()),
            Ok(())
        );
        for other in [
            r("default", "myapp", Some(("myapp", "u0"))),
            r("default", "myapp", Some(("other", "u1"))),
            r("default", "other", Some(("myapp", "u1"))),
            r("other", "myapp", Some(("myapp", "u1"))),
        ] {
            let e = check_pod(&other, &pod()).unwrap_err();
            assert_eq!(e.reason(), "container-token-other-pod");
            assert_eq!(e.status(), 403);
        }
        let e = check_pod(&r("default", "myapp", None), &pod()).unwrap_err();
        assert_eq!(e.reason(), "container-token-unbound");
    }
}
