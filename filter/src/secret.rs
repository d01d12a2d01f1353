//! The sidecar's IMDSv2 token secret, kept in proxy-wasm shared data.
//!
//! Every Envoy worker runs its own VM; a token one worker issued must be accepted by all of
//! them for its whole TTL. So the secret lives in shared data (one per Envoy, i.e. per pod),
//! is created once at random, and is read back from shared data whenever a token is issued
//! or checked: if two VMs race at start-up and both write, the last write is the one every
//! VM uses from then on, and no VM keeps a private copy that the others do not know.

use meshiam_imds::TokenIssuer;
use meshiam_imds::token::SECRET_LEN;

use crate::host::{Host, Level, SharedError};

pub const KEY: &str = "meshiam/token-secret/v1";

/// Why the secret could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretError {
    NoRandomness,
    SharedData,
}

/// Makes sure shared data holds a secret: keeps an existing one, otherwise creates one.
pub fn ensure<H: Host>(h: &H) -> Result<(), SecretError> {
    for _ in 0..3 {
        let (value, cas) = h.shared_get(KEY);
        if value.as_deref().is_some_and(|v| v.len() == SECRET_LEN) {
            return Ok(());
        }
        let mut secret = [0u8; SECRET_LEN];
        if !h.fill_random(&mut secret) {
            return Err(SecretError::NoRandomness);
        }
        match h.shared_set(KEY, &secret, cas) {
            // Read it back below: another VM may have written in between.
            Ok(()) | Err(SharedError::CasMismatch) => continue,
            Err(SharedError::Failed) => return Err(SecretError::SharedData),
        }
    }
    match issuer(h) {
        Some(_) => Ok(()),
        None => Err(SecretError::SharedData),
    }
}

/// A token issuer keyed with the secret currently in shared data.
pub fn issuer<H: Host>(h: &H) -> Option<TokenIssuer> {
    let (value, _) = h.shared_get(KEY);
    let value = value?;
    let secret: [u8; SECRET_LEN] = value.as_slice().try_into().ok()?;
    Some(TokenIssuer::new(secret))
}

/// [`issuer`], creating the secret if it is somehow missing (logged: it should not happen).
pub fn issuer_or_create<H: Host>(h: &H) -> Option<TokenIssuer> {
    if let Some(i) = issuer(h) {
        return Some(i);
    }
    h.log(
        Level::Warn,
        "meshiam: token secret missing from shared data; creating one",
    );
    ensure(h).ok()?;
    issuer(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockHost;

    #[test]
    fn creates_once_and_keeps_it() {
        let a = MockHost::new();
        assert_eq!(ensure(&a), Ok(()));
        let first = a.shared_get(KEY).0;
        assert_eq!(first.as_ref().map(|v| v.len()), Some(SECRET_LEN));
        // A second VM of the same Envoy finds it and does not replace it.
        let b = a.other_vm();
        assert_eq!(ensure(&b), Ok(()));
        assert_eq!(b.shared_get(KEY).0, first);
    }

    #[test]
    fn a_startup_race_converges_on_one_secret() {
        let a = MockHost::new();
        let b = a.other_vm();
        // Both VMs saw no secret and both wrote one: the last write wins for both.
        let mut s = [1u8; SECRET_LEN];
        assert!(a.shared_set(KEY, &s, None).is_ok());
        s = [2u8; SECRET_LEN];
        assert!(b.shared_set(KEY, &s, None).is_ok());
        let t = issuer(&a).map(|i| i.issue(10, 60, b"x", &[3; meshiam_imds::token::NONCE_LEN]));
        let t = t.unwrap_or_default();
        assert!(issuer(&b).is_some_and(|i| i.verify(&t, 11, b"x").is_ok()));
    }

    #[test]
    fn replaces_a_corrupt_value_and_fails_without_randomness() {
        let a = MockHost::new();
        assert!(a.shared_set(KEY, b"short", None).is_ok());
        assert_eq!(ensure(&a), Ok(()));
        assert!(issuer(&a).is_some());
        let b = MockHost::new().without_randomness();
        assert_eq!(ensure(&b), Err(SecretError::NoRandomness));
        assert!(issuer_or_create(&b).is_none());
    }
}
