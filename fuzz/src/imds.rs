//! Checks for the IMDS contract crate (`meshiam-imds`): path classification, tokens, the TTL
//! header and the credential JSON. Self-contained (only `meshiam_imds` and `std`), so
//! `imds/tests/fuzz_corpus.rs` includes this file as is.

use meshiam_imds::creds::{parse_flat_object, push_json_string};
use meshiam_imds::path::MAX_PATH_LEN;
use meshiam_imds::token::{MAX_TTL, MIN_TTL, NONCE_LEN, SECRET_LEN, TOKEN_LEN};
use meshiam_imds::{
    Credentials, PathClass, TokenError, TokenIssuer, TtlError, classify, parse_ttl,
};

/// `classify`: never panics; what it accepts is clean, and re-classifying the part it hands
/// back gives the same answer (no path means two things).
pub fn path(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let class = classify(s);
    assert!(!class.label().is_empty());
    // The query string never changes the class, except that the token endpoint answers its
    // exact path only: with any query it is no path at all.
    let with_query = format!("{s}?x=/latest/meta-data/iam/security-credentials/");
    let expected = match class {
        PathClass::Token => PathClass::Invalid,
        other => other,
    };
    assert_eq!(
        classify(&with_query),
        expected,
        "query string changed the class"
    );
    if class == PathClass::Invalid {
        return;
    }
    let p = s.split('?').next().unwrap_or_default();
    assert!(p.starts_with('/'), "accepted {p:?} without a leading slash");
    assert!(
        p.bytes()
            .all(|c| c.is_ascii_graphic() && c != b'%' && c != b'\\'),
        "accepted {p:?} with an odd byte"
    );
    assert!(!p.contains("//"), "accepted {p:?} with an empty segment");
    assert!(
        !p.split('/').any(|seg| seg == ".." || seg == "."),
        "accepted {p:?} with a dot segment"
    );
    match class {
        PathClass::RoleCredentials(role) => {
            assert!(!role.is_empty() && !role.contains('/'), "role {role:?}");
            let again = format!("/latest/meta-data/iam/security-credentials/{role}");
            assert_eq!(classify(&again), PathClass::RoleCredentials(role));
        }
        PathClass::Other(rel) => {
            assert!(
                !rel.starts_with('/') && !rel.ends_with('/'),
                "other {rel:?}"
            );
            // What is forwarded is exactly what would be classified again (as long as the
            // `latest` form, which may be longer than a dated one, fits the length limit).
            let again = format!("/latest/{rel}");
            if again.len() <= MAX_PATH_LEN {
                assert_eq!(classify(&again), PathClass::Other(rel), "{again:?}");
            }
        }
        _ => {}
    }
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// `TokenIssuer::verify`: any string is refused without a panic unless it is a token this
/// issuer made for this binding; issued tokens verify until they expire, and only for their
/// binding and secret.
pub fn token(data: &[u8]) {
    // Layout: secret seed (1), now (8), ttl (2), binding length (1), binding, token text.
    let seed = data.first().copied().unwrap_or(0);
    let now = u64_at(data, 1) >> 1; // keep now + ttl in range most of the time
    let ttl = (u64_at(data, 9) as u32 & 0xffff).clamp(MIN_TTL, MAX_TTL);
    let blen = data.get(11).copied().unwrap_or(0) as usize;
    let rest = data.get(12..).unwrap_or_default();
    let (binding, text) = rest.split_at(blen.min(rest.len()));
    let text = String::from_utf8_lossy(text);

    let issuer = TokenIssuer::new([seed; SECRET_LEN]);
    let other = TokenIssuer::new([seed.wrapping_add(1); SECRET_LEN]);

    // Arbitrary text: refused (a forgery would need the HMAC), never a panic.
    if let Ok(expiry) = issuer.verify(&text, now, binding) {
        // Only possible if the fuzzer replayed an issued token: it must be one, still valid.
        assert!(expiry > now);
        assert_eq!(text.trim().len(), TOKEN_LEN);
    }

    let nonce = [seed ^ 0x5a; NONCE_LEN];
    let tok = issuer.issue(now, ttl, binding, &nonce);
    assert_eq!(tok.len(), TOKEN_LEN);
    // Another nonce, another token, equally valid: no two tokens alike.
    let twin = issuer.issue(now, ttl, binding, &[seed ^ 0xa5; NONCE_LEN]);
    assert_ne!(tok, twin);
    let expiry = now.saturating_add(ttl as u64);
    if now < expiry {
        assert_eq!(issuer.verify(&tok, now, binding), Ok(expiry));
        assert_eq!(
            issuer.verify(&format!(" {tok}\t"), now, binding),
            Ok(expiry)
        );
        assert_eq!(
            issuer.verify(&tok.to_ascii_uppercase(), now, binding),
            Ok(expiry)
        );
    }
    assert_eq!(
        issuer.verify(&tok, expiry, binding),
        Err(TokenError::Expired)
    );
    assert_eq!(other.verify(&tok, now, binding), Err(TokenError::Invalid));
    let mut wrong = binding.to_vec();
    wrong.push(0);
    assert_eq!(issuer.verify(&tok, now, &wrong), Err(TokenError::Invalid));
    // One flipped hex digit anywhere: refused.
    let flip_at = (seed as usize) % TOKEN_LEN;
    let mut flipped: Vec<u8> = tok.clone().into_bytes();
    flipped[flip_at] = if flipped[flip_at] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap_or_default();
    assert!(issuer.verify(&flipped, now, binding).is_err());
}

/// `parse_ttl`: accepts exactly the decimal integers 1..=21600 (surrounding whitespace
/// allowed) and round-trips them.
pub fn ttl(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse_ttl(Some(s)) {
        Ok(n) => {
            assert!((MIN_TTL..=MAX_TTL).contains(&n));
            let t = s.trim();
            assert!(t.bytes().all(|c| c.is_ascii_digit()), "accepted {s:?}");
            assert_eq!(t.parse::<u64>().ok(), Some(n as u64));
            assert_eq!(parse_ttl(Some(&n.to_string())), Ok(n));
        }
        Err(TtlError::Missing) => assert!(s.trim().is_empty()),
        Err(TtlError::NotANumber) => {
            assert!(!s.trim().bytes().all(|c| c.is_ascii_digit()))
        }
        Err(TtlError::OutOfRange) => {
            let t = s.trim();
            assert!(t.bytes().all(|c| c.is_ascii_digit()));
            assert!(
                !t.parse::<u64>()
                    .is_ok_and(|n| (1..=MAX_TTL as u64).contains(&n))
            );
        }
    }
    assert_eq!(parse_ttl(None), Err(TtlError::Missing));
}

/// The credential document the filter reads from the broker: `parse_flat_object` and
/// `Credentials::from_imds_json` never panic, and what they accept renders and parses back
/// to the same thing.
pub fn creds_json(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(fields) = parse_flat_object(s) {
        let mut doc = String::from("{");
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                doc.push(',');
            }
            push_json_string(&mut doc, k);
            doc.push(':');
            push_json_string(&mut doc, v);
        }
        doc.push('}');
        assert_eq!(parse_flat_object(&doc).as_ref(), Ok(&fields), "{doc:?}");
    }
    if let Ok(creds) = Credentials::from_imds_json(s) {
        assert!(!creds.access_key_id.is_empty());
        assert!(!creds.secret_access_key.is_empty());
        assert!(!creds.token.is_empty());
        let doc = creds.to_imds_json();
        assert_eq!(Credentials::from_imds_json(&doc).as_ref(), Ok(&creds));
        // Debug never shows the secrets: it does not depend on them at all.
        let blanked = Credentials {
            secret_access_key: String::new(),
            token: String::new(),
            ..creds.clone()
        };
        assert_eq!(format!("{creds:?}"), format!("{blanked:?}"));
    }
}
