//! Service-account tokens: the TokenRequest subresource the kubelet uses for projected
//! token volumes (`POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`) and the
//! TokenReview API an agent uses to check a token (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`).
//!
//! Tokens look like the apiserver's (a JWT whose payload carries `aud`, `exp`, `sub` and the
//! `kubernetes.io` claims), but the double verifies them by lookup, not by signature: a token
//! is valid when this double issued it, it has not expired, one of the review's audiences is
//! one of its own, and — for a pod-bound token — that pod still exists with the same uid. The
//! review's answer has the apiserver's shape: `system:serviceaccount:<ns>:<sa>`, the
//! service-account groups, and the pod name and uid in `user.extra`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::store::{Kind, ObjKey};
use crate::{Shared, lock};

/// The audience of a token requested without one (the apiserver's own).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc";
/// `user.extra` keys the apiserver sets for pod-bound tokens.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";
/// The double accepts shorter lifetimes than the apiserver's 10-minute minimum, so tests can
/// see a token expire.
const MIN_EXPIRATION_SECONDS: u64 = 1;
const MAX_EXPIRATION_SECONDS: u64 = 48 * 3600;

/// What the double knows about a token it issued.
#[derive(Debug, Clone)]
pub(crate) struct Issued {
    namespace: String,
    service_account: String,
    audiences: Vec<String>,
    expires: u64,
    /// `(name, uid)` of the pod the token is bound to.
    pod: Option<(String, String)>,
    id: String,
}

/// Tokens by their full text.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    issued: HashMap<String, Issued>,
    serial: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Unpredictable bytes for a token's signature part (the double is no security boundary,
/// but a token must not be guessable from another).
fn random_bytes() -> [u8; 32] {
    use std::io::Read;
    let mut b = [0u8; 32];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in b.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u128(now().into());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    b
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`.
pub(crate) async fn request_token(
    State(s): State<Arc<Shared>>,
    Path((ns, sa)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = body_json(&body)?;
    let spec = &req["spec"];
    let mut audiences = strings(&spec["audiences"]);
    if audiences.is_empty() {
        audiences.push(API_AUDIENCE.to_string());
    }
    let ttl = spec["expirationSeconds"].as_u64().unwrap_or(3600);
    if !(MIN_EXPIRATION_SECONDS..=MAX_EXPIRATION_SECONDS).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "spec.expirationSeconds: must be from {MIN_EXPIRATION_SECONDS} to {MAX_EXPIRATION_SECONDS}"
        )));
    }
    let bound = &spec["boundObjectRef"];
    let pod = if bound.is_null() {
        None
    } else {
        if bound["kind"].as_str() != Some("Pod") {
            return Err(ApiError::invalid(
                "spec.boundObjectRef.kind: the double binds tokens to pods only",
            ));
        }
        let name = bound["name"].as_str().unwrap_or_default().to_string();
        let key = ObjKey::new(Kind::Pod, &ns, &name);
        let obj = s.db().get(&key).ok_or_else(|| ApiError::not_found(&key))?;
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(want) = bound["uid"].as_str()
            && !want.is_empty()
            && want != uid
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "the UID in the bound object reference ({want}) does not match the UID in record ({uid})"
                ),
            ));
        }
        let pod_sa = obj["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        if pod_sa != sa {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount \"{sa}\" to pod running with different serviceaccount name \"{pod_sa}\""
            )));
        }
        Some((name, uid))
    };
    let iat = now();
    let expires = iat + ttl;
    let mut tokens = lock(&s.tokens);
    tokens.serial += 1;
    let id = format!(
        "kube-double-{:08x}-{}",
        tokens.serial,
        b64url(&random_bytes()[..6])
    );
    let mut k8s = json!({
        "namespace": ns,
        "serviceaccount": {"name": sa, "uid": format!("sa-{ns}-{sa}")},
    });
    if let Some((name, uid)) = &pod {
        k8s["pod"] = json!({"name": name, "uid": uid});
    }
    let claims = json!({
        "aud": audiences,
        "exp": expires,
        "iat": iat,
        "nbf": iat,
        "iss": API_AUDIENCE,
        "jti": id,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": k8s,
    });
    let token = format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"RS256","kid":"kube-double"}"#),
        b64url(claims.to_string().as_bytes()),
        b64url(&random_bytes()),
    );
    tokens.issued.insert(
        token.clone(),
        Issued {
            namespace: ns.clone(),
            service_account: sa.clone(),
            audiences: audiences.clone(),
            expires,
            pod,
            id,
        },
    );
    drop(tokens);
    let expiration = httpdate(expires);
    let out = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "metadata": {"name": sa, "namespace": ns},
        "spec": {"audiences": audiences, "expirationSeconds": ttl, "boundObjectRef": spec["boundObjectRef"]},
        "status": {"token": token, "expirationTimestamp": expiration},
    });
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// RFC 3339 seconds, `Z`.
fn httpdate(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
pub(crate) async fn review(
    State(s): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = body_json(&body)?;
    let spec = req["spec"].clone();
    let token = spec["token"].as_str().unwrap_or_default();
    let wanted = strings(&spec["audiences"]);
    let status = match verdict(&s, token, &wanted) {
        Ok(status) => status,
        Err(error) => json!({"authenticated": false, "user": {}, "error": error}),
    };
    let out = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    });
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

fn verdict(s: &Shared, token: &str, wanted: &[String]) -> Result<Value, String> {
    let issued = lock(&s.tokens)
        .issued
        .get(token)
        .cloned()
        .ok_or_else(|| "invalid bearer token".to_string())?;
    if issued.expires <= now() {
        return Err("invalid bearer token, token has expired".into());
    }
    let audiences: Vec<String> = if wanted.is_empty() {
        vec![API_AUDIENCE.to_string()]
    } else {
        wanted.to_vec()
    };
    let matched: Vec<&String> = audiences
        .iter()
        .filter(|a| issued.audiences.contains(a))
        .collect();
    if matched.is_empty() {
        return Err(format!(
            "invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}",
            issued.audiences, audiences
        ));
    }
    let mut extra = json!({EXTRA_CREDENTIAL_ID: [format!("JTI={}", issued.id)]});
    if let Some((name, uid)) = &issued.pod {
        let key = ObjKey::new(Kind::Pod, &issued.namespace, name);
        let current = s.db().get(&key);
        let current_uid = current
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
        if current_uid.as_deref() != Some(uid.as_str()) {
            return Err(format!(
                "invalid bearer token, pod \"{name}\" (uid {uid}) it is bound to no longer exists"
            ));
        }
        extra[EXTRA_POD_NAME] = json!([name]);
        extra[EXTRA_POD_UID] = json!([uid]);
    }
    let (ns, sa) = (&issued.namespace, &issued.service_account);
    Ok(json!({
        "authenticated": true,
        "audiences": matched,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": format!("sa-{ns}-{sa}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": extra,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_and_dates() {
        assert_eq!(b64url(b""), "");
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(httpdate(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(httpdate(951_782_400), "2000-02-29T00:00:00Z");
    }
}
