// Records the git commit, logged with the version when the filter starts.
//
// The release profile's `strip` does not remove the wasm `name` section (~60 KB) with
// wasm-ld; ask the linker directly when building the filter for wasm. Set
// MESHIAM_WASM_KEEP_NAMES=1 to keep function names (for size analysis).
include!("../build-support/git_commit.rs");

fn main() {
    emit_git_commit();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build-support/git_commit.rs");
    println!("cargo:rerun-if-env-changed=MESHIAM_WASM_KEEP_NAMES");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let keep = std::env::var_os("MESHIAM_WASM_KEEP_NAMES").is_some();
    if target.starts_with("wasm32") && profile == "release" && !keep {
        println!("cargo:rustc-cdylib-link-arg=--strip-all");
    }
}
