// The release profile's `strip` does not remove the wasm `name` section (~60 KB) with
// wasm-ld; ask the linker directly when building the filter for wasm. Set
// MESHIAM_WASM_KEEP_NAMES=1 to keep function names (for size analysis).
// It also records the git commit, logged with the version when the filter starts.
fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHIAM_GIT_COMMIT={commit}");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
    if let Some(head) = git(&["rev-parse", "--symbolic-full-name", "HEAD"])
        && let Some(common) = git(&["rev-parse", "--git-common-dir"])
    {
        println!("cargo:rerun-if-changed={common}/{head}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MESHIAM_WASM_KEEP_NAMES");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let keep = std::env::var_os("MESHIAM_WASM_KEEP_NAMES").is_some();
    if target.starts_with("wasm32") && profile == "release" && !keep {
        println!("cargo:rustc-cdylib-link-arg=--strip-all");
    }
}
