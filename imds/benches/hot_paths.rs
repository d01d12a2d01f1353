//! Micro-benchmarks of the IMDS contract's hot paths, the per-request work of the filter and
//! the broker: path classification, token issue and check, credential rendering and parsing.
//!
//!     cargo bench -p meshiam-imds
//!
//! Not part of CI (`cargo test` only compiles them); the end-to-end figures are in
//! BENCHMARKS.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use meshiam_imds::{Credentials, ImdsHeaders, Seen, TokenIssuer, admit, check_session, classify};

const NOW: u64 = 1_760_000_000;
const BINDING: &[u8] = b"default/myapp";
const NONCE: [u8; meshiam_imds::token::NONCE_LEN] = [0x42; meshiam_imds::token::NONCE_LEN];

fn credentials() -> Credentials {
    Credentials {
        access_key_id: "ASIAQEXAMPLEACCESSKY".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        token: "IQoJb3JpZ2luX2VjEXAMPLE".repeat(30),
        expiration: NOW + 3600,
        last_updated: NOW,
    }
}

fn paths(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    for (name, path) in [
        (
            "role_credentials",
            "/latest/meta-data/iam/security-credentials/myapp-iam-role",
        ),
        ("role_list", "/latest/meta-data/iam/security-credentials/"),
        ("token", "/latest/api/token"),
        ("other", "/2021-07-15/meta-data/placement/availability-zone"),
    ] {
        g.bench_function(name, |b| b.iter(|| classify(black_box(path))));
    }
    g.finish();
    let class = classify("/latest/api/token");
    c.bench_function("admit/token_put", |b| {
        b.iter(|| {
            admit(
                black_box("PUT"),
                black_box(&class),
                black_box(&ImdsHeaders {
                    ttl: Seen::Once("21600"),
                    ..Default::default()
                }),
            )
        })
    });
}

fn tokens(c: &mut Criterion) {
    let issuer = TokenIssuer::new([7u8; 64]);
    let token = issuer.issue(NOW, 21600, BINDING, &NONCE);
    c.bench_function("token/issue", |b| {
        b.iter(|| issuer.issue(black_box(NOW), black_box(21600), black_box(BINDING), &NONCE))
    });
    c.bench_function("token/verify", |b| {
        b.iter(|| issuer.verify(black_box(&token), black_box(NOW + 10), black_box(BINDING)))
    });
    c.bench_function("token/check_session", |b| {
        b.iter(|| {
            check_session(
                black_box(Some(token.as_str())),
                &issuer,
                NOW + 10,
                BINDING,
                true,
            )
        })
    });
}

fn creds(c: &mut Criterion) {
    let creds = credentials();
    let doc = creds.to_imds_json();
    c.bench_function("credentials/render", |b| {
        b.iter(|| black_box(&creds).to_imds_json())
    });
    c.bench_function("credentials/parse", |b| {
        b.iter(|| Credentials::from_imds_json(black_box(&doc)))
    });
}

criterion_group!(benches, paths, tokens, creds);
criterion_main!(benches);
