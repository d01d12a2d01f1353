//! Records the git commit for `--version` and the start-up log line.
include!("../build-support/git_commit.rs");

fn main() {
    emit_git_commit();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build-support/git_commit.rs");
}
