// As filter/build.rs: the release profile's `strip` leaves wasm-ld's `name` section in;
// ask the linker, so the baseline is built exactly as the meshiam filter is.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    if target.starts_with("wasm32") && profile == "release" {
        println!("cargo:rustc-cdylib-link-arg=--strip-all");
    }
}
