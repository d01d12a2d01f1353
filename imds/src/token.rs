//! IMDSv2 session tokens.
//!
//! A token is stateless: a version byte, a random nonce, the expiry and an HMAC-SHA256 tag
//! over all three and a *binding*, hex-encoded. The binding names the scope the token is
//! good for: the filter binds to its pod's identity and keeps the secret in proxy-wasm
//! shared data, so every Envoy worker of one sidecar accepts the token for its whole TTL
//! while no other pod (with its own random secret) ever does; the broker binds to the UID
//! of the pod that asked, so a token dies with its pod even when a new pod gets the same
//! address. The nonce (the caller brings the randomness: this crate has none) makes every
//! token unique, so two tokens issued in the same second to the same binding differ and
//! one never tells anything about another. Nothing has to be stored per token, so a flood
//! of token PUTs costs no memory.

use alloc::string::String;
use core::fmt;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Smallest TTL IMDS accepts, in seconds.
pub const MIN_TTL: u32 = 1;
/// Largest TTL IMDS accepts: six hours.
pub const MAX_TTL: u32 = 21_600;
/// Length of the secret a [`TokenIssuer`] is keyed with.
/// (HMAC-SHA256's block size, so the key is used as is.)
pub const SECRET_LEN: usize = 64;

/// Length of the random nonce every token carries.
pub const NONCE_LEN: usize = 16;

/// Version 2: with nonce. (Version 1 tokens had none; they are refused as invalid, and
/// clients ask for a new token on `401`.)
const VERSION: u8 = 2;
const TAG_LEN: usize = 20;
/// The part the tag covers, besides the binding: version, nonce, expiry.
const HEAD_LEN: usize = 1 + NONCE_LEN + 8;
const RAW_LEN: usize = HEAD_LEN + TAG_LEN;
/// Length of every token this module issues.
pub const TOKEN_LEN: usize = RAW_LEN * 2;

/// Why a token TTL header was refused (IMDS answers `400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlError {
    Missing,
    NotANumber,
    OutOfRange,
}

impl fmt::Display for TtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TtlError::Missing => "missing token TTL header",
            TtlError::NotANumber => "token TTL is not a whole number of seconds",
            TtlError::OutOfRange => "token TTL must be between 1 and 21600 seconds",
        })
    }
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` header value.
pub fn parse_ttl(value: Option<&str>) -> Result<u32, TtlError> {
    let v = value.ok_or(TtlError::Missing)?.trim();
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        // A sign, a fraction or any other character: IMDS wants a plain positive integer.
        return Err(if v.is_empty() {
            TtlError::Missing
        } else {
            TtlError::NotANumber
        });
    }
    // Long digit strings are out of range rather than "not a number".
    let n: u64 = v.parse().unwrap_or(u64::MAX);
    if n < MIN_TTL as u64 || n > MAX_TTL as u64 {
        return Err(TtlError::OutOfRange);
    }
    Ok(n as u32)
}

/// Why a token was refused (IMDS answers `401`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token this issuer could have made (wrong shape, wrong secret, wrong binding).
    Invalid,
    /// Was valid, has expired.
    Expired,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Invalid => "invalid metadata token",
            TokenError::Expired => "expired metadata token",
        })
    }
}

/// Issues and checks tokens under one secret.
#[derive(Clone)]
pub struct TokenIssuer {
    secret: [u8; SECRET_LEN],
}

impl fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenIssuer { secret: <redacted> }")
    }
}

impl TokenIssuer {
    pub fn new(secret: [u8; SECRET_LEN]) -> Self {
        Self { secret }
    }

    /// A token valid from `now` for `ttl` seconds, for `binding` only. `nonce` must be fresh
    /// random bytes (the caller's randomness: `getrandom` in the broker, the proxy's in the
    /// filter).
    pub fn issue(&self, now: u64, ttl: u32, binding: &[u8], nonce: &[u8; NONCE_LEN]) -> String {
        let expiry = now.saturating_add(ttl as u64);
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..1 + NONCE_LEN].copy_from_slice(nonce);
        raw[1 + NONCE_LEN..HEAD_LEN].copy_from_slice(&expiry.to_be_bytes());
        let tag = self.mac(&raw[..HEAD_LEN], binding).finalize().into_bytes();
        raw[HEAD_LEN..].copy_from_slice(&tag[..TAG_LEN]);
        let mut out = String::with_capacity(TOKEN_LEN);
        for b in raw {
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
        out
    }

    /// Checks `token` for `binding` at `now`; returns its expiry (Unix seconds).
    pub fn verify(&self, token: &str, now: u64, binding: &[u8]) -> Result<u64, TokenError> {
        let token = token.trim();
        if token.len() != TOKEN_LEN {
            return Err(TokenError::Invalid);
        }
        let mut raw = [0u8; RAW_LEN];
        for (i, pair) in token.as_bytes().chunks_exact(2).enumerate() {
            let hi = unhex(pair[0]).ok_or(TokenError::Invalid)?;
            let lo = unhex(pair[1]).ok_or(TokenError::Invalid)?;
            raw[i] = (hi << 4) | lo;
        }
        if raw[0] != VERSION {
            return Err(TokenError::Invalid);
        }
        // Constant-time comparison of the truncated tag.
        self.mac(&raw[..HEAD_LEN], binding)
            .verify_truncated_left(&raw[HEAD_LEN..])
            .map_err(|_| TokenError::Invalid)?;
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&raw[1 + NONCE_LEN..HEAD_LEN]);
        let expiry = u64::from_be_bytes(exp);
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(expiry)
    }

    fn mac(&self, head: &[u8], binding: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new((&self.secret).into());
        mac.update(b"meshiam-imds-token\0");
        mac.update(head);
        mac.update(&(binding.len() as u64).to_be_bytes());
        mac.update(binding);
        mac
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn unhex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(seed: u8) -> TokenIssuer {
        TokenIssuer::new([seed; SECRET_LEN])
    }

    const N: [u8; NONCE_LEN] = [0x5a; NONCE_LEN];

    #[test]
    fn ttl_rules() {
        assert_eq!(parse_ttl(Some("1")), Ok(1));
        assert_eq!(parse_ttl(Some("21600")), Ok(21_600));
        assert_eq!(parse_ttl(Some(" 300 ")), Ok(300));
        assert_eq!(parse_ttl(None), Err(TtlError::Missing));
        assert_eq!(parse_ttl(Some("")), Err(TtlError::Missing));
        assert_eq!(parse_ttl(Some("0")), Err(TtlError::OutOfRange));
        assert_eq!(parse_ttl(Some("21601")), Err(TtlError::OutOfRange));
        assert_eq!(
            parse_ttl(Some("99999999999999999999999")),
            Err(TtlError::OutOfRange)
        );
        for bad in ["-1", "+5", "1.5", "abc", "1e3", "0x10", "12 3"] {
            assert_eq!(parse_ttl(Some(bad)), Err(TtlError::NotANumber), "{bad}");
        }
    }

    #[test]
    fn token_valid_for_its_whole_ttl_and_not_after() {
        let i = issuer(7);
        let t = i.issue(1000, 21_600, b"default/myapp", &N);
        assert_eq!(t.len(), TOKEN_LEN);
        assert_eq!(i.verify(&t, 1000, b"default/myapp"), Ok(22_600));
        assert_eq!(i.verify(&t, 22_599, b"default/myapp"), Ok(22_600));
        assert_eq!(
            i.verify(&t, 22_600, b"default/myapp"),
            Err(TokenError::Expired)
        );
        assert_eq!(
            i.verify(&t.to_uppercase(), 1000, b"default/myapp"),
            Ok(22_600)
        );
    }

    #[test]
    fn another_issuer_of_the_same_sidecar_accepts_it() {
        // Two Envoy workers share the secret through shared data: two issuers, same key.
        let t = issuer(9).issue(50, 60, b"ns/pod", &N);
        assert!(issuer(9).verify(&t, 100, b"ns/pod").is_ok());
    }

    #[test]
    fn another_pod_refuses_it() {
        let t = issuer(1).issue(0, 600, b"default/myapp", &N);
        // Another pod's sidecar has another secret.
        assert_eq!(
            issuer(2).verify(&t, 1, b"default/myapp"),
            Err(TokenError::Invalid)
        );
        // Same secret, other binding (the broker binds to pod UIDs).
        assert_eq!(
            issuer(1).verify(&t, 1, b"default/other"),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn tampering_is_detected() {
        let i = issuer(3);
        let t = i.issue(0, 60, b"b", &N);
        // Push the expiry forward by editing one hex digit of the expiry field, or change
        // the nonce.
        let expiry_digit = 2 * (1 + NONCE_LEN) + 10;
        for at in [expiry_digit, 4] {
            let mut forged: alloc::vec::Vec<u8> = t.clone().into_bytes();
            forged[at] = if forged[at] == b'f' { b'e' } else { b'f' };
            let forged = String::from_utf8(forged).unwrap_or_default();
            assert_eq!(i.verify(&forged, 1, b"b"), Err(TokenError::Invalid), "{at}");
        }
        for bad in [
            "",
            "zz",
            &t[..TOKEN_LEN - 2],
            "g".repeat(TOKEN_LEN).as_str(),
        ] {
            assert_eq!(i.verify(bad, 1, b"b"), Err(TokenError::Invalid), "{bad:?}");
        }
        let mut wrong_version = t.clone();
        wrong_version.replace_range(0..2, "01");
        assert_eq!(i.verify(&wrong_version, 1, b"b"), Err(TokenError::Invalid));
    }

    #[test]
    fn every_token_is_unique_by_its_nonce() {
        let i = issuer(4);
        let a = i.issue(1000, 60, b"uid-1", &[1; NONCE_LEN]);
        let b = i.issue(1000, 60, b"uid-1", &[2; NONCE_LEN]);
        assert_ne!(a, b, "same second, same binding, other nonce: other token");
        assert_eq!(i.verify(&a, 1001, b"uid-1"), Ok(1060));
        assert_eq!(i.verify(&b, 1001, b"uid-1"), Ok(1060));
        assert_eq!(a.len(), TOKEN_LEN);
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let s = alloc::format!("{:?}", issuer(0xab));
        assert!(!s.contains("171") && !s.contains("ab,"), "{s}");
    }
}
