//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and every input that ever
//! crashed a target) through the fuzz targets' own checks, with a plain `cargo test`, so a
//! fixed crash stays fixed without nightly or libFuzzer. `make fuzz` does the fuzzing.

#[path = "../../fuzz/src/imds.rs"]
mod checks;

#[path = "../../fuzz/src/replay.rs"]
mod replay;

use replay::replay;

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
