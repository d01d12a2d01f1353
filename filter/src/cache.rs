//! The sidecar credential cache, in proxy-wasm shared data so every worker VM sees it.
//!
//! Keys are what an answer *is*, not the URL it came from: the same role's credentials are
//! one entry under `latest` and under any dated version. Only `200` answers are stored. An
//! entry is *fresh* for `cacheFreshSeconds` (default 3) after the broker gave it; after that
//! it is only used when the broker fails, and then only credentials (and the role list that
//! leads to them) with more than `staleMinRemainingSeconds` left. The short freshness is what
//! makes a role change reach the pod within seconds: the broker decides from its pod store on
//! every call-out. An entry the broker refuses (`403`/`404`) is forgotten at once.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use meshiam_imds::Resource;

use crate::host::Host;

const PREFIX: &str = "meshiam/cache/v1/";

/// Where a resource's answer is kept in shared data. The key is the resource
/// ([`Resource`], the contract's), so the cache, the call-out and the broker agree on what
/// an answer is.
fn shared_key(r: &Resource) -> String {
    match r {
        Resource::RoleList => format!("{PREFIX}role-list"),
        Resource::Credentials(role) => format!("{PREFIX}credentials/{role}"),
        Resource::IamInfo => format!("{PREFIX}iam-info"),
        Resource::Allowed(rel) => format!("{PREFIX}other/{rel}"),
        // By the token's digest: an answer only ever goes to the token it was given for.
        Resource::ContainerCredentials(digest) => format!("{PREFIX}container/{digest}"),
    }
}

/// One cached answer.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// When the broker gave it (Unix seconds).
    pub fetched: u64,
    /// Credential expiry (Unix seconds); 0 for answers that are not credentials.
    pub expiration: u64,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl core::fmt::Debug for Entry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The body may be credentials: never print it.
        f.debug_struct("Entry")
            .field("fetched", &self.fetched)
            .field("expiration", &self.expiration)
            .field("content_type", &self.content_type)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Entry {
    pub fn is_fresh(&self, now: u64, fresh_for: u64, min_remaining: u64) -> bool {
        now < self.fetched.saturating_add(fresh_for) && self.has_left(now, min_remaining)
    }

    /// True for non-credentials, or credentials with more than `min_remaining` seconds left.
    pub fn has_left(&self, now: u64, min_remaining: u64) -> bool {
        self.expiration == 0 || self.expiration > now.saturating_add(min_remaining)
    }

    /// `fetched \n expiration \n content-type \n body`.
    fn encode(&self) -> Vec<u8> {
        let head = format!(
            "{}\n{}\n{}\n",
            self.fetched, self.expiration, self.content_type
        );
        let mut out = Vec::with_capacity(head.len() + self.body.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        let mut parts = bytes.splitn(4, |b| *b == b'\n');
        let num = |p: Option<&[u8]>| core::str::from_utf8(p?).ok()?.parse::<u64>().ok();
        let fetched = num(parts.next())?;
        let expiration = num(parts.next())?;
        let content_type = String::from(core::str::from_utf8(parts.next()?).ok()?);
        let body = parts.next()?.to_vec();
        Some(Entry {
            fetched,
            expiration,
            content_type,
            body,
        })
    }
}

pub fn get<H: Host>(h: &H, key: &Resource) -> Option<Entry> {
    let (value, _) = h.shared_get(&shared_key(key));
    Entry::decode(&value?)
}

/// Stores an answer. Last write wins: every writer holds an answer the broker just gave.
pub fn put<H: Host>(h: &H, key: &Resource, entry: &Entry) -> bool {
    h.shared_set(&shared_key(key), &entry.encode(), None)
        .is_ok()
}

/// Drops an answer the broker just said is no longer the pod's, so that neither a fresh hit
/// nor a later broker outage (stale serving) can hand it out again. proxy-wasm shared data
/// cannot delete a key: an empty value is a miss for [`get`].
pub fn forget<H: Host>(h: &H, key: &Resource) -> bool {
    h.shared_set(&shared_key(key), b"", None).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockHost;

    fn entry() -> Entry {
        Entry {
            fetched: 1000,
            expiration: 4600,
            content_type: "application/json".into(),
            body: b"{\"a\":\n\"b\"}".to_vec(),
        }
    }

    #[test]
    fn round_trips_through_shared_data_across_vms() {
        let a = MockHost::new();
        let key = Resource::Credentials("r".into());
        assert!(put(&a, &key, &entry()));
        assert_eq!(get(&a.other_vm(), &key), Some(entry()));
        assert_eq!(get(&a, &Resource::Credentials("s".into())), None);
        assert_eq!(get(&a, &Resource::RoleList), None);
    }

    #[test]
    fn freshness_and_remaining_time() {
        let e = entry();
        assert!(e.is_fresh(1000, 30, 300));
        assert!(e.is_fresh(1029, 30, 300));
        assert!(!e.is_fresh(1030, 30, 300));
        assert!(!e.is_fresh(1000, 0, 300));
        // Close to expiry: no longer fresh even inside the window.
        assert!(!e.is_fresh(1000, 30, 3600));
        assert!(e.has_left(4299, 300));
        assert!(!e.has_left(4300, 300));
        let plain = Entry {
            expiration: 0,
            ..entry()
        };
        assert!(plain.has_left(u64::MAX, 300));
    }

    #[test]
    fn debug_hides_the_body() {
        let d = format!("{:?}", entry());
        assert!(!d.contains("\"a\""), "{d}");
    }

    #[test]
    fn forgotten_is_a_miss_on_every_vm() {
        let a = MockHost::new();
        let key = Resource::Credentials("r".into());
        assert!(put(&a, &key, &entry()));
        assert!(forget(&a.other_vm(), &key));
        assert_eq!(get(&a, &key), None);
    }

    #[test]
    fn garbage_is_a_miss() {
        let a = MockHost::new();
        assert!(
            a.shared_set("meshiam/cache/v1/role-list", b"x\ny", None)
                .is_ok()
        );
        assert_eq!(get(&a, &Resource::RoleList), None);
    }
}
