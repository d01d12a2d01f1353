//! What a read asks for, once its path is known to be served: the one key the filter uses for
//! its call-outs and its cache, and the broker matches on. Which paths exist is
//! [`crate::path`]'s business, which may be passed through is [`crate::allow`]'s; this joins
//! the two, so neither side decides it alone.

use alloc::string::{String, ToString};

use crate::allow::AllowList;
use crate::path::PathClass;
use crate::rules::{self, Refusal};

/// A served metadata resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `meta-data/iam/security-credentials/`: the role name.
    RoleList,
    /// The named role's credentials.
    Credentials(String),
    /// `meta-data/iam/info`.
    IamInfo,
    /// An allow-listed path below the version, fetched from the node's IMDS.
    Allowed(String),
    /// The pod's role credentials through the container-credentials endpoint
    /// ([`crate::container`]), for the holder of the token with this digest
    /// ([`crate::container::token_digest`]): an answer is only ever given again to a request
    /// carrying the same token. Never the result of [`Resource::of`] (no IMDS path).
    ContainerCredentials(String),
}

impl Resource {
    /// The resource a read of `class` asks for, or the refusal both sides answer: `404
    /// extended-not-served` for `security-credentials-extended` (SDKs fall back), `404
    /// path-not-allowed` for a path off the allow-list, `404 invalid-path` for anything that
    /// is no readable metadata path (the token endpoint included).
    pub fn of(class: &PathClass<'_>, allow: &AllowList) -> Result<Self, Refusal> {
        match class {
            PathClass::RoleList => Ok(Resource::RoleList),
            PathClass::RoleCredentials(role) => Ok(Resource::Credentials(role.to_string())),
            PathClass::IamInfo => Ok(Resource::IamInfo),
            PathClass::Other(rel) if allow.allows(rel) => Ok(Resource::Allowed(rel.to_string())),
            PathClass::Other(_) => Err(rules::PATH_NOT_ALLOWED),
            PathClass::Extended => Err(rules::EXTENDED_NOT_SERVED),
            PathClass::Token | PathClass::VersionedToken | PathClass::Invalid => {
                Err(rules::NOT_FOUND)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::classify;

    #[test]
    fn what_each_path_is_and_what_is_refused() {
        let allow = AllowList::parse(&["meta-data/placement/*"]).unwrap();
        let of = |p: &str| Resource::of(&classify(p), &allow);
        assert_eq!(
            of("/latest/meta-data/iam/security-credentials/"),
            Ok(Resource::RoleList)
        );
        assert_eq!(
            of("/2021-03-23/meta-data/iam/security-credentials/r"),
            Ok(Resource::Credentials("r".into()))
        );
        assert_eq!(of("/latest/meta-data/iam/info"), Ok(Resource::IamInfo));
        assert_eq!(
            of("/latest/meta-data/placement/region"),
            Ok(Resource::Allowed("meta-data/placement/region".into()))
        );
        let reason = |p: &str| of(p).map_err(|r| (r.status, r.reason));
        assert_eq!(
            reason("/latest/meta-data/local-ipv4"),
            Err((404, "path-not-allowed"))
        );
        assert_eq!(
            reason("/latest/meta-data/iam/security-credentials-extended/r"),
            Err((404, "extended-not-served"))
        );
        assert_eq!(reason("/latest/api/token"), Err((404, "invalid-path")));
        assert_eq!(reason("/latest/../x"), Err((404, "invalid-path")));
    }
}
