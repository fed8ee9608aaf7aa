//! Helpers shared by the integration tests: locating the workspace root, ../shared, the built binaries and temp dirs.

use std::path::{Path, PathBuf};

/// Root of the cargo workspace (the directory holding the workspace `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The shared folder with fixtures and data (`../shared` from the worktree; see `ultrarefiner::testing`).
pub fn shared_dir() -> PathBuf {
    ultrarefiner::testing::shared_dir().unwrap_or_else(|e| panic!("shared dir not found: {e}"))
}

/// Cargo's target directory (`CARGO_TARGET_DIR` if set, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Path of a release binary (`target/release/<name>`); it may not exist yet (`cargo build --release --bins`).
pub fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("cannot create a temporary directory")
}
