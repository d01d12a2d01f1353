//! The one JSON reader of the filter's wasm: the plugin configuration and the documents the
//! broker answers with ([`crate::creds`]) both go through it.
//!
//! Why not serde: a serde build of the filter (`serde` derive and `serde_json` with `alloc`
//! for the configuration and the credential document) measured 319,707 bytes against
//! 230,348 (2026-11-30, release `wasm32-wasip1`), +89 KB; this reader is a few KB. What
//! these documents need is objects, arrays, strings, whole numbers and booleans, nothing
//! more. Errors name the byte offset and what was expected (for the one log line
//! `on_configure` writes); callers reading secrets map them to errors without content.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// A JSON value. Numbers are whole (the configuration has no fractional field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Bool(bool),
    /// A whole number; `None` when it does not fit an `i64` or has a fraction/exponent.
    Number(Option<i64>),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// What a value is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

const MAX_DEPTH: usize = 16;

/// Parses one JSON document.
pub fn parse(text: &[u8]) -> Result<Value, String> {
    let mut p = Reader { s: text, i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.error("end of input"));
    }
    Ok(v)
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn error(&self, expected: &str) -> String {
        match self.s.get(self.i) {
            Some(c) if c.is_ascii_graphic() => {
                format!(
                    "JSON error at byte {}: expected {expected}, found '{}'",
                    self.i, *c as char
                )
            }
            Some(_) => format!("JSON error at byte {}: expected {expected}", self.i),
            None => format!("JSON error: expected {expected}, found the end of input"),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8, what: &str) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.error("a JSON value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(self.error("less nesting"));
        }
        self.ws();
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            _ => Err(self.error("a JSON value")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, String> {
        self.i += 1;
        let mut fields = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Value::Object(fields));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("a field name"));
            }
            let key = self.string()?;
            self.eat(b':', "':'")?;
            let v = self.value(depth + 1)?;
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(format!("JSON error: duplicate field {key:?}"));
            }
            fields.push((key, v));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(fields));
                }
                _ => return Err(self.error("',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("',' or ']'")),
            }
        }
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let digits = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        if self.i == digits {
            return Err(self.error("a digit"));
        }
        let mut whole = true;
        if self.peek() == Some(b'.') {
            whole = false;
            self.i += 1;
            let f = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            if self.i == f {
                return Err(self.error("a digit"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            whole = false;
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            let e = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            if self.i == e {
                return Err(self.error("a digit"));
            }
        }
        let text = core::str::from_utf8(&self.s[start..self.i]).unwrap_or("x");
        Ok(Value::Number(if whole { text.parse().ok() } else { None }))
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("'\"'"));
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.peek().ok_or_else(|| self.error("an escape"))?;
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).unwrap_or_default();
                            let code = core::str::from_utf8(hex)
                                .ok()
                                .filter(|h| h.len() == 4)
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .and_then(char::from_u32)
                                .ok_or_else(|| self.error("four hex digits (no surrogates)"))?;
                            self.i += 4;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(code.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => {
                            self.i -= 1;
                            return Err(self.error("a valid escape"));
                        }
                    }
                }
                c if c < 0x20 => {
                    self.i -= 1;
                    return Err(self.error("no control characters in a string"));
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| String::from("JSON error: a string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn s(x: &str) -> Value {
        Value::String(x.into())
    }

    #[test]
    fn reads_what_the_configuration_uses() {
        let v = parse(
            br#" {"a": [ "x", "y\u0041\n" ], "b": 12, "c": -3, "d": true, "e": null,
                          "f": {"g": false}, "h": 1.5, "i": 1e3, "j": 99999999999999999999} "#,
        );
        assert_eq!(
            v,
            Ok(Value::Object(vec![
                ("a".into(), Value::Array(vec![s("x"), s("yA\n")])),
                ("b".into(), Value::Number(Some(12))),
                ("c".into(), Value::Number(Some(-3))),
                ("d".into(), Value::Bool(true)),
                ("e".into(), Value::Null),
                (
                    "f".into(),
                    Value::Object(vec![("g".into(), Value::Bool(false))])
                ),
                ("h".into(), Value::Number(None)),
                ("i".into(), Value::Number(None)),
                ("j".into(), Value::Number(None)),
            ]))
        );
        assert_eq!(parse(b"[]"), Ok(Value::Array(vec![])));
    }

    #[test]
    fn errors_say_where_and_what() {
        for (doc, needle) in [
            ("", "end of input"),
            ("{", "field name"),
            ("{\"a\" 1}", "':'"),
            ("{\"a\":1,}", "field name"),
            ("{\"a\":1} x", "expected end of input, found 'x'"),
            ("[1 2]", "',' or ']'"),
            ("{\"a\":tru}", "a JSON value"),
            ("\"abc", "'\"'"),
            ("\"\\q\"", "valid escape"),
            ("\"\\ud800\"", "surrogates"),
            ("-", "a digit"),
            ("1.", "a digit"),
            ("{\"a\":1,\"a\":2}", "duplicate field"),
            ("\"a\nb\"", "control characters"),
        ] {
            let e = parse(doc.as_bytes()).err().unwrap_or_default();
            assert!(e.contains(needle), "{doc:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let deep = "[".repeat(40);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
