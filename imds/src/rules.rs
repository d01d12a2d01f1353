//! The request rules real IMDS applies before it looks at what a path asks for: methods, the
//! IMDSv2 token PUT, and the session-token check. The filter and the broker (serving pods
//! directly) apply the same rules, so an SDK sees the same answers from either.
//!
//! Where real IMDS is not documented we choose the strict answer: a path that is not one
//! (see [`crate::path`]) is `404` whatever the method, and an IMDS header sent twice
//! (`X-aws-ec2-metadata-token-ttl-seconds` on the PUT, `X-aws-ec2-metadata-token` on a read)
//! is `400` — two values are two answers to one question, and a proxy that reads the first
//! while another reads the last is how checks get bypassed.

use crate::path::PathClass;
use crate::token::{TokenError, TokenIssuer, TtlError, parse_ttl};

/// A refusal: the status and a short `text/plain` body, as IMDS answers them, and a
/// secret-free reason code for logs, metrics and `x-meshiam-reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: &'static str,
    pub reason: &'static str,
}

impl Refusal {
    pub const fn new(status: u16, body: &'static str, reason: &'static str) -> Self {
        Self {
            status,
            body,
            reason,
        }
    }
}

pub const NOT_FOUND: Refusal = Refusal::new(404, "Not Found", "invalid-path");
pub const PATH_NOT_ALLOWED: Refusal = Refusal::new(404, "Not Found", "path-not-allowed");
pub const EXTENDED_NOT_SERVED: Refusal = Refusal::new(404, "Not Found", "extended-not-served");
pub const UNAUTHORIZED: Refusal = Refusal::new(401, "Unauthorized", "token-invalid");
pub const TOKEN_REQUIRED: Refusal = Refusal::new(401, "Unauthorized", "token-required");
pub const FORBIDDEN: Refusal = Refusal::new(403, "Forbidden", "forwarded-token-request");
pub const VERSIONED_TOKEN: Refusal = Refusal::new(403, "Forbidden", "versioned-token-path");
pub const BAD_REQUEST: Refusal = Refusal::new(400, "Bad Request", "bad-token-ttl");
pub const REPEATED_HEADER: Refusal = Refusal::new(400, "Bad Request", "repeated-imds-header");
pub const METHOD_NOT_ALLOWED: Refusal =
    Refusal::new(405, "Method Not Allowed", "method-not-allowed");

/// One request header as the rules need it: absent, sent once (its value), or sent more
/// than once. Proxies disagree on which of several values "the" value is, so the rules never
/// pick one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Seen<'a> {
    #[default]
    Absent,
    Once(&'a str),
    Repeated,
}

impl<'a> Seen<'a> {
    /// From every value the request carried for one header name.
    pub fn of<I: IntoIterator<Item = &'a str>>(values: I) -> Self {
        let mut it = values.into_iter();
        match (it.next(), it.next()) {
            (None, _) => Seen::Absent,
            (Some(v), None) => Seen::Once(v),
            (Some(_), Some(_)) => Seen::Repeated,
        }
    }

    /// The value when the header came exactly once.
    pub fn once(self) -> Option<&'a str> {
        match self {
            Seen::Once(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_present(self) -> bool {
        !matches!(self, Seen::Absent)
    }
}

/// The IMDS headers of a request that the rules look at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImdsHeaders<'a> {
    /// `X-aws-ec2-metadata-token-ttl-seconds` (token PUT).
    pub ttl: Seen<'a>,
    /// `X-aws-ec2-metadata-token` (reads).
    pub token: Seen<'a>,
    /// Whether `X-Forwarded-For` is present: IMDS refuses token PUTs that went through a
    /// proxy that added it.
    pub forwarded_for: bool,
}

/// What an incoming request wants, before any credential is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A well-formed token PUT: issue a token with this TTL and echo it.
    IssueToken { ttl: u32 },
    /// A GET or HEAD that may go on to be answered.
    Read,
}

/// Applies the path, method, repeated-header and token-PUT rules.
pub fn admit(
    method: &str,
    class: &PathClass<'_>,
    h: &ImdsHeaders<'_>,
) -> Result<Admission, Refusal> {
    match (method, class) {
        // Not a path at all, whatever the method: `PUT /latest/api/token/` issues nothing.
        (_, PathClass::Invalid) => Err(NOT_FOUND),
        ("PUT", PathClass::Token) => {
            if h.forwarded_for {
                return Err(FORBIDDEN);
            }
            let ttl = match h.ttl {
                Seen::Repeated => return Err(REPEATED_HEADER),
                t => t.once(),
            };
            match parse_ttl(ttl) {
                Ok(ttl) => Ok(Admission::IssueToken { ttl }),
                Err(TtlError::Missing | TtlError::NotANumber | TtlError::OutOfRange) => {
                    Err(BAD_REQUEST)
                }
            }
        }
        ("PUT", PathClass::VersionedToken) => Err(VERSIONED_TOKEN),
        ("GET" | "HEAD", PathClass::Token | PathClass::VersionedToken) => Err(METHOD_NOT_ALLOWED),
        ("GET" | "HEAD", _) if h.token == Seen::Repeated => Err(REPEATED_HEADER),
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
        None if require_v2 => Err(TOKEN_REQUIRED),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::classify;

    fn ttl(v: &str) -> ImdsHeaders<'_> {
        ImdsHeaders {
            ttl: Seen::Once(v),
            ..Default::default()
        }
    }

    #[test]
    fn token_put_rules() {
        let none = ImdsHeaders::default();
        let tok = classify("/latest/api/token");
        assert_eq!(
            admit("PUT", &tok, &ttl("21600")),
            Ok(Admission::IssueToken { ttl: 21600 })
        );
        assert_eq!(admit("PUT", &tok, &none), Err(BAD_REQUEST));
        assert_eq!(admit("PUT", &tok, &ttl("0")), Err(BAD_REQUEST));
        assert_eq!(admit("PUT", &tok, &ttl("x")), Err(BAD_REQUEST));
        assert_eq!(admit("PUT", &tok, &ttl("21601")), Err(BAD_REQUEST));
        let forwarded = ImdsHeaders {
            forwarded_for: true,
            ..ttl("60")
        };
        assert_eq!(admit("PUT", &tok, &forwarded), Err(FORBIDDEN));
        let dated = classify("/2021-03-23/api/token");
        assert_eq!(admit("PUT", &dated, &ttl("60")), Err(VERSIONED_TOKEN));
        assert_eq!(admit("GET", &tok, &none), Err(METHOD_NOT_ALLOWED));
    }

    #[test]
    fn only_the_exact_token_path_issues_tokens() {
        for p in [
            "/latest/api/token/",
            "/latest/api/token?x=1",
            "/latest/api/token?",
        ] {
            assert_eq!(
                admit("PUT", &classify(p), &ttl("60")),
                Err(NOT_FOUND),
                "{p}"
            );
            assert_eq!(
                admit("GET", &classify(p), &ttl("60")),
                Err(NOT_FOUND),
                "{p}"
            );
        }
        let trailing = classify("/latest/meta-data/iam/security-credentials/r/");
        assert_eq!(admit("GET", &trailing, &ttl("60")), Err(NOT_FOUND));
        assert_eq!(NOT_FOUND.reason, "invalid-path");
    }

    #[test]
    fn a_repeated_imds_header_is_a_bad_request() {
        let tok = classify("/latest/api/token");
        let twice = ImdsHeaders {
            ttl: Seen::of(["60", "99999"]),
            ..Default::default()
        };
        assert_eq!(admit("PUT", &tok, &twice), Err(REPEATED_HEADER));
        // Even two equal values: the rule does not depend on which one a proxy reads.
        let same = ImdsHeaders {
            ttl: Seen::of(["60", "60"]),
            ..Default::default()
        };
        assert_eq!(admit("PUT", &tok, &same), Err(REPEATED_HEADER));
        let creds = classify("/latest/meta-data/iam/security-credentials/");
        let tokens = ImdsHeaders {
            token: Seen::of(["a", "b"]),
            ..Default::default()
        };
        assert_eq!(admit("GET", &creds, &tokens), Err(REPEATED_HEADER));
        assert_eq!(admit("HEAD", &creds, &tokens), Err(REPEATED_HEADER));
        assert_eq!(REPEATED_HEADER.status, 400);
        assert_eq!(REPEATED_HEADER.reason, "repeated-imds-header");
        // Once is once.
        let one = ImdsHeaders {
            token: Seen::of(["a"]),
            ..Default::default()
        };
        assert_eq!(admit("GET", &creds, &one), Ok(Admission::Read));
        assert_eq!(Seen::of([]), Seen::Absent);
        assert_eq!(Seen::of(["v"]).once(), Some("v"));
        assert_eq!(Seen::of(["v", "w", "x"]).once(), None);
        assert!(Seen::Repeated.is_present() && !Seen::Absent.is_present());
    }

    #[test]
    fn method_rules() {
        let none = ImdsHeaders::default();
        let creds = classify("/latest/meta-data/iam/security-credentials/");
        assert_eq!(admit("GET", &creds, &none), Ok(Admission::Read));
        assert_eq!(admit("HEAD", &creds, &none), Ok(Admission::Read));
        // X-Forwarded-For only matters on the token PUT.
        let forwarded = ImdsHeaders {
            forwarded_for: true,
            ..none
        };
        assert_eq!(admit("GET", &creds, &forwarded), Ok(Admission::Read));
        for m in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get", ""] {
            assert_eq!(admit(m, &creds, &ttl("60")), Err(METHOD_NOT_ALLOWED), "{m}");
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
            Err(TOKEN_REQUIRED)
        );
    }
}
