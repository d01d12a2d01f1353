//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and every input that ever
//! crashed a target) through the fuzz targets' own checks, with a plain `cargo test`, so a
//! fixed crash stays fixed without nightly or libFuzzer. `make fuzz` does the fuzzing.

#[path = "../../fuzz/src/filter.rs"]
mod checks;

#[path = "../../fuzz/src/replay.rs"]
mod replay;

use replay::replay;

#[test]
fn filter_config_corpus() {
    replay("filter_config", checks::config);
}
