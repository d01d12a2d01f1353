//! Records the git commit for `--version`; "unknown" outside a git checkout.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHIAM_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
    if let Some(head) = git(&["rev-parse", "--symbolic-full-name", "HEAD"])
        && let Some(common) = git(&["rev-parse", "--git-common-dir"])
    {
        println!("cargo:rerun-if-changed={common}/{head}");
    }
}
