// Included by the build scripts of the wasm modules (filter/build.rs,
// bench/minimal-filter/build.rs), so both are linked the same way.
//
// The release profile's `strip` does not remove the wasm `name` section (~60 KB) with
// wasm-ld: ask the linker directly for a release wasm build. MESHIAM_WASM_KEEP_NAMES=1 keeps
// the function names (for size analysis).
fn strip_wasm_names() {
    println!("cargo:rerun-if-env-changed=MESHIAM_WASM_KEEP_NAMES");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let keep = std::env::var_os("MESHIAM_WASM_KEEP_NAMES").is_some();
    if target.starts_with("wasm32") && profile == "release" && !keep {
        println!("cargo:rustc-cdylib-link-arg=--strip-all");
    }
}
