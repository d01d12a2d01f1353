//! The container-credentials contract: the endpoint EKS Pod Identity serves at
//! `http://169.254.170.23/v1/credentials` (and `http://[fd00:ec2::23]/v1/credentials`), which
//! AWS SDKs call when `AWS_CONTAINER_CREDENTIALS_FULL_URI` is set.
//!
//! What the SDKs do (botocore `ContainerProvider`/`ContainerMetadataFetcher`, aws-sdk-rust
//! `aws-config` `ecs` and `http_credential_provider`):
//! - they accept a full URI only over https, to a loopback address, or to `169.254.170.2`,
//!   `169.254.170.23` or `fd00:ec2::23`;
//! - they read `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (before
//!   `AWS_CONTAINER_AUTHORIZATION_TOKEN`) on every fetch and send its content **verbatim** as
//!   `Authorization` (no `Bearer`; botocore refuses a token with CR or LF, so the file must
//!   not end in a newline — a kubelet-projected token does not);
//! - they `GET` the URI, want `200` and a JSON object with `AccessKeyId`, `SecretAccessKey`,
//!   `Token`, `Expiration` (aws-sdk-rust also takes `SessionToken`/`ExpiresAt`), and
//!   optionally `AccountId`; any other status is an error (botocore retries 3 times, 1 s
//!   apart; aws-sdk-rust retries 5xx only).
//!
//! meshiam answers this endpoint only to a request carrying a token that the broker proved
//! (Kubernetes TokenReview) to be a service-account token bound to the calling pod; the
//! refusals below say why not, in `x-meshiam-reason`.

use alloc::string::String;
use sha2::{Digest, Sha256};

use crate::creds::{Credentials, JsonError, parse_flat_object, push_json_string};
use crate::rules::Refusal;
use crate::time::{format_rfc3339, parse_rfc3339};

/// The path SDKs are given (`AWS_CONTAINER_CREDENTIALS_FULL_URI`); the only one served.
pub const PATH: &str = "/v1/credentials";
/// The EKS Pod Identity address SDKs accept, IPv4.
pub const HOST_V4: &str = "169.254.170.23";
/// The same, IPv6, as it appears in a `Host` header.
pub const HOST_V6: &str = "[fd00:ec2::23]";
/// The full URIs an operator sets in `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub const FULL_URI_V4: &str = "http://169.254.170.23/v1/credentials";
pub const FULL_URI_V6: &str = "http://[fd00:ec2::23]/v1/credentials";

/// The request header carrying the pod's token, as the SDKs send it.
pub const AUTHORIZATION: &str = "authorization";
/// On the broker's `200`: until when (Unix seconds) the accepted token's verdict holds. The
/// filter serves its cached answer to that token no longer than this.
pub const TOKEN_EXPIRES: &str = "x-meshiam-token-expires";
/// The longest token meshiam reads; projected service-account tokens are ~1 KiB.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Not `GET /v1/credentials` (any other path under the container address).
pub const NOT_FOUND: Refusal = Refusal::new(404, "Not Found", "invalid-path");
/// No `Authorization` header, or an empty one.
pub const TOKEN_MISSING: Refusal = Refusal::new(401, "Unauthorized", "container-token-missing");
/// `Authorization` sent more than once.
pub const TOKEN_REPEATED: Refusal = Refusal::new(400, "Bad Request", "container-token-repeated");
/// A token that is not a header-safe string of at most [`MAX_TOKEN_LEN`] bytes.
pub const TOKEN_MALFORMED: Refusal = Refusal::new(401, "Unauthorized", "container-token-invalid");

/// The reason codes of the broker's refusals of the pod's token. A `401` carrying one of
/// these is about the pod's token, not about the filter's own broker session.
pub const TOKEN_REASONS: [&str; 5] = [
    "container-token-missing",
    "container-token-invalid",
    "container-token-other-pod",
    "container-token-unbound",
    "container-token-repeated",
];

/// True for a reason code that refuses the pod's token (see [`TOKEN_REASONS`]).
pub fn is_token_reason(reason: &str) -> bool {
    TOKEN_REASONS.contains(&reason)
}

/// Whether `path` (query string included) is the endpoint. Exact, as for the IMDS token
/// path: no trailing slash, no query — no SDK sends them.
pub fn is_path(path: &str) -> bool {
    path == PATH
}

/// The token of a request's `Authorization` value: refused when empty, too long, or not
/// visible ASCII (a header a proxy may rewrite or split). A comma is a repeated header: Envoy
/// joins the values of an `Authorization` sent twice with `,`, and no service-account token
/// (a JWT: base64url and dots) has one.
pub fn token(value: &str) -> Result<&str, Refusal> {
    if value.is_empty() {
        return Err(TOKEN_MISSING);
    }
    if value.contains(',') {
        return Err(TOKEN_REPEATED);
    }
    if value.len() > MAX_TOKEN_LEN || !value.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(TOKEN_MALFORMED);
    }
    Ok(value)
}

/// A key for a token that never shows the token: hex SHA-256. Caches on both sides are keyed
/// by it, so the token itself is never stored or logged.
pub fn token_digest(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(64);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in d {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}

/// The account of a role ARN (`arn:aws:iam::123456789012:role/x` → `123456789012`).
pub fn account_of(role_arn: &str) -> Option<&str> {
    let mut parts = role_arn.splitn(6, ':');
    let (arn, _partition, service, _region, account) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (arn == "arn"
        && service == "iam"
        && account.len() == 12
        && account.bytes().all(|c| c.is_ascii_digit()))
    .then_some(account)
}

/// The document `GET /v1/credentials` answers, as the Pod Identity Agent writes it:
/// `{"AccessKeyId","SecretAccessKey","Token","AccountId","Expiration"}` (`AccountId` only
/// when known). Timestamps are second-precision `Z`, as for IMDS.
pub fn render(c: &Credentials, account_id: Option<&str>) -> String {
    let mut out = String::with_capacity(
        128 + c.access_key_id.len() + c.secret_access_key.len() + c.token.len(),
    );
    out.push_str("{\"AccessKeyId\":");
    push_json_string(&mut out, &c.access_key_id);
    out.push_str(",\"SecretAccessKey\":");
    push_json_string(&mut out, &c.secret_access_key);
    out.push_str(",\"Token\":");
    push_json_string(&mut out, &c.token);
    if let Some(account) = account_id {
        out.push_str(",\"AccountId\":");
        push_json_string(&mut out, account);
    }
    out.push_str(",\"Expiration\":\"");
    out.push_str(&format_rfc3339(c.expiration));
    out.push_str("\"}");
    out
}

/// Reads a container-credentials document: the credentials and the `AccountId` if any.
pub fn parse(doc: &str) -> Result<(Credentials, Option<String>), JsonError> {
    let fields = parse_flat_object(doc)?;
    let get = |name: &'static str| -> Result<String, JsonError> {
        match fields.iter().find(|(k, _)| k == name) {
            Some((_, v)) if !v.is_empty() => Ok(v.clone()),
            _ => Err(JsonError::MissingField(name)),
        }
    };
    let expiration =
        parse_rfc3339(&get("Expiration")?).ok_or(JsonError::BadTimestamp("Expiration"))?;
    let account = fields
        .iter()
        .find(|(k, _)| k == "AccountId")
        .map(|(_, v)| v.clone());
    Ok((
        Credentials {
            access_key_id: get("AccessKeyId")?,
            secret_access_key: get("SecretAccessKey")?,
            token: get("Token")?,
            expiration,
            last_updated: 0,
        },
        account,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn sample() -> Credentials {
        Credentials {
            access_key_id: "ASIAEXAMPLE".to_string(),
            secret_access_key: "s3cr3t/+=".to_string(),
            token: "tok\"en".to_string(),
            expiration: 1_767_229_200,
            last_updated: 1_767_225_600,
        }
    }

    #[test]
    fn renders_what_the_sdks_parse() {
        assert_eq!(
            render(&sample(), Some("123456789012")),
            "{\"AccessKeyId\":\"ASIAEXAMPLE\",\"SecretAccessKey\":\"s3cr3t/+=\",\
             \"Token\":\"tok\\\"en\",\"AccountId\":\"123456789012\",\
             \"Expiration\":\"2026-01-01T01:00:00Z\"}"
        );
        assert!(!render(&sample(), None).contains("AccountId"));
    }

    #[test]
    fn round_trips() {
        let (c, acct) = parse(&render(&sample(), Some("123456789012"))).unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.token, "tok\"en");
        assert_eq!(c.expiration, 1_767_229_200);
        assert_eq!(acct.as_deref(), Some("123456789012"));
        assert_eq!(
            parse("{}").err(),
            Some(JsonError::MissingField("Expiration"))
        );
        assert_eq!(parse("[]").err(), Some(JsonError::Syntax));
    }

    #[test]
    fn path_and_token_rules() {
        assert!(is_path("/v1/credentials"));
        for p in [
            "/v1/credentials/",
            "/v1/credentials?x",
            "/v1",
            "/",
            "/v2/credentials",
        ] {
            assert!(!is_path(p), "{p}");
        }
        assert_eq!(token(""), Err(TOKEN_MISSING));
        assert_eq!(token("a b"), Err(TOKEN_MALFORMED));
        assert_eq!(token("eyJ.x\n"), Err(TOKEN_MALFORMED));
        assert_eq!(token("a.b.c,a.b.c"), Err(TOKEN_REPEATED));
        assert_eq!(token(&"a".repeat(MAX_TOKEN_LEN + 1)), Err(TOKEN_MALFORMED));
        assert_eq!(token("eyJhbGciOi.eyJ.sig"), Ok("eyJhbGciOi.eyJ.sig"));
        assert!(is_token_reason("container-token-other-pod"));
        assert!(!is_token_reason("token-invalid"));
    }

    #[test]
    fn digest_hides_the_token() {
        let d = token_digest("secret-token");
        assert_eq!(d.len(), 64);
        assert!(!d.contains("secret"));
        assert_ne!(d, token_digest("secret-token2"));
        assert_eq!(d, token_digest("secret-token"));
    }

    #[test]
    fn account_of_role_arns() {
        assert_eq!(
            account_of("arn:aws:iam::123456789012:role/myapp-iam-role"),
            Some("123456789012")
        );
        assert_eq!(
            account_of("arn:aws-cn:iam::123456789012:role/a/b"),
            Some("123456789012")
        );
        assert_eq!(account_of("arn:aws:iam::12345:role/x"), None);
        assert_eq!(account_of("myapp-iam-role"), None);
    }
}
