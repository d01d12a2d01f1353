//! What an IMDS request path asks for.
//!
//! IMDS serves the same tree under `latest` and under dated versions (`2021-03-23`, `1.0`).
//! Classification refuses anything that could mean two different paths to two different
//! parsers (`..`, `%`, `//`, backslashes, control bytes): such a path is
//! [`PathClass::Invalid`] and answered `404`.
//!
//! The token endpoint and the credential leaves are exact: `/latest/api/token` with a
//! trailing slash or any query string (even an empty `?`), and
//! `…/security-credentials/<role>/` or `…/iam/info/`, are [`PathClass::Invalid`] — no SDK
//! sends them, and a path that means the same thing several ways is one more thing to get
//! wrong in a proxy in front of us. Elsewhere the query string is ignored, and directories
//! (`…/security-credentials`, with or without its slash) and allow-listed paths tolerate a
//! trailing slash.

/// The kind of thing a metadata request path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathClass<'a> {
    /// `/latest/api/token`, exactly (no trailing slash, no query): the IMDSv2 token endpoint.
    Token,
    /// `/<dated version>/api/token`: real IMDS answers a PUT here with `403`.
    VersionedToken,
    /// `/<v>/meta-data/iam/security-credentials/`: the role name.
    RoleList,
    /// `/<v>/meta-data/iam/security-credentials/<role>` (no trailing slash): the role's
    /// credentials.
    RoleCredentials(&'a str),
    /// `/<v>/meta-data/iam/info` (no trailing slash): the instance-profile document.
    IamInfo,
    /// `/<v>/meta-data/iam/security-credentials-extended/…`: newer SDKs try it first and fall
    /// back on `404`.
    Extended,
    /// Any other path under a version: `meta-data/placement/region`, `dynamic/…`,
    /// `user-data`. The value is the path below the version, without a trailing slash.
    Other(&'a str),
    /// Not a metadata path we will ever answer (no version, odd characters, traversal).
    Invalid,
}

impl PathClass<'_> {
    /// A short, stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            PathClass::Token => "token",
            PathClass::VersionedToken => "token",
            PathClass::RoleList => "role_list",
            PathClass::RoleCredentials(_) => "credentials",
            PathClass::IamInfo => "iam_info",
            PathClass::Extended => "extended",
            PathClass::Other(_) => "other",
            PathClass::Invalid => "invalid",
        }
    }
}

/// The longest path we classify; real IMDS paths are far shorter.
pub const MAX_PATH_LEN: usize = 1024;

/// Classifies a request path (`:path`, query string allowed).
pub fn classify(path: &str) -> PathClass<'_> {
    let (path, query) = match path.find('?') {
        Some(i) => (&path[..i], true),
        None => (path, false),
    };
    if path.len() > MAX_PATH_LEN || !path.starts_with('/') || !is_clean(path) {
        return PathClass::Invalid;
    }
    let rest = &path[1..];
    let (version, below) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let latest = version == "latest";
    if !latest && !is_dated_version(version) {
        return PathClass::Invalid;
    }
    if below == "api/token" {
        return match (latest, query) {
            (true, false) => PathClass::Token,
            (true, true) => PathClass::Invalid,
            (false, _) => PathClass::VersionedToken,
        };
    }
    if below == "api/token/" {
        return PathClass::Invalid;
    }
    const CREDS: &str = "meta-data/iam/security-credentials";
    const EXTENDED: &str = "meta-data/iam/security-credentials-extended";
    if below == EXTENDED || below.starts_with("meta-data/iam/security-credentials-extended/") {
        return PathClass::Extended;
    }
    if below == CREDS || below == "meta-data/iam/security-credentials/" {
        return PathClass::RoleList;
    }
    if let Some(role) = below.strip_prefix("meta-data/iam/security-credentials/") {
        // `<role>/` is not the credentials document: no SDK asks for it, and answering it
        // would give the same secret under a second name.
        if role.is_empty() || role.contains('/') {
            return PathClass::Invalid;
        }
        return PathClass::RoleCredentials(role);
    }
    if below == "meta-data/iam/info" {
        return PathClass::IamInfo;
    }
    if below == "meta-data/iam/info/" {
        return PathClass::Invalid;
    }
    let below = below.strip_suffix('/').unwrap_or(below);
    PathClass::Other(below)
}

/// `YYYY-MM-DD` or the historical `1.0`.
fn is_dated_version(v: &str) -> bool {
    if v == "1.0" {
        return true;
    }
    let b = v.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn is_clean(path: &str) -> bool {
    path.bytes()
        .all(|c| c.is_ascii_graphic() && c != b'%' && c != b'\\')
        && !path.contains("//")
        && !path.split('/').any(|seg| seg == ".." || seg == ".")
}

#[cfg(test)]
mod tests {
    use super::PathClass::*;
    use super::*;

    #[test]
    fn token_paths() {
        assert_eq!(classify("/latest/api/token"), Token);
        assert_eq!(classify("/2021-03-23/api/token"), VersionedToken);
        assert_eq!(classify("/1.0/api/token"), VersionedToken);
        assert_eq!(classify("/latest/api/tokens"), Other("api/tokens"));
        // Only the exact path issues tokens.
        for p in [
            "/latest/api/token/",
            "/latest/api/token?x=1",
            "/latest/api/token?",
            "/2021-03-23/api/token/",
        ] {
            assert_eq!(classify(p), Invalid, "{p}");
        }
    }

    #[test]
    fn credential_paths_under_every_version() {
        for v in ["latest", "2021-03-23", "2009-04-04", "1.0"] {
            let p = alloc::format!("/{v}/meta-data/iam/security-credentials/");
            assert_eq!(classify(&p), RoleList, "{p}");
            let p = alloc::format!("/{v}/meta-data/iam/security-credentials");
            assert_eq!(classify(&p), RoleList, "{p}");
            let p = alloc::format!("/{v}/meta-data/iam/security-credentials/myapp-iam-role");
            assert_eq!(classify(&p), RoleCredentials("myapp-iam-role"), "{p}");
            let p = alloc::format!("/{v}/meta-data/iam/info");
            assert_eq!(classify(&p), IamInfo, "{p}");
            let p = alloc::format!("/{v}/meta-data/iam/security-credentials-extended/r");
            assert_eq!(classify(&p), Extended, "{p}");
        }
        // A credential leaf has one name only.
        assert_eq!(
            classify("/latest/meta-data/iam/security-credentials/r/"),
            Invalid
        );
        assert_eq!(
            classify("/latest/meta-data/iam/security-credentials/r?x=1"),
            RoleCredentials("r")
        );
        assert_eq!(classify("/latest/meta-data/iam/info/"), Invalid);
        assert_eq!(
            classify("/latest/meta-data/iam/security-credentials-extended"),
            Extended
        );
        assert_eq!(
            classify("/latest/meta-data/iam/security-credentials/a/b"),
            Invalid
        );
        assert_eq!(classify("/latest/meta-data/iam/info?foo"), IamInfo);
    }

    #[test]
    fn other_paths_keep_their_relative_path() {
        assert_eq!(
            classify("/latest/meta-data/placement/region"),
            Other("meta-data/placement/region")
        );
        assert_eq!(classify("/latest/meta-data/"), Other("meta-data"));
        assert_eq!(classify("/latest/meta-data/iam"), Other("meta-data/iam"));
        assert_eq!(classify("/latest"), Other(""));
        assert_eq!(classify("/latest/user-data"), Other("user-data"));
        assert_eq!(
            classify("/2016-09-02/dynamic/instance-identity/document"),
            Other("dynamic/instance-identity/document")
        );
    }

    #[test]
    fn refuses_ambiguous_or_unversioned_paths() {
        for p in [
            "",
            "/",
            "latest/meta-data",
            "/foo/meta-data",
            "/2021-3-23/meta-data",
            "/2021-03-2x/meta-data",
            "/latest/meta-data/../iam/security-credentials/",
            "/latest/./meta-data",
            "/latest//meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/security-credentials/%72ole",
            "/latest/meta-data\\iam",
            "/latest/meta data",
            "/latest/meta-data/\u{e9}",
        ] {
            assert_eq!(classify(p), Invalid, "{p:?}");
        }
        let long = alloc::format!("/latest/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(classify(&long), Invalid);
    }

    #[test]
    fn labels() {
        assert_eq!(RoleCredentials("r").label(), "credentials");
        assert_eq!(Invalid.label(), "invalid");
    }
}
