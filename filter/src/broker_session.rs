//! The filter's own IMDSv2 session with the broker.
//!
//! The broker applies one token rule to every read, because it cannot tell a filter call-out
//! from anything else at the pod's address (see docs/broker.md). So the filter, like any
//! IMDSv2 client, gets a token with `PUT /latest/api/token` and sends it on every read
//! call-out. One token serves the whole sidecar: it lives in proxy-wasm shared data (all
//! worker VMs), is fetched when missing or within [`REFRESH_BEFORE`] of its expiry, and is
//! dropped when the broker answers a read with `401` (a restarted broker has a new secret).
//!
//! This token is between the filter and the broker only. The application's own IMDSv2
//! tokens are the filter's (see [`crate::secret`]) and never reach the broker.

use alloc::format;
use alloc::string::String;

use crate::host::{CalloutResponse, Host};

/// Shared-data key, namespaced like the cache's keys.
pub const KEY: &str = "meshiam/broker-session/v1";
/// The TTL the filter asks for: IMDS's longest, six hours.
pub const TTL: u32 = meshiam_imds::token::MAX_TTL;
/// Same as [`TTL`], as the header value.
pub const TTL_HEADER_VALUE: &str = "21600";
/// A token with less than this left (seconds) is replaced before the next call-out.
pub const REFRESH_BEFORE: u64 = 300;
/// The longest token accepted from the broker (the broker's are 90 characters).
const MAX_TOKEN_LEN: usize = 256;

/// The broker token all worker VMs of this sidecar use.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerToken {
    pub token: String,
    /// Unix seconds.
    pub expiry: u64,
}

impl core::fmt::Debug for BrokerToken {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The token is a credential towards the broker: never printed.
        f.debug_struct("BrokerToken")
            .field("token", &"<redacted>")
            .field("expiry", &self.expiry)
            .finish()
    }
}

impl BrokerToken {
    /// `expiry \n token`.
    fn encode(&self) -> String {
        format!("{}\n{}", self.expiry, self.token)
    }

    fn decode(bytes: &[u8]) -> Option<BrokerToken> {
        let text = core::str::from_utf8(bytes).ok()?;
        let (expiry, token) = text.split_once('\n')?;
        let expiry = expiry.parse().ok()?;
        is_token(token).then(|| BrokerToken {
            token: String::from(token),
            expiry,
        })
    }

    /// Usable for a call-out made at `now`: more than [`REFRESH_BEFORE`] left.
    pub fn is_usable(&self, now: u64) -> bool {
        self.expiry > now.saturating_add(REFRESH_BEFORE)
    }
}

/// Something that can go into a header: printable ASCII without spaces, not too long.
fn is_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_TOKEN_LEN && t.bytes().all(|c| c.is_ascii_graphic())
}

/// The stored token, when it is still good for a call-out made now.
pub fn current<H: Host>(h: &H) -> Option<BrokerToken> {
    let (value, _) = h.shared_get(KEY);
    BrokerToken::decode(&value?).filter(|t| t.is_usable(h.now()))
}

/// Stores a token for every worker VM. Last write wins: every writer holds a token the
/// broker just issued.
pub fn store<H: Host>(h: &H, token: &BrokerToken) -> bool {
    h.shared_set(KEY, token.encode().as_bytes(), None).is_ok()
}

/// Forgets `refused`, unless another VM has already replaced it with a newer token.
pub fn forget<H: Host>(h: &H, refused: &str) {
    let (value, cas) = h.shared_get(KEY);
    let Some(stored) = value.as_deref().and_then(BrokerToken::decode) else {
        return;
    };
    if stored.token == refused {
        // A CAS mismatch means someone wrote in between: their token is newer, keep it.
        let _ = h.shared_set(KEY, b"", cas);
    }
}

/// Checks the broker's `200` to the token PUT; the token expires `TTL` from `now`.
pub fn accept(resp: &CalloutResponse, now: u64) -> Result<BrokerToken, &'static str> {
    let text = core::str::from_utf8(&resp.body).map_err(|_| "token is not UTF-8")?;
    let token = text.trim();
    if !is_token(token) {
        return Err("not a token");
    }
    Ok(BrokerToken {
        token: String::from(token),
        expiry: now.saturating_add(u64::from(TTL)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockHost;

    fn ok(body: &str) -> CalloutResponse {
        CalloutResponse {
            status: Some(200),
            content_type: Some("text/plain".into()),
            reason: None,
            body: body.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn stored_for_every_vm_until_close_to_expiry() {
        let a = MockHost::new();
        assert_eq!(current(&a), None);
        let t = accept(&ok("abc123\n"), a.now()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.token, "abc123");
        assert!(store(&a, &t));
        let b = a.other_vm();
        assert_eq!(current(&b), Some(t.clone()));
        a.advance(u64::from(TTL) - REFRESH_BEFORE - 1);
        assert!(current(&b).is_some());
        a.advance(1);
        assert_eq!(current(&b), None, "within five minutes of expiry: refresh");
    }

    #[test]
    fn forget_only_the_refused_token() {
        let a = MockHost::new();
        let old = BrokerToken {
            token: "old".into(),
            expiry: a.now() + 1000,
        };
        let new = BrokerToken {
            token: "new".into(),
            expiry: a.now() + 1000,
        };
        assert!(store(&a, &new));
        forget(&a, "old");
        assert_eq!(current(&a), Some(new));
        assert!(store(&a, &old));
        forget(&a, "old");
        assert_eq!(current(&a), None);
    }

    #[test]
    fn refuses_what_cannot_be_a_header() {
        for bad in ["", "a b", "x\ny", "\u{e9}", &"a".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(accept(&ok(bad), 0).is_err(), "{bad:?}");
        }
        let a = MockHost::new();
        assert!(a.shared_set(KEY, b"garbage", None).is_ok());
        assert_eq!(current(&a), None);
    }

    #[test]
    fn debug_hides_the_token() {
        let t = BrokerToken {
            token: "sekrit-token".into(),
            expiry: 5,
        };
        assert!(!format!("{t:?}").contains("sekrit"));
    }
}
