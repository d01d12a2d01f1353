//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and every input that ever
//! crashed a target) through the fuzz targets' own checks, with a plain `cargo test`, so a
//! fixed crash stays fixed without nightly or libFuzzer. `make fuzz` does the fuzzing.

#[path = "../../fuzz/src/broker.rs"]
mod checks;

#[path = "../../fuzz/src/replay.rs"]
mod replay;

use replay::replay;

#[test]
fn broker_policy_corpus() {
    replay("broker_policy", checks::policy);
}

#[test]
fn broker_pods_file_corpus() {
    replay("broker_pods_file", checks::pods_file);
}
