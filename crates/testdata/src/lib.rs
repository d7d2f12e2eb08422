//! Where the tests find the data that the repository does not ship: the DreamBench images and the
//! real CLIP tokenizer.
//!
//! Each is found through an environment variable, else in `../shared/<name>` next to the repository
//! (a relative variable is taken from the repository root). A crate whose tests need the data calls
//! [`build_script`] from its `build.rs`, which sets `cfg(no_dreambench)` / `cfg(no_clip_tokenizer)`
//! when the data is absent, so that such a test is reported as ignored with its reason:
//!
//! ```text
//! #[test]
//! #[cfg_attr(no_dreambench, ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`")]
//! fn reads_the_dataset() {
//!     let root = testdata::dreambench();
//! }
//! ```
//!
//! The build script watches the variables and, when the data is present, its marker file. Data that
//! appears later at a path that was absent is noticed when a variable changes (or after
//! `cargo clean -p <crate>`): watching a missing path would rebuild the crate on every run.

use std::path::{Path, PathBuf};

/// A data set the tests read from outside the repository.
#[derive(Debug, Clone, Copy)]
pub struct External {
    /// The environment variable that points at its folder.
    pub var: &'static str,
    /// Its folder under `../shared/` next to the repository: the default.
    pub shared_name: &'static str,
    /// A file of the folder whose presence means the data is there.
    pub marker: &'static str,
    /// The cfg that [`build_script`] sets when the data is absent.
    pub absent_cfg: &'static str,
    /// How to get it, for the build warning.
    pub how_to_get: &'static str,
}

/// The DreamBench dataset (`pnd dataset fetch --dest DIR` writes it).
pub const DREAMBENCH: External = External {
    var: "PND_DREAMBENCH",
    shared_name: "dreambench",
    marker: "prompts_and_classes.txt",
    absent_cfg: "no_dreambench",
    how_to_get: "run `pnd dataset fetch --dest DIR` and set PND_DREAMBENCH=DIR",
};

/// The real CLIP tokenizer folder (`vocab.json`, `merges.txt`, `tokenizer.json`), as in
/// `openai/clip-vit-large-patch14`.
pub const CLIP_TOKENIZER: External = External {
    var: "PND_CLIP_TOKENIZER",
    shared_name: "clip-tokenizer",
    marker: "vocab.json",
    absent_cfg: "no_clip_tokenizer",
    how_to_get:
        "set PND_CLIP_TOKENIZER to a folder with CLIP's vocab.json, merges.txt and tokenizer.json",
};

/// The repository root (this crate lives in `<root>/crates/testdata`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl External {
    /// The folder: the variable when set (relative to the repository root), else `../shared/<name>`.
    pub fn path(&self) -> PathBuf {
        match std::env::var_os(self.var) {
            Some(value) if !value.is_empty() => repo_root().join(value),
            _ => repo_root().join("../shared").join(self.shared_name),
        }
    }

    /// Whether the folder holds the data (its marker file exists).
    pub fn is_present(&self) -> bool {
        self.path().join(self.marker).is_file()
    }

    /// The build-script lines for this data set (see [`build_script`]).
    fn emit_build_lines(&self) {
        println!("cargo::rustc-check-cfg=cfg({})", self.absent_cfg);
        println!("cargo::rerun-if-env-changed={}", self.var);
        let marker = self.path().join(self.marker);
        if marker.is_file() {
            println!("cargo::rerun-if-changed={}", marker.display());
        } else {
            println!("cargo::rustc-cfg={}", self.absent_cfg);
            println!(
                "cargo::warning=no {} at '{}': the tests that need it are ignored; {}",
                self.marker,
                self.path().display(),
                self.how_to_get
            );
        }
    }
}

/// The DreamBench folder ([`DREAMBENCH`]).
pub fn dreambench() -> PathBuf {
    DREAMBENCH.path()
}

/// The real CLIP tokenizer folder ([`CLIP_TOKENIZER`]).
pub fn clip_tokenizer() -> PathBuf {
    CLIP_TOKENIZER.path()
}

/// For a crate's `build.rs` (`fn main() { testdata::build_script() }`): declares
/// `cfg(no_dreambench)` and `cfg(no_clip_tokenizer)` and sets each whose data is absent, with a
/// warning that says how to get it.
pub fn build_script() {
    println!("cargo::rerun-if-changed=build.rs");
    for data in [DREAMBENCH, CLIP_TOKENIZER] {
        data.emit_build_lines();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_shared_next_to_the_repository() {
        let data = External {
            var: "PND_TESTDATA_UNSET_FOR_TEST",
            ..DREAMBENCH
        };
        assert_eq!(data.path(), repo_root().join("../shared/dreambench"));
    }

    #[test]
    fn a_relative_variable_is_taken_from_the_repository_root() {
        // Only this test sets the variable, so no other test can see it.
        std::env::set_var("PND_TESTDATA_RELATIVE_FOR_TEST", "data/db");
        let data = External {
            var: "PND_TESTDATA_RELATIVE_FOR_TEST",
            ..DREAMBENCH
        };
        assert_eq!(data.path(), repo_root().join("data/db"));
        std::env::set_var("PND_TESTDATA_RELATIVE_FOR_TEST", "/abs/db");
        assert_eq!(data.path(), PathBuf::from("/abs/db"));
        assert!(!data.is_present());
    }
}

/// Copies a folder tree, each file left writable (the shared data is read-only; tests damage
/// their copies on purpose).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
            let mut perm = std::fs::metadata(&dst).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&dst, perm).unwrap();
        }
    }
}
