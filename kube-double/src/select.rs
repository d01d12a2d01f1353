//! `fieldSelector` and `labelSelector`, as the apiserver parses and applies them.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::ApiError;
use crate::store::Kind;

/// The fields the real apiserver lets you select pods and namespaces by (anything else is a
/// 400, as there).
fn selectable(kind: Kind, field: &str) -> bool {
    match kind {
        Kind::Pod => matches!(
            field,
            "metadata.name"
                | "metadata.namespace"
                | "spec.nodeName"
                | "spec.restartPolicy"
                | "spec.schedulerName"
                | "spec.serviceAccountName"
                | "spec.hostNetwork"
                | "status.phase"
                | "status.podIP"
                | "status.nominatedNodeName"
        ),
        Kind::Namespace => matches!(field, "metadata.name" | "status.phase"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
}

#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    terms: Vec<(String, Op, String)>,
}

impl FieldSelector {
    pub fn parse(kind: Kind, s: Option<&str>) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in s
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.trim().is_empty())
        {
            let (field, op, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, Op::Ne, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, Op::Eq, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, Op::Eq, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term:?}: expected field=value or field!=value"
                )));
            };
            let field = field.trim();
            if !selectable(kind, field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_owned(), op, value.trim().to_owned()));
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|(field, op, want)| {
            let got = field_value(obj, field);
            (got == *want) == (*op == Op::Eq)
        })
    }
}

/// A field's value as the apiserver's field set renders it: strings as they are, booleans as
/// `true`/`false`, absent as "".
fn field_value(obj: &Value, field: &str) -> String {
    let v = field.split('.').fold(obj, |v, part| &v[part]);
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        // The apiserver's pod field set always has spec.hostNetwork.
        Value::Null if field == "spec.hostNetwork" => "false".into(),
        _ => String::new(),
    }
}

#[derive(Debug, Clone)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

/// Splits on commas outside parentheses (`a in (x,y),b=c`).
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set_values(s: &str) -> Result<Vec<String>, ApiError> {
    let s = s.trim();
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("invalid label selector set: {s:?}")))?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

impl LabelSelector {
    pub fn parse(s: Option<&str>) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in split_top(s.unwrap_or_default()) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set_values(v)?)
            } else if let Some((k, v)) = term.split_once(" in ") {
                Requirement::In(k.trim().into(), set_values(v)?)
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else if term
                .chars()
                .all(|c| c.is_alphanumeric() || "-_./".contains(c))
            {
                Requirement::Exists(term.into())
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {term:?}"
                )));
            };
            reqs.push(req);
        }
        Ok(Self { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels: BTreeMap<String, String> =
            serde_json::from_value(obj["metadata"]["labels"].clone()).unwrap_or_default();
        let get = |k: &str| labels.get(k).map(String::as_str);
        self.reqs.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v),
            Requirement::Ne(k, v) => get(k) != Some(v),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Both selectors of a request.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub fields: FieldSelector,
    pub labels: LabelSelector,
}

impl Selector {
    pub fn parse(kind: Kind, fields: Option<&str>, labels: Option<&str>) -> Result<Self, ApiError> {
        Ok(Self {
            fields: FieldSelector::parse(kind, fields)?,
            labels: LabelSelector::parse(labels)?,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.fields.matches(obj) && self.labels.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "a", "namespace": "ns"},
                         "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}});
        let sel = |s| {
            FieldSelector::parse(Kind::Pod, Some(s))
                .unwrap()
                .matches(&pod)
        };
        assert!(sel("spec.nodeName=node-1"));
        assert!(sel("spec.nodeName==node-1,metadata.name=a"));
        assert!(!sel("spec.nodeName=node-2"));
        assert!(sel("spec.nodeName!=node-2"));
        assert!(sel("status.phase!=Succeeded,spec.hostNetwork=false"));
        assert!(!sel("metadata.name!=a"));
        assert_eq!(
            FieldSelector::parse(Kind::Pod, Some("spec.containers=x"))
                .unwrap_err()
                .code,
            400
        );
        assert!(FieldSelector::parse(Kind::Namespace, Some("spec.nodeName=x")).is_err());
    }

    #[test]
    fn label_selectors() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let sel = |s| LabelSelector::parse(Some(s)).unwrap().matches(&pod);
        assert!(sel("app=web"));
        assert!(sel("app==web,tier!=back"));
        assert!(!sel("app=db"));
        assert!(sel("app in (db, web),!missing,tier"));
        assert!(!sel("tier notin (front)"));
        assert!(sel(""));
    }
}
