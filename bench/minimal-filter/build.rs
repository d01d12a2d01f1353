// As filter/build.rs: the release profile's `strip` leaves wasm-ld's `name` section in;
// ask the linker, so the baseline is built exactly as the meshiam filter is (and, like it,
// keeps function names with MESHIAM_WASM_KEEP_NAMES=1, for size analysis).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MESHIAM_WASM_KEEP_NAMES");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let keep = std::env::var_os("MESHIAM_WASM_KEEP_NAMES").is_some();
    if target.starts_with("wasm32") && profile == "release" && !keep {
        println!("cargo:rustc-cdylib-link-arg=--strip-all");
    }
}
