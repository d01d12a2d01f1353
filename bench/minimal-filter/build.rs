// Linked exactly as the meshiam filter is (build-support/wasm_strip.rs), so benchmark 6
// compares like with like.
include!("../../build-support/wasm_strip.rs");

fn main() {
    strip_wasm_names();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../../build-support/wasm_strip.rs");
}
