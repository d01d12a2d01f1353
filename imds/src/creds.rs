//! The IMDS credential documents, rendered and parsed.
//!
//! The credential document is a flat JSON object of strings. Rendering is done by hand
//! (field order as IMDS writes it, timestamps via [`crate::time`]); parsing accepts any flat
//! object, so the filter can read the broker's answer without a JSON dependency in the wasm.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::json::{self, Value};
use crate::time::{format_rfc3339, parse_rfc3339};

/// Temporary AWS credentials as IMDS hands them out. `Debug` never shows the secret or the
/// session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// STS calls it `SessionToken`; IMDS calls it `Token`.
    pub token: String,
    /// Unix seconds.
    pub expiration: u64,
    /// Unix seconds.
    pub last_updated: u64,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("token", &"<redacted>")
            .field("expiration", &format_rfc3339(self.expiration))
            .field("last_updated", &format_rfc3339(self.last_updated))
            .finish()
    }
}

/// Why a credential document could not be read. Never carries document content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonError {
    /// Not a flat JSON object of strings.
    Syntax,
    /// A required field is absent or empty.
    MissingField(&'static str),
    /// `Code` is present and not `Success`.
    NotSuccess,
    /// A timestamp is not `YYYY-MM-DDTHH:MM:SSZ`.
    BadTimestamp(&'static str),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax => f.write_str("credential document is not a flat JSON object"),
            JsonError::MissingField(n) => write!(f, "credential document lacks {n}"),
            JsonError::NotSuccess => f.write_str("credential document Code is not Success"),
            JsonError::BadTimestamp(n) => write!(f, "credential document has a malformed {n}"),
        }
    }
}

impl Credentials {
    /// Seconds left at `now` (0 when expired).
    pub fn remaining(&self, now: u64) -> u64 {
        self.expiration.saturating_sub(now)
    }

    /// The document `GET …/iam/security-credentials/<role>` answers.
    pub fn to_imds_json(&self) -> String {
        let mut out = String::with_capacity(
            128 + self.access_key_id.len() + self.secret_access_key.len() + self.token.len(),
        );
        out.push_str("{\"Code\":\"Success\",\"LastUpdated\":\"");
        out.push_str(&format_rfc3339(self.last_updated));
        out.push_str("\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":");
        push_json_string(&mut out, &self.access_key_id);
        out.push_str(",\"SecretAccessKey\":");
        push_json_string(&mut out, &self.secret_access_key);
        out.push_str(",\"Token\":");
        push_json_string(&mut out, &self.token);
        out.push_str(",\"Expiration\":\"");
        out.push_str(&format_rfc3339(self.expiration));
        out.push_str("\"}");
        out
    }

    /// Reads a credential document (as rendered by [`Self::to_imds_json`] or by real IMDS).
    pub fn from_imds_json(doc: &str) -> Result<Self, JsonError> {
        let fields = parse_flat_object(doc)?;
        let get = |name: &'static str| -> Result<String, JsonError> {
            match fields.iter().find(|(k, _)| k == name) {
                Some((_, v)) if !v.is_empty() => Ok(v.clone()),
                _ => Err(JsonError::MissingField(name)),
            }
        };
        if let Some((_, code)) = fields.iter().find(|(k, _)| k == "Code")
            && code != "Success"
        {
            return Err(JsonError::NotSuccess);
        }
        let expiration =
            parse_rfc3339(&get("Expiration")?).ok_or(JsonError::BadTimestamp("Expiration"))?;
        let last_updated = match fields.iter().find(|(k, _)| k == "LastUpdated") {
            Some((_, v)) => parse_rfc3339(v).ok_or(JsonError::BadTimestamp("LastUpdated"))?,
            None => 0,
        };
        Ok(Credentials {
            access_key_id: get("AccessKeyId")?,
            secret_access_key: get("SecretAccessKey")?,
            token: get("Token")?,
            expiration,
            last_updated,
        })
    }
}

/// The document `GET …/meta-data/iam/info` answers.
pub fn render_iam_info(
    last_updated: u64,
    instance_profile_arn: &str,
    instance_profile_id: &str,
) -> String {
    let mut out =
        String::with_capacity(96 + instance_profile_arn.len() + instance_profile_id.len());
    out.push_str("{\"Code\":\"Success\",\"LastUpdated\":\"");
    out.push_str(&format_rfc3339(last_updated));
    out.push_str("\",\"InstanceProfileArn\":");
    push_json_string(&mut out, instance_profile_arn);
    out.push_str(",\"InstanceProfileId\":");
    push_json_string(&mut out, instance_profile_id);
    out.push('}');
    out
}

/// Appends `s` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[(c as usize) >> 4] as char);
                out.push(HEX[(c as usize) & 0xf] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses a flat JSON object whose values are strings (whole numbers, booleans and null are
/// kept as their text). Nested objects or arrays, fractional numbers, and anything that is
/// not JSON are a syntax error: no IMDS document has them. The error never carries content.
pub fn parse_flat_object(doc: &str) -> Result<Vec<(String, String)>, JsonError> {
    let Ok(Value::Object(fields)) = json::parse(doc.as_bytes()) else {
        return Err(JsonError::Syntax);
    };
    fields
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s,
                Value::Number(Some(n)) => n.to_string(),
                Value::Bool(b) => String::from(if b { "true" } else { "false" }),
                Value::Null => String::from("null"),
                Value::Number(None) | Value::Array(_) | Value::Object(_) => {
                    return Err(JsonError::Syntax);
                }
            };
            Ok((k, text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn sample() -> Credentials {
        Credentials {
            access_key_id: "ASIAEXAMPLE".to_string(),
            secret_access_key: "s3cr3t/+=".to_string(),
            token: "FwoGZXIvYXdzE\"quoted\"\\".to_string(),
            expiration: 1_767_229_200,
            last_updated: 1_767_225_600,
        }
    }

    #[test]
    fn renders_the_imds_document_exactly() {
        let c = Credentials {
            token: "tok".to_string(),
            ..sample()
        };
        assert_eq!(
            c.to_imds_json(),
            "{\"Code\":\"Success\",\"LastUpdated\":\"2026-01-01T00:00:00Z\",\"Type\":\"AWS-HMAC\",\
             \"AccessKeyId\":\"ASIAEXAMPLE\",\"SecretAccessKey\":\"s3cr3t/+=\",\"Token\":\"tok\",\
             \"Expiration\":\"2026-01-01T01:00:00Z\"}"
        );
    }

    #[test]
    fn round_trips() {
        let c = sample();
        assert_eq!(Credentials::from_imds_json(&c.to_imds_json()), Ok(c));
    }

    #[test]
    fn reads_real_imds_layout_with_whitespace() {
        let doc = "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2026-01-01T00:00:00Z\",\n  \
                   \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"A\",\n  \"SecretAccessKey\" : \"B\",\n  \
                   \"Token\" : \"C\\u0041\",\n  \"Expiration\" : \"2026-01-01T06:00:00Z\"\n}\n";
        let c = Credentials::from_imds_json(doc).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.token, "CA");
        assert_eq!(c.expiration, 1_767_225_600 + 6 * 3600);
        assert_eq!(c.remaining(1_767_225_600), 6 * 3600);
        assert_eq!(c.remaining(u64::MAX), 0);
    }

    #[test]
    fn refuses_bad_documents() {
        assert_eq!(Credentials::from_imds_json(""), Err(JsonError::Syntax));
        assert_eq!(Credentials::from_imds_json("[]"), Err(JsonError::Syntax));
        assert_eq!(
            Credentials::from_imds_json("{\"a\":{}}"),
            Err(JsonError::Syntax)
        );
        assert_eq!(
            Credentials::from_imds_json("{\"a\":\"b\"} x"),
            Err(JsonError::Syntax)
        );
        assert_eq!(
            Credentials::from_imds_json("{\"a\":\"b\",}"),
            Err(JsonError::Syntax)
        );
        assert_eq!(
            Credentials::from_imds_json("{}"),
            Err(JsonError::MissingField("Expiration"))
        );
        let no_token = "{\"AccessKeyId\":\"A\",\"SecretAccessKey\":\"B\",\"Expiration\":\"2026-01-01T00:00:00Z\"}";
        assert_eq!(
            Credentials::from_imds_json(no_token),
            Err(JsonError::MissingField("Token"))
        );
        let failed = "{\"Code\":\"AssumeRoleUnauthorizedAccess\",\"AccessKeyId\":\"A\"}";
        assert_eq!(
            Credentials::from_imds_json(failed),
            Err(JsonError::NotSuccess)
        );
        let bad_time = sample().to_imds_json().replace("01:00:00Z", "01:00:00");
        assert_eq!(
            Credentials::from_imds_json(&bad_time),
            Err(JsonError::BadTimestamp("Expiration"))
        );
    }

    #[test]
    fn flat_object_keeps_bare_values_as_text() {
        let f = parse_flat_object("{\"n\": 12, \"b\": true, \"z\": null, \"e\": \"\"}")
            .unwrap_or_default();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], ("n".to_string(), "12".to_string()));
        assert_eq!(f[1].1, "true");
        assert_eq!(f[3].1, "");
    }

    #[test]
    fn escapes_control_characters() {
        let mut s = String::new();
        push_json_string(&mut s, "a\u{1}b\nc");
        assert_eq!(s, "\"a\\u0001b\\nc\"");
        let back = parse_flat_object(&alloc::format!("{{\"k\":{s}}}")).unwrap_or_default();
        assert_eq!(back[0].1, "a\u{1}b\nc");
    }

    #[test]
    fn debug_hides_secrets() {
        let d = alloc::format!("{:?}", sample());
        assert!(d.contains("ASIAEXAMPLE"));
        assert!(!d.contains("s3cr3t") && !d.contains("FwoG"), "{d}");
    }

    #[test]
    fn renders_iam_info() {
        assert_eq!(
            render_iam_info(
                1_767_225_600,
                "arn:aws:iam::123456789012:instance-profile/x",
                "AIPA1"
            ),
            "{\"Code\":\"Success\",\"LastUpdated\":\"2026-01-01T00:00:00Z\",\
             \"InstanceProfileArn\":\"arn:aws:iam::123456789012:instance-profile/x\",\
             \"InstanceProfileId\":\"AIPA1\"}"
        );
    }
}
