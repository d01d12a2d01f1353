//! The corpus replay shared by `imds/`, `filter/` and `broker/` `tests/fuzz_corpus.rs`
//! (each includes this file with `#[path]`, as it includes its checks): every file of
//! `fuzz/corpus/<target>` (the seeds and every input that ever crashed a target) through the
//! target's own check, so a fixed crash stays fixed under a plain `cargo test`.

use std::path::PathBuf;

/// Runs every file of `fuzz/corpus/<target>` through `check`; names the file that fails.
pub fn replay(target: &str, check: fn(&[u8])) {
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
