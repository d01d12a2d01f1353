//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and every input that ever
//! crashed a target) through the fuzz targets' own checks, with a plain `cargo test`, so a
//! fixed crash stays fixed without nightly or libFuzzer. `make fuzz` does the fuzzing.

#[path = "../../fuzz/src/imds.rs"]
mod checks;

use std::path::PathBuf;

/// Runs every file of `fuzz/corpus/<target>` through `check`; names the file that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no corpus files", dir.display());
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target}: {} fails its check", file.display());
        }
    }
    println!("{target}: {} corpus files pass", files.len());
}

#[test]
fn imds_path_corpus() {
    replay("imds_path", checks::path);
}

#[test]
fn imds_token_corpus() {
    replay("imds_token", checks::token);
}

#[test]
fn imds_ttl_corpus() {
    replay("imds_ttl", checks::ttl);
}

#[test]
fn imds_creds_json_corpus() {
    replay("imds_creds_json", checks::creds_json);
}
