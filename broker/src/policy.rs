//! Which role a pod gets: its annotations, the base ARN, the default role and the namespace
//! restrictions (kube2iam's `allowed-roles` globs or regexps, kiam's `permitted` regex),
//! each matched exactly as the project it comes from matches it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use thiserror::Error;

use crate::pods::{Namespace, Pod};
use crate::session;
use crate::sts::AssumeRoleRequest;

/// The pod's role: a name, `path/name`, or a full role ARN. The default key of
/// `--iam-role-key` (kube2iam's flag of that name).
pub const ROLE: &str = "iam.amazonaws.com/role";
/// ExternalId passed to AssumeRole.
pub const EXTERNAL_ID: &str = "iam.amazonaws.com/external-id";
/// RoleSessionName instead of `namespace.pod`.
pub const SESSION_NAME: &str = "iam.amazonaws.com/session-name";
/// kube2iam: namespace annotation, JSON list of globs (or regexps) over role names or ARNs.
pub const ALLOWED_ROLES: &str = "iam.amazonaws.com/allowed-roles";
/// kiam: namespace annotation, regex matched against the role ARN.
pub const PERMITTED: &str = "iam.amazonaws.com/permitted";

/// Which namespace restriction applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Restriction {
    /// Any role a pod names is assumed.
    Off,
    /// kube2iam style: the namespace's `iam.amazonaws.com/allowed-roles` (JSON list of globs,
    /// or regexps with `--namespace-restriction-format regexp`).
    AllowedRoles,
    /// kiam style: the namespace's `iam.amazonaws.com/permitted` (regex on the role ARN).
    Permitted,
}

/// How `iam.amazonaws.com/allowed-roles` entries match: kube2iam's
/// `--namespace-restriction-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestrictionFormat {
    /// `*` matches any characters (`/` too); the entry must cover the whole ARN.
    Glob,
    /// A regular expression searched for anywhere in the ARN (not anchored: end it with
    /// `$` to pin the end).
    Regexp,
}

/// The parts of any ARN: `arn:<partition>:<service>:<region>:<account>:<resource>`.
struct ArnParts<'a> {
    partition: &'a str,
    service: &'a str,
    region: &'a str,
    account: &'a str,
    resource: &'a str,
}

impl<'a> ArnParts<'a> {
    /// Splits at the first five colons (the resource may hold more); `None` when it is not an
    /// ARN, has no partition, or its account is not twelve digits.
    fn split(s: &'a str) -> Option<Self> {
        let mut it = s.splitn(6, ':');
        let (arn, partition, service, region, account, resource) = (
            it.next()?,
            it.next()?,
            it.next()?,
            it.next()?,
            it.next()?,
            it.next()?,
        );
        (arn == "arn" && !partition.is_empty() && is_account(account)).then_some(Self {
            partition,
            service,
            region,
            account,
            resource,
        })
    }

    /// An IAM resource: service `iam`, no region.
    fn is_iam(&self) -> bool {
        self.service == "iam" && self.region.is_empty()
    }
}

/// An IAM role ARN, `arn:<partition>:iam::<account>:role/<path/>name`: the one grammar for
/// role annotations, the default role, glob and regex subjects, and what STS is asked for.
///
/// Path segments and the name are 1-64 characters of `[\w+=,.@-]`, and never `.` or `..`:
/// IAM has no such roles, and a namespace glob such as `team/*` must not match
/// `team/../other`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleArn {
    arn: String,
    partition: String,
    account: String,
    /// `""` or `team/sub/`: every segment followed by `/`.
    path: String,
    name: String,
}

impl RoleArn {
    /// A full role ARN.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IAM role ARN");
        let parts = ArnParts::split(s)
            .filter(ArnParts::is_iam)
            .ok_or_else(bad)?;
        let rel = parts.resource.strip_prefix("role/").ok_or_else(bad)?;
        Self::join(parts.partition, parts.account, "", rel).ok_or_else(bad)
    }

    /// `base_path` (`""` or ending in `/`, already checked) and `rel` (`name` or
    /// `path/name`, checked here).
    fn join(partition: &str, account: &str, base_path: &str, rel: &str) -> Option<Self> {
        if !rel.split('/').all(is_role_segment) {
            return None;
        }
        let (rel_path, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (format!("{p}/"), n),
            None => (String::new(), rel),
        };
        let path = format!("{base_path}{rel_path}");
        Some(Self {
            arn: format!("arn:{partition}:iam::{account}:role/{path}{name}"),
            partition: partition.to_string(),
            account: account.to_string(),
            path,
            name: name.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }

    pub fn partition(&self) -> &str {
        &self.partition
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// `""` or `team/sub/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The role's name as IMDS shows it: the last segment.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instance profile of the same path and name, as IMDS's `iam/info` shows it
    /// (there is no real one behind a pod's role).
    pub fn instance_profile_arn(&self) -> String {
        format!(
            "arn:{}:iam::{}:instance-profile/{}{}",
            self.partition, self.account, self.path, self.name
        )
    }
}

impl Serialize for RoleArn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.arn)
    }
}

impl std::fmt::Display for RoleArn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.arn)
    }
}

/// `arn:<partition>:iam::<account>:role/<path/>`: what role names are appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseArn {
    arn: String,
    partition: String,
    account: String,
    /// `""` or `team/`.
    path: String,
}

impl BaseArn {
    fn new(partition: &str, account: &str, path: &str) -> Self {
        Self {
            arn: format!("arn:{partition}:iam::{account}:role/{path}"),
            partition: partition.to_string(),
            account: account.to_string(),
            path: path.to_string(),
        }
    }

    /// From configuration: `arn:aws:iam::123456789012:role/` (trailing slash optional; a
    /// path such as `role/team/` is kept).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let path = ArnParts::split(s)
            .filter(ArnParts::is_iam)
            .and_then(|p| base_path(p.resource).map(|path| (p, path)));
        match path {
            Some((p, path)) => Ok(Self::new(p.partition, p.account, &path)),
            None => Err(format!(
                "{s:?} is not a role base ARN such as arn:aws:iam::123456789012:role/"
            )),
        }
    }

    /// From the node's own identity (GetCallerIdentity): any ARN with a partition and an
    /// account, typically `arn:aws:sts::123456789012:assumed-role/node-role/i-0abc`.
    pub fn from_caller_arn(arn: &str) -> Option<Self> {
        ArnParts::split(arn).map(|p| Self::new(p.partition, p.account, ""))
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// `rel` (`name` or `path/name`) under this base; `None` when `rel` is not one.
    pub fn role(&self, rel: &str) -> Option<RoleArn> {
        RoleArn::join(&self.partition, &self.account, &self.path, rel)
    }
}

/// `role`, `role/` or `role/<segments>/` → `""` or `<segments>/`: a base whose names,
/// appended, make role ARNs that [`RoleArn::parse`] accepts (found by fuzzing: a `:` in the
/// path did not).
fn base_path(resource: &str) -> Option<String> {
    match resource.strip_prefix("role")? {
        "" | "/" => Some(String::new()),
        rest => {
            let p = rest.strip_prefix('/')?;
            let p = p.strip_suffix('/').unwrap_or(p);
            p.split('/').all(is_role_segment).then(|| format!("{p}/"))
        }
    }
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|c| c.is_ascii_digit())
}

fn is_role_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-')
        })
}

fn is_external_id(s: &str) -> bool {
    (2..=1224).contains(&s.len())
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | ':' | '/' | '-')
        })
}

/// Where the role came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoleSource {
    Annotation,
    Default,
}

/// The namespace restriction's answer and the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub permitted: bool,
    pub rule: String,
}

impl Verdict {
    fn allow(rule: impl Into<String>) -> Self {
        Self {
            permitted: true,
            rule: rule.into(),
        }
    }
    fn deny(rule: impl Into<String>) -> Self {
        Self {
            permitted: false,
            rule: rule.into(),
        }
    }
}

/// What a pod gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub role_arn: RoleArn,
    pub source: RoleSource,
    pub verdict: Verdict,
    /// The AssumeRole call (and cache key) that serves this pod.
    pub request: AssumeRoleRequest,
}

impl Decision {
    pub fn role_name(&self) -> &str {
        self.role_arn.name()
    }
}

/// Why a pod gets no role.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("pod has no role annotation and there is no default role")]
    NoRole,
    #[error("annotation {annotation} is invalid: {problem}")]
    InvalidAnnotation { annotation: String, problem: String },
    #[error("role {0:?} is a name but the base role ARN is not known yet")]
    BaseArnUnknown(String),
    #[error("role {role_arn} not permitted in this namespace: {rule}")]
    NotPermitted { role_arn: String, rule: String },
}

/// The remembered decisions of [`RolePolicy::evaluate_cached`], by pod `Arc`. Each entry
/// holds its pod's `Arc`, so the address it is keyed by cannot be reused by another pod while
/// the entry exists; entries whose pod only the memo still holds (gone from the store) are
/// dropped whenever the memo has doubled since the last sweep.
#[derive(Debug, Default)]
struct Memo {
    entries: HashMap<usize, MemoEntry>,
    sweep_at: usize,
}

#[derive(Debug)]
struct MemoEntry {
    pod: Arc<Pod>,
    ns: Option<Arc<Namespace>>,
    generation: u64,
    decision: Arc<Decision>,
}

impl Memo {
    fn get(
        &self,
        pod: &Arc<Pod>,
        ns: Option<&Arc<Namespace>>,
        generation: u64,
    ) -> Option<Arc<Decision>> {
        let e = self.entries.get(&(Arc::as_ptr(pod) as usize))?;
        let same_ns = match (&e.ns, ns) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        (Arc::ptr_eq(&e.pod, pod) && same_ns && e.generation == generation)
            .then(|| e.decision.clone())
    }

    fn put(
        &mut self,
        pod: &Arc<Pod>,
        ns: Option<&Arc<Namespace>>,
        generation: u64,
        decision: Arc<Decision>,
    ) {
        if self.entries.len() >= self.sweep_at {
            self.entries.retain(|_, e| Arc::strong_count(&e.pod) > 1);
            self.sweep_at = (2 * self.entries.len()).max(64);
        }
        self.entries.insert(
            Arc::as_ptr(pod) as usize,
            MemoEntry {
                pod: pod.clone(),
                ns: ns.cloned(),
                generation,
                decision,
            },
        );
    }
}

/// The memo stays consistent even if a holder panicked (each update is one insert), so a
/// poisoned lock is used as it is.
fn lock(m: &Mutex<Memo>) -> std::sync::MutexGuard<'_, Memo> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the operator configured.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub base_arn: Option<BaseArn>,
    pub default_role: Option<String>,
    pub restriction: Restriction,
    /// How `allowed-roles` entries match.
    pub restriction_format: RestrictionFormat,
    /// kiam's strict `permitted` match (`^…$`); `false` is kiam's
    /// `--disable-strict-namespace-regexp`.
    pub strict_permitted: bool,
    /// The pod annotation that names the role (kube2iam's `--iam-role-key`).
    pub role_key: String,
    pub session_tags: bool,
    pub cluster_name: Option<String>,
    pub source_identity: bool,
    pub duration_secs: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            base_arn: None,
            default_role: None,
            restriction: Restriction::Off,
            restriction_format: RestrictionFormat::Glob,
            strict_permitted: true,
            role_key: ROLE.to_string(),
            session_tags: false,
            cluster_name: None,
            source_identity: false,
            duration_secs: 3600,
        }
    }
}

/// Decides roles. The base ARN may arrive later (discovered from the node's own role).
#[derive(Debug)]
pub struct RolePolicy {
    cfg: PolicyConfig,
    base: RwLock<Option<BaseArn>>,
    /// Bumped whenever the base ARN changes: decisions made before are out of date.
    base_generation: AtomicU64,
    memo: Mutex<Memo>,
}

impl RolePolicy {
    pub fn new(cfg: PolicyConfig) -> Self {
        let base = RwLock::new(cfg.base_arn.clone());
        Self {
            cfg,
            base,
            base_generation: AtomicU64::new(0),
            memo: Mutex::default(),
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    pub fn base_arn(&self) -> Option<BaseArn> {
        self.base.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_base_arn(&self, base: BaseArn) {
        *self.base.write().unwrap_or_else(|e| e.into_inner()) = Some(base);
        self.base_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// [`Self::evaluate`], remembered per pod: a pod's decision depends only on the pod, its
    /// namespace, the base ARN and the configuration, and the pod store replaces a pod's (or
    /// namespace's) `Arc` whenever it changes. So while the same `Arc`s come back with the
    /// same base ARN, the remembered decision is the one `evaluate` would make, without its
    /// string work on every request. Refusals (`Err`) are not remembered.
    pub fn evaluate_cached(
        &self,
        pod: &Arc<Pod>,
        ns: Option<&Arc<Namespace>>,
    ) -> Result<Arc<Decision>, PolicyError> {
        let generation = self.base_generation.load(Ordering::SeqCst);
        if let Some(d) = lock(&self.memo).get(pod, ns, generation) {
            return Ok(d);
        }
        let decision = Arc::new(self.evaluate(pod, ns.map(|n| &**n))?);
        lock(&self.memo).put(pod, ns, generation, decision.clone());
        Ok(decision)
    }

    /// A role annotation (or the default role) as a full ARN.
    pub fn resolve_arn(&self, role: &str) -> Result<RoleArn, PolicyError> {
        let role = role.trim();
        if role.starts_with("arn:") {
            return RoleArn::parse(role).map_err(|problem| PolicyError::InvalidAnnotation {
                annotation: self.cfg.role_key.clone(),
                problem,
            });
        }
        let invalid = || PolicyError::InvalidAnnotation {
            annotation: self.cfg.role_key.clone(),
            problem: format!("{role:?} is not a role name or path/name"),
        };
        let rel = role.strip_prefix('/').unwrap_or(role);
        if !rel.split('/').all(is_role_segment) {
            return Err(invalid());
        }
        let base = self
            .base_arn()
            .ok_or_else(|| PolicyError::BaseArnUnknown(role.to_string()))?;
        base.role(rel).ok_or_else(invalid)
    }

    /// The pod's role and the restriction's verdict; `Err` when there is no usable role.
    pub fn evaluate(&self, pod: &Pod, ns: Option<&Namespace>) -> Result<Decision, PolicyError> {
        let annotated = pod
            .annotation(&self.cfg.role_key)
            .map(str::trim)
            .filter(|r| !r.is_empty());
        let (role, source) = match (annotated, self.cfg.default_role.as_deref()) {
            (Some(r), _) => (r, RoleSource::Annotation),
            (None, Some(d)) => (d, RoleSource::Default),
            (None, None) => return Err(PolicyError::NoRole),
        };
        let role_arn = self.resolve_arn(role)?;
        let verdict = self.check_namespace(role_arn.as_str(), source, ns);

        let session_name = match pod.annotation(SESSION_NAME).map(str::trim) {
            Some(s) if !s.is_empty() => session::fit(s),
            _ => session::default_name(pod),
        };
        let external_id = match pod.annotation(EXTERNAL_ID).map(str::trim) {
            Some(e) if !e.is_empty() => {
                if !is_external_id(e) {
                    return Err(PolicyError::InvalidAnnotation {
                        annotation: EXTERNAL_ID.to_string(),
                        problem: "must be 2-1224 characters of [\\w+=,.@:/-]".into(),
                    });
                }
                Some(e.to_string())
            }
            _ => None,
        };
        let tags = if self.cfg.session_tags {
            session::tags(pod, self.cfg.cluster_name.as_deref())
        } else {
            Vec::new()
        };
        let source_identity = self.cfg.source_identity.then(|| session_name.clone());
        Ok(Decision {
            request: AssumeRoleRequest {
                role_arn: role_arn.to_string(),
                session_name,
                external_id,
                tags,
                source_identity,
                duration_secs: self.cfg.duration_secs,
            },
            role_arn,
            source,
            verdict,
        })
    }

    /// [`Self::evaluate`], refusing what the namespace does not permit.
    pub fn decide(&self, pod: &Pod, ns: Option<&Namespace>) -> Result<Decision, PolicyError> {
        let d = self.evaluate(pod, ns)?;
        if d.verdict.permitted {
            Ok(d)
        } else {
            Err(PolicyError::NotPermitted {
                role_arn: d.role_arn.to_string(),
                rule: d.verdict.rule,
            })
        }
    }

    fn check_namespace(&self, arn: &str, source: RoleSource, ns: Option<&Namespace>) -> Verdict {
        if self.cfg.restriction == Restriction::Off {
            return Verdict::allow("namespace restrictions are off");
        }
        if source == RoleSource::Default || self.is_default_role(arn) {
            // As kube2iam: the operator's default role is permitted everywhere, also when a
            // pod names it (it would get it anyway by dropping its annotation).
            return Verdict::allow("the default role is permitted in every namespace");
        }
        let Some(ns) = ns else {
            return Verdict::deny("namespace not known (yet)");
        };
        match self.cfg.restriction {
            Restriction::Off => Verdict::allow("namespace restrictions are off"),
            Restriction::AllowedRoles => self.check_allowed_roles(arn, ns),
            Restriction::Permitted => check_permitted(arn, ns, self.cfg.strict_permitted),
        }
    }

    /// `arn` is the configured default role (kube2iam compares the resolved ARNs).
    fn is_default_role(&self, arn: &str) -> bool {
        self.cfg
            .default_role
            .as_deref()
            .and_then(|d| self.resolve_arn(d).ok())
            .is_some_and(|d| d.as_str() == arn)
    }

    /// kube2iam's `checkRoleForNamespace`: each entry is made a full ARN as a role is (the
    /// base ARN prepended unless it starts with `arn:`), then matched against the role's ARN
    /// as kube2iam's `--namespace-restriction-format` says: `glob` (only `*`, which matches
    /// any characters, `/` included; the whole ARN) or `regexp` (a search anywhere in the
    /// ARN, not anchored).
    fn check_allowed_roles(&self, arn: &str, ns: &Namespace) -> Verdict {
        let entries = match &ns.rules().allowed_roles {
            None => {
                return Verdict::deny(format!("namespace {} has no {ALLOWED_ROLES}", ns.name));
            }
            Some(Err(NotAList)) => {
                return Verdict::deny(format!(
                    "{ALLOWED_ROLES} of namespace {} is not a JSON list of strings",
                    ns.name
                ));
            }
            Some(Ok(entries)) => entries,
        };
        let base = self.base_arn();
        for e in entries {
            let matched = match (self.cfg.restriction_format, e.scope) {
                (RestrictionFormat::Glob, GlobScope::Arn) => glob_match(&e.pattern, arn),
                // No base yet: a name entry matches nothing.
                (RestrictionFormat::Glob, GlobScope::UnderBase) => base
                    .as_ref()
                    .is_some_and(|b| glob_match(&format!("{}{}", b.as_str(), e.pattern), arn)),
                (RestrictionFormat::Regexp, GlobScope::Arn) => {
                    e.regex_arn.as_ref().is_ok_and(|re| re.is_match(arn))
                }
                (RestrictionFormat::Regexp, GlobScope::UnderBase) => base
                    .as_ref()
                    .is_some_and(|b| e.regex_under(b).is_some_and(|re| re.is_match(arn))),
            };
            // An entry that does not compile matches nothing (the others still count).
            if matched {
                return Verdict::allow(format!("{ALLOWED_ROLES} entry {:?}", e.entry));
            }
        }
        Verdict::deny(format!(
            "no {ALLOWED_ROLES} entry of namespace {} matches",
            ns.name
        ))
    }
}

/// kiam's `NamespacePermittedRoleNamePolicy`: the expression is matched against the role's
/// resolved ARN; strict (kiam's default) is `"^" + expression + "$"` — text pasted around the
/// expression, so a top-level `|` leaves its alternatives anchored at one end each — and
/// not strict (kiam's `--disable-strict-namespace-regexp`) a search anywhere in the ARN. An
/// empty annotation permits nothing.
fn check_permitted(arn: &str, ns: &Namespace, strict: bool) -> Verdict {
    let Some(permitted) = &ns.rules().permitted else {
        return Verdict::deny(format!("namespace {} has no {PERMITTED}", ns.name));
    };
    let regex = if strict {
        &permitted.strict
    } else {
        &permitted.search
    };
    match regex {
        Ok(re) if re.is_match(arn) => Verdict::allow(format!("{PERMITTED} {:?}", permitted.raw)),
        Ok(_) => Verdict::deny(format!(
            "{PERMITTED} of namespace {} does not match the role ARN{}",
            ns.name,
            if strict { " (strict: ^…$)" } else { "" }
        )),
        Err(InvalidRegex) => Verdict::deny(format!(
            "{PERMITTED} of namespace {} is not a valid regex",
            ns.name
        )),
    }
}

/// kube2iam's glob (github.com/ryanuber/go-glob): `*` matches any run of characters, `/`
/// included; every other character, `?`, `[` and `\` among them, is itself.
fn glob_match(pattern: &str, subject: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        // No `*`: the whole subject.
        return pattern == subject;
    };
    let Some(mut rest) = subject.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// `iam.amazonaws.com/allowed-roles` is not a JSON list of strings: the namespace permits
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NotAList;

/// A restriction regex does not compile: it permits nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InvalidRegex;

/// What an allowed-roles entry is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GlobScope {
    /// An entry starting with `arn:` (any case, as kube2iam): the whole role ARN.
    Arn,
    /// A role name or path: the base ARN is prepended (known at evaluation, it may be
    /// discovered after the namespace is stored).
    UnderBase,
}

#[derive(Debug)]
struct AllowedRole {
    /// The entry as written (trimmed), for the verdict's rule.
    entry: String,
    scope: GlobScope,
    /// The entry without a leading `/` (for name entries, as role annotations are read).
    pattern: String,
    /// `regexp` format, an `arn:` entry: compiled when stored.
    regex_arn: Result<regex::Regex, InvalidRegex>,
    /// `regexp` format, a name entry: `base + entry`, compiled on first use for the base
    /// it is used with (the base is set once, at start or when discovered).
    regex_under_base: Mutex<Option<(String, Option<regex::Regex>)>>,
}

impl AllowedRole {
    /// kube2iam pastes the base in front of the expression; here the base is taken literally
    /// (escaped), which differs only for a base whose path holds `.` or `+`.
    fn regex_under(&self, base: &BaseArn) -> Option<regex::Regex> {
        let mut cached = self
            .regex_under_base
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            Some((b, re)) if b == base.as_str() => re.clone(),
            _ => {
                let re = compile(&format!("{}{}", regex::escape(base.as_str()), self.pattern)).ok();
                *cached = Some((base.as_str().to_string(), re.clone()));
                re
            }
        }
    }
}

#[derive(Debug)]
struct Permitted {
    raw: String,
    /// kiam's strict form, `^` + expression + `$`.
    strict: Result<regex::Regex, InvalidRegex>,
    /// The expression as written, searched for anywhere.
    search: Result<regex::Regex, InvalidRegex>,
}

/// Restriction regexes from annotations: bounded, so a huge annotation cannot make the
/// broker compile (and hold) a huge automaton.
fn compile(re: &str) -> Result<regex::Regex, InvalidRegex> {
    regex::RegexBuilder::new(re)
        .size_limit(1 << 20)
        .build()
        .map_err(|_| InvalidRegex)
}

/// A namespace's restriction annotations, compiled once when the namespace is stored
/// ([`Namespace::new`]) instead of on every evaluation; a malformed one keeps its error, to
/// refuse with at evaluation (fail closed).
#[derive(Debug, Default)]
pub struct NamespaceRules {
    /// `None`: no annotation.
    allowed_roles: Option<Result<Vec<AllowedRole>, NotAList>>,
    /// `None`: no annotation, or an empty one (kiam: nothing permitted).
    permitted: Option<Permitted>,
}

impl NamespaceRules {
    /// Compiles both annotations in every form (which one applies is the broker's setting,
    /// read at evaluation).
    pub fn compile(annotations: &BTreeMap<String, String>) -> Self {
        let allowed_roles = annotations.get(ALLOWED_ROLES).map(|raw| {
            let entries = serde_json::from_str::<Vec<String>>(raw).map_err(|_| NotAList)?;
            Ok(entries
                .iter()
                .map(|g| {
                    let g = g.trim();
                    let is_arn = g.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("arn:"));
                    let (scope, pattern) = if is_arn {
                        (GlobScope::Arn, g)
                    } else {
                        (GlobScope::UnderBase, g.strip_prefix('/').unwrap_or(g))
                    };
                    AllowedRole {
                        entry: g.to_string(),
                        scope,
                        pattern: pattern.to_string(),
                        regex_arn: if is_arn {
                            compile(g)
                        } else {
                            Err(InvalidRegex)
                        },
                        regex_under_base: Mutex::new(None),
                    }
                })
                .collect())
        });
        let permitted = annotations
            .get(PERMITTED)
            .filter(|raw| !raw.is_empty())
            .map(|raw| Permitted {
                raw: raw.clone(),
                strict: compile(&format!("^{raw}$")),
                search: compile(raw),
            });
        Self {
            allowed_roles,
            permitted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn policy(restriction: Restriction) -> RolePolicy {
        RolePolicy::new(PolicyConfig {
            base_arn: Some(BaseArn::parse(BASE).unwrap()),
            restriction,
            ..PolicyConfig::default()
        })
    }

    fn pod(anns: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: "default".into(),
            name: "myapp".into(),
            annotations: anns
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Pod::default()
        }
    }

    fn ns(anns: &[(&str, &str)]) -> Namespace {
        Namespace::new(
            "default",
            anns.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    /// The remembered decision is the one `evaluate` makes, for the same pod and namespace
    /// objects and base ARN only; a changed pod, namespace or base ARN is decided again.
    #[test]
    fn remembered_decisions_follow_the_pod_namespace_and_base_arn() {
        let p = policy(Restriction::AllowedRoles);
        let a = Arc::new(pod(&[(ROLE, "app")]));
        let allowing = Arc::new(ns(&[(ALLOWED_ROLES, r#"["app"]"#)]));
        let first = p.evaluate_cached(&a, Some(&allowing)).unwrap();
        assert_eq!(*first, p.evaluate(&a, Some(&allowing)).unwrap());
        assert!(first.verdict.permitted);
        let again = p.evaluate_cached(&a, Some(&allowing)).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "same objects: remembered");

        // The namespace changed (a new object): decided again, now refused.
        let denying = Arc::new(ns(&[(ALLOWED_ROLES, r#"["other"]"#)]));
        assert!(
            !p.evaluate_cached(&a, Some(&denying))
                .unwrap()
                .verdict
                .permitted
        );
        assert!(!p.evaluate_cached(&a, None).unwrap().verdict.permitted);

        // The pod changed (a new object with another role).
        let b = Arc::new(pod(&[(ROLE, "other")]));
        let d = p.evaluate_cached(&b, Some(&denying)).unwrap();
        assert_eq!(d.role_name(), "other");
        assert!(d.verdict.permitted);

        // The base ARN changed: decided again under the new one.
        p.set_base_arn(BaseArn::parse("arn:aws:iam::210987654321:role/").unwrap());
        let d = p.evaluate_cached(&a, Some(&allowing)).unwrap();
        assert_eq!(d.role_arn.as_str(), "arn:aws:iam::210987654321:role/app");

        // Refusals are never remembered, and pods gone from everywhere else are swept.
        let none = Arc::new(pod(&[]));
        assert_eq!(p.evaluate_cached(&none, None), Err(PolicyError::NoRole));
        drop((a, b));
        for _ in 0..100 {
            let fresh = Arc::new(pod(&[(ROLE, "app")]));
            p.evaluate_cached(&fresh, None).unwrap();
        }
        assert!(
            lock(&p.memo).entries.len() <= 64,
            "entries of dropped pods are swept"
        );
    }

    #[test]
    fn base_arn_forms() {
        assert_eq!(
            BaseArn::parse("arn:aws:iam::123456789012:role")
                .unwrap()
                .as_str(),
            BASE
        );
        assert!(BaseArn::parse("arn:aws:iam::12345:role/").is_err());
        assert!(BaseArn::parse("arn:aws:s3:::bucket").is_err());
        assert_eq!(
            BaseArn::from_caller_arn("arn:aws-cn:sts::123456789012:assumed-role/node/i-1")
                .unwrap()
                .as_str(),
            "arn:aws-cn:iam::123456789012:role/"
        );
        assert!(BaseArn::from_caller_arn("nonsense").is_none());
    }

    #[test]
    fn role_forms() {
        let p = policy(Restriction::Off);
        let arn = |role: &str| p.resolve_arn(role).map(|a| a.to_string());
        assert_eq!(arn("myapp").unwrap(), format!("{BASE}myapp"));
        assert_eq!(arn("team/myapp").unwrap(), format!("{BASE}team/myapp"));
        assert_eq!(arn("/team/myapp").unwrap(), format!("{BASE}team/myapp"));
        let full = "arn:aws:iam::999999999999:role/x/y";
        assert_eq!(arn(full).unwrap(), full);
        for bad in ["arn:aws:s3:::b", "a b", "team//x", "arn:aws:iam::1:role/x"] {
            assert!(
                matches!(
                    p.resolve_arn(bad),
                    Err(PolicyError::InvalidAnnotation { .. })
                ),
                "{bad}"
            );
        }
        let no_base = RolePolicy::new(PolicyConfig::default());
        assert_eq!(
            no_base.resolve_arn("x"),
            Err(PolicyError::BaseArnUnknown("x".into()))
        );
        assert_eq!(no_base.resolve_arn(full).unwrap().as_str(), full);
        no_base.set_base_arn(BaseArn::parse(BASE).unwrap());
        assert_eq!(
            no_base.resolve_arn("x").unwrap().as_str(),
            format!("{BASE}x")
        );
    }

    #[test]
    fn role_arn_parts() {
        let a = RoleArn::parse("arn:aws-cn:iam::123456789012:role/team/sub/app").unwrap();
        assert_eq!(
            (a.partition(), a.account(), a.path(), a.name()),
            ("aws-cn", "123456789012", "team/sub/", "app")
        );
        assert_eq!(
            a.to_string(),
            "arn:aws-cn:iam::123456789012:role/team/sub/app"
        );
        let plain = RoleArn::parse(&format!("{BASE}app")).unwrap();
        assert_eq!((plain.path(), plain.name()), ("", "app"));
        // The base's path and the annotation's path make one path.
        let base = BaseArn::parse("arn:aws:iam::123456789012:role/ns").unwrap();
        assert_eq!(base.as_str(), "arn:aws:iam::123456789012:role/ns/");
        let joined = base.role("team/app").unwrap();
        assert_eq!((joined.path(), joined.name()), ("ns/team/", "app"));
        assert_eq!(
            joined.instance_profile_arn(),
            "arn:aws:iam::123456789012:instance-profile/ns/team/app"
        );
        assert_eq!(RoleArn::parse(joined.as_str()), Ok(joined));
        for bad in [
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:user/app",
            "arn:aws:iam:us-east-1:123456789012:role/app",
            "arn::iam::123456789012:role/app",
            "arn:aws:sts::123456789012:role/app",
            "arn:aws:iam::123456789012:role/a:b",
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dot_segments_are_refused() {
        // `team/*` would match `team/../x`; IAM role paths hold no such segments.
        let p = policy(Restriction::AllowedRoles);
        let n = ns(&[(ALLOWED_ROLES, r#"["team/*"]"#)]);
        assert!(p.decide(&pod(&[(ROLE, "team/app")]), Some(&n)).is_ok());
        for bad in [
            "team/../x",
            "team/./x",
            "/team/../x",
            "..",
            "team/..",
            "arn:aws:iam::123456789012:role/team/../x",
            "arn:aws:iam::123456789012:role/./x",
        ] {
            let e = p.decide(&pod(&[(ROLE, bad)]), Some(&n)).unwrap_err();
            assert!(
                matches!(
                    e,
                    PolicyError::InvalidAnnotation { ref annotation, .. } if annotation == ROLE
                ),
                "{bad}: {e:?}"
            );
        }
        assert!(BaseArn::parse("arn:aws:iam::123456789012:role/../").is_err());
        assert!(BaseArn::parse("arn:aws:iam::123456789012:role/a/./").is_err());
        // Dots inside a segment are still fine.
        assert!(p.resolve_arn("team/app.v2").is_ok());
        assert!(p.resolve_arn("team/...").is_ok());
    }

    #[test]
    fn default_role_and_annotations() {
        let p = policy(Restriction::Off);
        assert_eq!(p.decide(&pod(&[]), None), Err(PolicyError::NoRole));
        let with_default = RolePolicy::new(PolicyConfig {
            default_role: Some("fallback".into()),
            ..p.config().clone()
        });
        let d = with_default.decide(&pod(&[]), None).unwrap();
        assert_eq!(d.role_arn.as_str(), format!("{BASE}fallback"));
        assert_eq!(d.source, RoleSource::Default);
        assert_eq!(d.request.session_name, "default.myapp");

        let d = p
            .decide(
                &pod(&[
                    (ROLE, "myapp-iam-role"),
                    (EXTERNAL_ID, "ext-123"),
                    (SESSION_NAME, "custom name"),
                ]),
                None,
            )
            .unwrap();
        assert_eq!(d.role_name(), "myapp-iam-role");
        assert_eq!(d.request.external_id.as_deref(), Some("ext-123"));
        assert_eq!(d.request.session_name, "custom-name");
        assert!(d.request.tags.is_empty());
        assert_eq!(d.request.duration_secs, 3600);
        assert!(matches!(
            p.decide(&pod(&[(ROLE, "r"), (EXTERNAL_ID, "x")]), None),
            Err(PolicyError::InvalidAnnotation { .. })
        ));
    }

    #[test]
    fn tags_and_source_identity_when_configured() {
        let p = RolePolicy::new(PolicyConfig {
            session_tags: true,
            source_identity: true,
            cluster_name: Some("c1".into()),
            ..policy(Restriction::Off).config().clone()
        });
        let d = p.decide(&pod(&[(ROLE, "r")]), None).unwrap();
        assert_eq!(d.request.source_identity.as_deref(), Some("default.myapp"));
        assert!(
            d.request
                .tags
                .iter()
                .any(|(k, v)| k == session::TAG_CLUSTER && v == "c1")
        );
    }

    #[test]
    fn allowed_roles_globs() {
        let p = policy(Restriction::AllowedRoles);
        let n = ns(&[(
            ALLOWED_ROLES,
            r#"["allowed-*", "arn:aws:iam::999999999999:role/x"]"#,
        )]);
        assert!(p.decide(&pod(&[(ROLE, "allowed-one")]), Some(&n)).is_ok());
        assert!(
            p.decide(&pod(&[(ROLE, "allowed-team/deep")]), Some(&n))
                .is_ok()
        );
        assert!(
            p.decide(
                &pod(&[(ROLE, "arn:aws:iam::999999999999:role/x")]),
                Some(&n)
            )
            .is_ok()
        );
        assert!(matches!(
            p.decide(&pod(&[(ROLE, "other")]), Some(&n)),
            Err(PolicyError::NotPermitted { .. })
        ));
        // No annotation, bad JSON, unknown namespace: refused.
        for n in [ns(&[]), ns(&[(ALLOWED_ROLES, "allowed-*")])] {
            assert!(p.decide(&pod(&[(ROLE, "allowed-one")]), Some(&n)).is_err());
        }
        assert!(p.decide(&pod(&[(ROLE, "allowed-one")]), None).is_err());
    }

    #[test]
    fn glob_is_go_glob() {
        // github.com/ryanuber/go-glob v1.0.0 (kube2iam's glob), its own glob_test.go.
        assert!(glob_match("", ""));
        assert!(!glob_match("", "test"));
        for p in ["", "*", "**", "***", "****************"] {
            assert!(glob_match(p, ""), "{p:?}");
        }
        for p in [
            "test",
            "*test*",
            "*x",
            "*****************x",
            "x*",
            "x*****************",
            "x*x",
            "x****************x",
        ] {
            assert!(!glob_match(p, ""), "{p:?}");
        }
        assert!(glob_match("test", "test"));
        for p in [
            "*test",
            "this*",
            "this*test",
            "*is *",
            "*is*a*",
            "**test**",
            "**is**a***test*",
            "* *",
            "*",
            "**********",
            "*Ѿ*",
            "*is a ϗѾ *",
        ] {
            assert!(glob_match(p, "this is a ϗѾ test"), "{p:?}");
        }
        for p in [
            "test*",
            "*is",
            "*no*",
            " ",
            "* ",
            " *",
            "*ʤ*",
            "this*this is a test",
        ] {
            assert!(!glob_match(p, "this is a test"), "{p:?}");
        }
        // Only `*` is special: no `?`, classes, braces or escapes, unlike shell globs.
        for (p, s) in [("a?c", "abc"), ("[ab]-x", "a-x"), ("{web,api}-1", "web-1")] {
            assert!(!glob_match(p, s), "{p:?} {s:?}");
            assert!(glob_match(p, p), "{p:?}");
        }
        assert!(glob_match("team/*", "team/sub/app"));
    }

    /// A row of kube2iam's `TestCheckRoleForNamespace`: name, format, default role,
    /// namespace annotation, the pod's role ARN, expected.
    type Kube2iamCase = (
        &'static str,
        RestrictionFormat,
        &'static str,
        Option<&'static str>,
        &'static str,
        bool,
    );

    /// kube2iam's `TestCheckRoleForNamespace` (mappings/mapper_test.go), row by row.
    #[test]
    fn kube2iam_check_role_for_namespace() {
        const RESTRICTED: &[Kube2iamCase] = {
            use RestrictionFormat::{Glob, Regexp};
            &[
                (
                    "default partial",
                    Glob,
                    "default-role",
                    None,
                    "arn:aws:iam::123456789012:role/default-role",
                    true,
                ),
                (
                    "default full arn",
                    Glob,
                    "arn:aws:iam::123456789012:role/default-role",
                    None,
                    "arn:aws:iam::123456789012:role/default-role",
                    true,
                ),
                (
                    "partial arn in annotation",
                    Glob,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "partial glob in annotation",
                    Glob,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["path/*"]"#),
                    "arn:aws:iam::123456789012:role/path/explicit-role",
                    true,
                ),
                (
                    "full arn in annotation",
                    Glob,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["arn:aws:iam::123456789012:role/explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "full arn with glob in annotation",
                    Glob,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["arn:aws:iam::123456789012:role/path/*-role"]"#),
                    "arn:aws:iam::123456789012:role/path/explicit-role",
                    true,
                ),
                (
                    "full arn not in annotation",
                    Glob,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["arn:aws:iam::123456789012:role/explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/test-role",
                    false,
                ),
                (
                    "no annotations",
                    Glob,
                    "",
                    Some(""),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    false,
                ),
                (
                    "multiple annotations, no match",
                    Glob,
                    "",
                    Some(r#"["explicit-role", "explicit-role2"]"#),
                    "arn:aws:iam::123456789012:role/test-role",
                    false,
                ),
                (
                    "multiple annotations, matches exact 1st",
                    Glob,
                    "",
                    Some(r#"["explicit-role", "explicit-role2"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "multiple annotations, matches exact 2nd",
                    Glob,
                    "",
                    Some(r#"["explicit-role2", "explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "multiple annotations, matches glob 1st",
                    Glob,
                    "",
                    Some(r#"["glob-*", "explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/glob-role",
                    true,
                ),
                (
                    "multiple annotations, matches glob 2nd",
                    Glob,
                    "",
                    Some(r#"["explicit-role", "glob-*"]"#),
                    "arn:aws:iam::123456789012:role/glob-role",
                    true,
                ),
                (
                    "(regexp) default partial",
                    Regexp,
                    "default-role",
                    None,
                    "arn:aws:iam::123456789012:role/default-role",
                    true,
                ),
                (
                    "(regexp) default full arn",
                    Regexp,
                    "arn:aws:iam::123456789012:role/default-role",
                    None,
                    "arn:aws:iam::123456789012:role/default-role",
                    true,
                ),
                (
                    "(regexp) partial arn in annotation",
                    Regexp,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "(regexp) partial regexp in annotation",
                    Regexp,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["path/.*"]"#),
                    "arn:aws:iam::123456789012:role/path/explicit-role",
                    true,
                ),
                (
                    "(regexp) full arn in annotation",
                    Regexp,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["arn:aws:iam::123456789012:role/explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "(regexp) full arn with regexp in annotation",
                    Regexp,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["arn:aws:iam::123456789012:role/path/.*-role"]"#),
                    "arn:aws:iam::123456789012:role/path/explicit-role",
                    true,
                ),
                (
                    "(regexp) full arn not in annotation",
                    Regexp,
                    "arn:aws:iam::123456789012:role/default-role",
                    Some(r#"["arn:aws:iam::123456789012:role/explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/test-role",
                    false,
                ),
                (
                    "(regexp) no annotations",
                    Regexp,
                    "",
                    Some(""),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    false,
                ),
                (
                    "(regexp) multiple annotations, no match",
                    Regexp,
                    "",
                    Some(r#"["explicit-role", "explicit-role2"]"#),
                    "arn:aws:iam::123456789012:role/test-role",
                    false,
                ),
                (
                    "(regexp) multiple annotations, matches exact 1st",
                    Regexp,
                    "",
                    Some(r#"["explicit-role", "explicit-role2"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "(regexp) multiple annotations, matches exact 2nd",
                    Regexp,
                    "",
                    Some(r#"["explicit-role2", "explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/explicit-role",
                    true,
                ),
                (
                    "(regexp) multiple annotations, matches regexp 1st",
                    Regexp,
                    "",
                    Some(r#"["glob-.*", "explicit-role"]"#),
                    "arn:aws:iam::123456789012:role/glob-role",
                    true,
                ),
                (
                    "(regexp) multiple annotations, matches regexp 2nd",
                    Regexp,
                    "",
                    Some(r#"["explicit-role", "glob-.*"]"#),
                    "arn:aws:iam::123456789012:role/glob-role",
                    true,
                ),
            ]
        };
        for &(name, format, default, annotation, arn, want) in RESTRICTED {
            let p = RolePolicy::new(PolicyConfig {
                base_arn: Some(BaseArn::parse(BASE).unwrap()),
                default_role: (!default.is_empty()).then(|| default.to_string()),
                restriction: Restriction::AllowedRoles,
                restriction_format: format,
                ..PolicyConfig::default()
            });
            let n = ns(&annotation
                .map(|a| vec![(ALLOWED_ROLES, a)])
                .unwrap_or_default());
            let got = p
                .decide(&pod(&[(ROLE, arn)]), Some(&n))
                .map(|d| d.role_arn.to_string());
            assert_eq!(got.is_ok(), want, "{name}: {got:?}");
        }
        // "No restrictions": any role.
        let off = policy(Restriction::Off);
        assert!(off.decide(&pod(&[(ROLE, "explicit-role")]), None).is_ok());
    }

    #[test]
    fn kube2iam_regexp_is_a_search_and_glob_is_whole() {
        // As kube2iam: `regexp.MatchString(base + entry, arn)` finds the expression anywhere,
        // so a name entry also permits every longer name; `$` pins the end.
        let p = |format| {
            RolePolicy::new(PolicyConfig {
                restriction_format: format,
                ..policy(Restriction::AllowedRoles).config().clone()
            })
        };
        let (re, glob) = (p(RestrictionFormat::Regexp), p(RestrictionFormat::Glob));
        let n = ns(&[(ALLOWED_ROLES, r#"["explicit-role"]"#)]);
        for (role, by_re, by_glob) in [
            ("explicit-role", true, true),
            ("explicit-role2", true, false),
            ("explicit-role/x", true, false),
            ("x/explicit-role", false, false),
        ] {
            let r = pod(&[(ROLE, role)]);
            assert_eq!(re.decide(&r, Some(&n)).is_ok(), by_re, "regexp {role}");
            assert_eq!(glob.decide(&r, Some(&n)).is_ok(), by_glob, "glob {role}");
        }
        let pinned = ns(&[(ALLOWED_ROLES, r#"["explicit-role$"]"#)]);
        assert!(
            re.decide(&pod(&[(ROLE, "explicit-role")]), Some(&pinned))
                .is_ok()
        );
        assert!(
            re.decide(&pod(&[(ROLE, "explicit-role2")]), Some(&pinned))
                .is_err()
        );
        // A top-level `|` splits `base + entry`: its second branch is searched on its own.
        let alt = ns(&[(ALLOWED_ROLES, r#"["app|shared"]"#)]);
        assert!(
            re.decide(&pod(&[(ROLE, "team/shared-x")]), Some(&alt))
                .is_ok()
        );
        // An `arn:` entry (any case) is not prefixed; an invalid one matches nothing.
        let arn = ns(&[(
            ALLOWED_ROLES,
            r#"["(", "ARN:aws:iam::999999999999:role/.*"]"#,
        )]);
        assert!(re.decide(&pod(&[(ROLE, "anything")]), Some(&arn)).is_err());
        let other = pod(&[(ROLE, "arn:aws:iam::999999999999:role/x")]);
        assert!(
            re.decide(&other, Some(&arn)).is_err(),
            "regexp is case-sensitive"
        );
        let lower = ns(&[(ALLOWED_ROLES, r#"["arn:aws:iam::999999999999:role/.*"]"#)]);
        assert!(re.decide(&other, Some(&lower)).is_ok());
        // Entries with a base discovered later: compiled for that base on first use.
        let late = RolePolicy::new(PolicyConfig {
            restriction: Restriction::AllowedRoles,
            restriction_format: RestrictionFormat::Regexp,
            ..PolicyConfig::default()
        });
        let r = pod(&[(ROLE, &format!("{BASE}explicit-role"))]);
        assert!(late.decide(&r, Some(&n)).is_err());
        late.set_base_arn(BaseArn::parse(BASE).unwrap());
        assert!(late.decide(&r, Some(&n)).is_ok());
        late.set_base_arn(BaseArn::parse("arn:aws:iam::123456789012:role/ns/").unwrap());
        assert!(late.decide(&r, Some(&n)).is_err());
    }

    #[test]
    fn kube2iam_default_role_is_permitted_when_named() {
        // kube2iam: `roleArn == defaultRoleARN` passes the namespace check.
        let p = RolePolicy::new(PolicyConfig {
            default_role: Some("default-role".into()),
            ..policy(Restriction::AllowedRoles).config().clone()
        });
        let n = ns(&[(ALLOWED_ROLES, r#"["other"]"#)]);
        for role in [
            "default-role",
            "/default-role",
            &format!("{BASE}default-role"),
        ] {
            let d = p.decide(&pod(&[(ROLE, role)]), Some(&n)).unwrap();
            assert_eq!(d.source, RoleSource::Annotation);
        }
        assert!(
            p.decide(&pod(&[(ROLE, "default-role2")]), Some(&n))
                .is_err()
        );
    }

    #[test]
    fn kube2iam_extract_role_arn_with_a_custom_role_key() {
        // kube2iam's `TestExtractRoleARN`, with its test key `roleKey`.
        let p = |default: Option<&str>| {
            RolePolicy::new(PolicyConfig {
                role_key: "roleKey".into(),
                default_role: default.map(str::to_string),
                ..policy(Restriction::Off).config().clone()
            })
        };
        let arn = |p: &RolePolicy, anns: &[(&str, &str)]| {
            p.decide(&pod(anns), None).map(|d| d.role_arn.to_string())
        };
        assert_eq!(arn(&p(None), &[]), Err(PolicyError::NoRole));
        assert_eq!(
            arn(&p(None), &[("roleKey", "explicit-role")]).unwrap(),
            "arn:aws:iam::123456789012:role/explicit-role"
        );
        let d = p(Some("explicit-default-role"));
        assert_eq!(
            arn(&d, &[]).unwrap(),
            "arn:aws:iam::123456789012:role/explicit-default-role"
        );
        assert_eq!(
            arn(&d, &[("roleKey", "something")]).unwrap(),
            "arn:aws:iam::123456789012:role/something"
        );
        assert_eq!(
            arn(
                &d,
                &[("roleKey", "arn:aws:iam::999999999999:role/explicit-arn")]
            )
            .unwrap(),
            "arn:aws:iam::999999999999:role/explicit-arn"
        );
        assert_eq!(
            arn(&d, &[("nonMatchingAnnotation", "something")]).unwrap(),
            "arn:aws:iam::123456789012:role/explicit-default-role"
        );
        // The standard key means nothing once another is configured.
        assert_eq!(arn(&p(None), &[(ROLE, "x")]), Err(PolicyError::NoRole));
        let e = p(None)
            .decide(&pod(&[("roleKey", "a b")]), None)
            .unwrap_err();
        assert!(e.to_string().contains("roleKey"), "{e}");
    }

    /// kiam's pkg/server/policy_test.go: namespace expression, resolver prefix, requested
    /// role, strict?, expected.
    #[test]
    fn kiam_namespace_policy() {
        const ACCT: &str = "arn:aws:iam::123456789012:role/";
        // kiam's tests use the account "account-id"; our ARNs need twelve digits.
        const SUB: &str = "arn:aws:iam::123456789012:role/subpath/";
        let cases: &[(&str, &str, &str, bool, bool)] = &[
            // TestVagueNamespaceAnnotationRegex
            ("o", ACCT, "red_role", true, false),
            ("o", ACCT, "/red_role", true, false),
            ("o", ACCT, "red_role", false, true),
            ("o", ACCT, "/red_role", false, true),
            // TestNotAllowedWithoutWildcardNamespaceAnnotationRegex
            ("role", ACCT, "red_role", true, false),
            ("role", ACCT, "/red_role", true, false),
            ("role", ACCT, "red_role", false, true),
            ("role", ACCT, "/red_role", false, true),
            // TestAllowedWithWildcardNamespaceAnnotationRegex
            (".*role", ACCT, "red_role", true, true),
            (".*role", ACCT, "/red_role", true, true),
            (".*role", ACCT, "red_role", false, true),
            (".*role", ACCT, "/red_role", false, true),
            // TestAllowedWithARNResolverBaseRole
            (
                "arn:aws:iam::123456789012:role/.*",
                ACCT,
                "red_role",
                true,
                true,
            ),
            (
                "arn:aws:iam::123456789012:role/.*",
                ACCT,
                "/red_role",
                true,
                true,
            ),
            // TestAllowedWithSubPathRegexInNamespace
            (".*/subpath/.*", SUB, "red_role", true, true),
            (".*/subpath/.*", SUB, "/red_role", true, true),
            // TestNotAllowedWithoutSubPathRegexInNamespace
            (
                "arn:aws:iam::123456789012:role/red.*",
                SUB,
                "red_role",
                true,
                false,
            ),
            (
                "arn:aws:iam::123456789012:role/red.*",
                SUB,
                "/red_role",
                true,
                false,
            ),
            // TestAllowedWithExactSubPathInNamespace
            (
                "arn:aws:iam::123456789012:role/subpath/red_role",
                SUB,
                "red_role",
                true,
                true,
            ),
            (
                "arn:aws:iam::123456789012:role/subpath/red_role",
                SUB,
                "/red_role",
                true,
                true,
            ),
            // TestNotAllowedWithoutExactSubPathInNamespace
            (
                "arn:aws:iam::123456789012:role/subpath/blue_role",
                SUB,
                "red_role",
                true,
                false,
            ),
            (
                "arn:aws:iam::123456789012:role/subpath/blue_role",
                SUB,
                "/red_role",
                true,
                false,
            ),
            // TestNotAllowedWithoutNamespaceAnnotation(WithSlash): empty permits nothing.
            ("", ACCT, "red_role", true, false),
            ("", ACCT, "/red_role", true, false),
            ("", ACCT, "red_role", false, false),
            ("", ACCT, "/red_role", false, false),
            // kiam's README: `iam.amazonaws.com/permitted: ".*"`.
            (".*", ACCT, "reportingdb-reader", true, true),
            // docs/UPGRADING.md (v3 to v4): `^test-role$` no longer matches `test-role`,
            // `.*test-role` matches the full ARN.
            ("^test-role$", ACCT, "test-role", true, false),
            (
                ".*test-role",
                ACCT,
                "arn:aws:iam::123456789012:role/test-role",
                true,
                true,
            ),
        ];
        for &(expr, base, role, strict, want) in cases {
            let p = RolePolicy::new(PolicyConfig {
                base_arn: Some(BaseArn::parse(base).unwrap()),
                restriction: Restriction::Permitted,
                strict_permitted: strict,
                ..PolicyConfig::default()
            });
            let n = ns(&[(PERMITTED, expr)]);
            let got = p.decide(&pod(&[(ROLE, role)]), Some(&n));
            assert_eq!(
                got.is_ok(),
                want,
                "{expr:?} {base} {role} strict={strict}: {got:?}"
            );
        }
    }

    #[test]
    fn kiam_strict_anchors_by_pasting() {
        // kiam compiles "^" + expression + "$": with a top-level `|`, the first branch is
        // anchored at the start only and the last at the end only (kiam's own test uses
        // `^red.*$|^.red.*$`, which says both anchors itself).
        let p = policy(Restriction::Permitted);
        let n = ns(&[(PERMITTED, "arn:aws:iam::123456789012:role/app-.*|shared")]);
        for (role, want) in [
            ("app-web", true),
            ("team/shared", true),
            ("team/shared-x", false),
            ("other", false),
        ] {
            assert_eq!(
                p.decide(&pod(&[(ROLE, role)]), Some(&n)).is_ok(),
                want,
                "{role}"
            );
        }
        let kiam_own = ns(&[(PERMITTED, "^red.*$|^.red.*$")]);
        assert!(
            p.decide(&pod(&[(ROLE, "red_role")]), Some(&kiam_own))
                .is_err()
        );
        let empty_base = RolePolicy::new(PolicyConfig {
            restriction: Restriction::Permitted,
            ..PolicyConfig::default()
        });
        assert!(
            empty_base
                .decide(&pod(&[(ROLE, "red_role")]), Some(&kiam_own))
                .is_err()
        );
    }

    #[test]
    fn namespace_rules_are_compiled_when_stored_and_keep_their_errors() {
        // Stored before the base ARN is known (discovered later): name globs then apply
        // under the base as it is at evaluation.
        let n = ns(&[
            (
                ALLOWED_ROLES,
                r#"["team-*", "[", "arn:aws:iam::999999999999:role/x"]"#,
            ),
            (PERMITTED, "arn:aws:iam::123456789012:role/team-.*"),
        ]);
        let late = RolePolicy::new(PolicyConfig {
            restriction: Restriction::AllowedRoles,
            ..PolicyConfig::default()
        });
        let team = pod(&[(ROLE, &format!("{BASE}team-a"))]);
        assert!(matches!(
            late.decide(&team, Some(&n)),
            Err(PolicyError::NotPermitted { .. })
        ));
        late.set_base_arn(BaseArn::parse(BASE).unwrap());
        let d = late.decide(&team, Some(&n)).unwrap();
        assert_eq!(d.verdict.rule, format!("{ALLOWED_ROLES} entry \"team-*\""));
        // An invalid entry matches nothing; the others still do.
        assert!(
            late.decide(
                &pod(&[(ROLE, "arn:aws:iam::999999999999:role/x")]),
                Some(&n)
            )
            .is_ok()
        );
        // The same namespace under kiam's rule: its regex, compiled once too.
        let kiam = policy(Restriction::Permitted);
        assert!(kiam.decide(&team, Some(&n)).is_ok());
        // Malformed annotations are refused with the same reason as before, every time.
        let not_a_list = ns(&[(ALLOWED_ROLES, "team-*")]);
        let bad_regex = ns(&[(PERMITTED, "(")]);
        for _ in 0..2 {
            let e = policy(Restriction::AllowedRoles)
                .decide(&team, Some(&not_a_list))
                .unwrap_err();
            assert!(
                e.to_string().contains("is not a JSON list of strings"),
                "{e}"
            );
            let e = kiam.decide(&team, Some(&bad_regex)).unwrap_err();
            assert!(e.to_string().contains("is not a valid regex"), "{e}");
            assert!(matches!(e, PolicyError::NotPermitted { .. }));
        }
        // Equal namespaces compare equal (the compiled form follows the annotations).
        assert_eq!(n.clone(), n);
    }

    #[test]
    fn permitted_regex_is_anchored_on_the_full_arn() {
        let p = policy(Restriction::Permitted);
        let n = ns(&[(PERMITTED, "arn:aws:iam::123456789012:role/app-.*")]);
        assert!(p.decide(&pod(&[(ROLE, "app-web")]), Some(&n)).is_ok());
        assert!(p.decide(&pod(&[(ROLE, "evil-app-web")]), Some(&n)).is_err());
        let partial = ns(&[(PERMITTED, "app-.*")]);
        assert!(
            p.decide(&pod(&[(ROLE, "app-web")]), Some(&partial))
                .is_err()
        );
        let bad = ns(&[(PERMITTED, "(")]);
        assert!(p.decide(&pod(&[(ROLE, "app-web")]), Some(&bad)).is_err());
    }

    #[test]
    fn default_role_is_permitted_under_restrictions() {
        let p = RolePolicy::new(PolicyConfig {
            default_role: Some("fallback".into()),
            ..policy(Restriction::Permitted).config().clone()
        });
        assert!(p.decide(&pod(&[]), Some(&ns(&[]))).is_ok());
    }
}
