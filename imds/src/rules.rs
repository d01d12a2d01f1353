//! The request rules real IMDS applies before it looks at what a path asks for: methods, the
//! IMDSv2 token PUT, and the session-token check. The filter and the broker (serving pods
//! directly) apply the same rules, so an SDK sees the same answers from either.

use crate::path::PathClass;
use crate::token::{TokenError, TokenIssuer, TtlError, parse_ttl};

/// A refusal: the status and a short `text/plain` body, as IMDS answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: &'static str,
}

impl Refusal {
    pub const fn new(status: u16, body: &'static str) -> Self {
        Self { status, body }
    }
}

pub const NOT_FOUND: Refusal = Refusal::new(404, "Not Found");
pub const UNAUTHORIZED: Refusal = Refusal::new(401, "Unauthorized");
pub const FORBIDDEN: Refusal = Refusal::new(403, "Forbidden");
pub const BAD_REQUEST: Refusal = Refusal::new(400, "Bad Request");
pub const METHOD_NOT_ALLOWED: Refusal = Refusal::new(405, "Method Not Allowed");

/// What an incoming request wants, before any credential is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A well-formed token PUT: issue a token with this TTL and echo it.
    IssueToken { ttl: u32 },
    /// A GET or HEAD that may go on to be answered.
    Read,
}

/// Applies the method and token-PUT rules.
///
/// `forwarded_for` is whether the request carries `X-Forwarded-For`: IMDS refuses token PUTs
/// that went through a proxy that added it.
pub fn admit(
    method: &str,
    class: &PathClass<'_>,
    ttl: Option<&str>,
    forwarded_for: bool,
) -> Result<Admission, Refusal> {
    match (method, class) {
        ("PUT", PathClass::Token) => {
            if forwarded_for {
                return Err(FORBIDDEN);
            }
            match parse_ttl(ttl) {
                Ok(ttl) => Ok(Admission::IssueToken { ttl }),
                Err(TtlError::Missing | TtlError::NotANumber | TtlError::OutOfRange) => {
                    Err(BAD_REQUEST)
                }
            }
        }
        ("PUT", PathClass::VersionedToken) => Err(FORBIDDEN),
        ("GET" | "HEAD", PathClass::Token | PathClass::VersionedToken) => Err(METHOD_NOT_ALLOWED),
        ("GET" | "HEAD", _) => Ok(Admission::Read),
        _ => Err(METHOD_NOT_ALLOWED),
    }
}

/// Checks a read's session token.
///
/// With a token present it must be valid (a bad token is `401` even when IMDSv1 is allowed,
/// as on real IMDS); without one, the read is allowed only when IMDSv2 is not required.
pub fn check_session(
    token: Option<&str>,
    issuer: &TokenIssuer,
    now: u64,
    binding: &[u8],
    require_v2: bool,
) -> Result<(), Refusal> {
    match token {
        Some(t) => match issuer.verify(t, now, binding) {
            Ok(_) => Ok(()),
            Err(TokenError::Invalid | TokenError::Expired) => Err(UNAUTHORIZED),
        },
        None if require_v2 => Err(UNAUTHORIZED),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::classify;

    #[test]
    fn token_put_rules() {
        let tok = classify("/latest/api/token");
        assert_eq!(
            admit("PUT", &tok, Some("21600"), false),
            Ok(Admission::IssueToken { ttl: 21600 })
        );
        assert_eq!(admit("PUT", &tok, None, false), Err(BAD_REQUEST));
        assert_eq!(admit("PUT", &tok, Some("0"), false), Err(BAD_REQUEST));
        assert_eq!(admit("PUT", &tok, Some("x"), false), Err(BAD_REQUEST));
        assert_eq!(admit("PUT", &tok, Some("21601"), false), Err(BAD_REQUEST));
        assert_eq!(admit("PUT", &tok, Some("60"), true), Err(FORBIDDEN));
        let dated = classify("/2021-03-23/api/token");
        assert_eq!(admit("PUT", &dated, Some("60"), false), Err(FORBIDDEN));
        assert_eq!(admit("GET", &tok, None, false), Err(METHOD_NOT_ALLOWED));
    }

    #[test]
    fn method_rules() {
        let creds = classify("/latest/meta-data/iam/security-credentials/");
        assert_eq!(admit("GET", &creds, None, false), Ok(Admission::Read));
        assert_eq!(admit("HEAD", &creds, None, false), Ok(Admission::Read));
        // X-Forwarded-For only matters on the token PUT.
        assert_eq!(admit("GET", &creds, None, true), Ok(Admission::Read));
        for m in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get", ""] {
            assert_eq!(
                admit(m, &creds, Some("60"), false),
                Err(METHOD_NOT_ALLOWED),
                "{m}"
            );
        }
    }

    #[test]
    fn session_rules() {
        let issuer = TokenIssuer::new([5; crate::token::SECRET_LEN]);
        let t = issuer.issue(100, 60, b"pod", &[9; crate::token::NONCE_LEN]);
        assert_eq!(check_session(Some(&t), &issuer, 120, b"pod", true), Ok(()));
        assert_eq!(
            check_session(Some(&t), &issuer, 160, b"pod", false),
            Err(UNAUTHORIZED)
        );
        assert_eq!(
            check_session(Some("junk"), &issuer, 120, b"pod", false),
            Err(UNAUTHORIZED)
        );
        assert_eq!(
            check_session(Some(&t), &issuer, 120, b"other", false),
            Err(UNAUTHORIZED)
        );
        assert_eq!(check_session(None, &issuer, 120, b"pod", false), Ok(()));
        assert_eq!(
            check_session(None, &issuer, 120, b"pod", true),
            Err(UNAUTHORIZED)
        );
    }
}
