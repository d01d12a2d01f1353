// Records the git commit, logged with the version when the filter starts, and strips the
// release module's function names (build-support/wasm_strip.rs).
include!("../build-support/git_commit.rs");
include!("../build-support/wasm_strip.rs");

fn main() {
    emit_git_commit();
    strip_wasm_names();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build-support/git_commit.rs");
    println!("cargo:rerun-if-changed=../build-support/wasm_strip.rs");
}
