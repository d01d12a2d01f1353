//! The allow-list of non-credential metadata paths a deployment passes through to the node's
//! own IMDS (the filter's `allowPaths`, the broker's `--metadata-allow`): its syntax, the
//! paths no entry may ever cover, and matching. One type, so the filter and the broker can
//! never disagree on what an entry means.
//!
//! An entry is a path below the version, without a leading slash (one is tolerated), and
//! matches exactly (`meta-data/placement/region`, a trailing slash tolerated) or, ending in
//! `*`, as a prefix (`meta-data/placement/*`). It may not contain `%`, `?`, `#`, `\`,
//! whitespace, `//`, `.` or `..` segments, or a `*` anywhere but at the end.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// Paths never passed through, whatever the allow-list says: the node's own role and
/// instance identity credentials, and the token endpoint. Credentials are the broker's to
/// answer; an entry covering one of these is refused when the list is parsed, and matching
/// checks again.
pub const RESERVED: [&str; 3] = [
    "meta-data/iam",
    "meta-data/identity-credentials",
    "api/token",
];

/// A parsed allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Without the leading slash, the trailing slash of an exact entry, or the `*`.
    path: String,
    prefix: bool,
}

/// Why an entry was refused. The caller names the option (`allowPaths entry …`,
/// `--metadata-allow entry …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowError {
    /// Not a metadata path below the version.
    Syntax(String),
    /// Covers a [`RESERVED`] path.
    Reserved {
        entry: String,
        reserved: &'static str,
    },
}

impl fmt::Display for AllowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowError::Syntax(e) => write!(
                f,
                "entry {e:?} must be a metadata path below the version, optionally ending in *"
            ),
            AllowError::Reserved { entry, reserved } => write!(
                f,
                "entry {entry:?} covers {reserved}, which is never passed through (credentials are the broker's to answer)"
            ),
        }
    }
}

impl AllowList {
    /// Parses every entry; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowError> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            out.push(Entry::parse(e.as_ref())?);
        }
        Ok(Self { entries: out })
    }

    /// True when `rel` (a path below the version, as in [`crate::PathClass::Other`]) is
    /// allowed: an entry matches and it is not under a [`RESERVED`] path.
    pub fn allows(&self, rel: &str) -> bool {
        !is_reserved(rel)
            && self.entries.iter().any(|e| {
                if e.prefix {
                    rel.starts_with(e.path.as_str())
                } else {
                    rel == e.path
                }
            })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as written back (`*` restored), for logs and explanations.
    pub fn entries(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| {
                let mut s = e.path.clone();
                if e.prefix {
                    s.push('*');
                }
                s
            })
            .collect()
    }
}

/// True when `rel` is a reserved path or below one.
pub fn is_reserved(rel: &str) -> bool {
    RESERVED.iter().any(|r| {
        rel.strip_prefix(r)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

impl Entry {
    fn parse(raw: &str) -> Result<Self, AllowError> {
        let rel = raw.strip_prefix('/').unwrap_or(raw);
        let star = rel.find('*');
        let clean = !rel.is_empty()
            && rel
                .bytes()
                .all(|c| c.is_ascii_graphic() && !b"%?\\#".contains(&c))
            && !rel.contains("//")
            && !rel.split('/').any(|s| s == ".." || s == ".")
            && star.is_none_or(|i| i + 1 == rel.len());
        if !clean {
            return Err(AllowError::Syntax(raw.to_string()));
        }
        let (path, prefix) = match rel.strip_suffix('*') {
            Some(p) => (p, true),
            None => (rel.strip_suffix('/').unwrap_or(rel), false),
        };
        // An exact entry or a prefix inside a reserved path, or a prefix that reaches one.
        for reserved in RESERVED {
            if path.starts_with(reserved) || (prefix && reserved.starts_with(path)) {
                return Err(AllowError::Reserved {
                    entry: raw.to_string(),
                    reserved,
                });
            }
        }
        Ok(Entry {
            path: path.to_string(),
            prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(e: &[&str]) -> AllowList {
        AllowList::parse(e).unwrap()
    }

    #[test]
    fn exact_and_prefix_entries() {
        let allow = list(&[
            "meta-data/placement/region",
            "/meta-data/placement/availability-zone/",
            "dynamic/instance-identity/*",
        ]);
        assert!(allow.allows("meta-data/placement/region"));
        assert!(allow.allows("meta-data/placement/availability-zone"));
        assert!(allow.allows("dynamic/instance-identity/document"));
        assert!(!allow.allows("meta-data/placement"));
        assert!(!allow.allows("meta-data/placement/region/x"));
        assert!(!allow.allows("meta-data/local-ipv4"));
        assert!(!AllowList::default().allows("meta-data/placement/region"));
        assert_eq!(
            allow.entries(),
            [
                "meta-data/placement/region",
                "meta-data/placement/availability-zone",
                "dynamic/instance-identity/*"
            ]
        );
    }

    #[test]
    fn entries_covering_reserved_paths_are_refused_on_both_sides_alike() {
        for (entry, reserved) in [
            ("meta-data/iam/*", "meta-data/iam"),
            ("meta-data/iam", "meta-data/iam"),
            ("meta-data/*", "meta-data/iam"),
            ("*", "meta-data/iam"),
            ("meta-*", "meta-data/iam"),
            (
                "meta-data/identity-credentials/*",
                "meta-data/identity-credentials",
            ),
            (
                "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                "meta-data/identity-credentials",
            ),
            ("api/*", "api/token"),
            ("api/token", "api/token"),
        ] {
            assert_eq!(
                AllowList::parse(&[entry]),
                Err(AllowError::Reserved {
                    entry: entry.to_string(),
                    reserved
                }),
                "{entry}"
            );
        }
    }

    #[test]
    fn syntax() {
        for bad in [
            "",
            "/",
            "meta-data/../iam",
            "a*b",
            "a/./b",
            "a//b",
            "a%2fb",
            "a?b",
            "a b",
            "a\\b",
            "a#b",
        ] {
            assert_eq!(
                AllowList::parse(&[bad]),
                Err(AllowError::Syntax(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn reserved_paths_are_never_allowed_by_matching_either() {
        assert!(is_reserved("meta-data/iam"));
        assert!(is_reserved("meta-data/iam/security-credentials/r"));
        assert!(is_reserved("api/token"));
        assert!(!is_reserved("meta-data/iamx"));
        assert!(!is_reserved("meta-data/placement/region"));
    }
}
