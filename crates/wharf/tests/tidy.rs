//! Tidy checks over the workspace's source (the rules ARCHITECTURE.md states): every module opens
//! with a `//!` doc comment naming its job, and no source file grows past the point where it is
//! doing several jobs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Lines a source file may have before it must be split by job.
const SOURCE_FILE_LINES_MAX: usize = 800;

fn source_files() -> Vec<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    let mut pending: Vec<PathBuf> = std::fs::read_dir(workspace.join("crates"))
        .unwrap()
        .map(|entry| entry.unwrap().path().join("src"))
        .filter(|src| src.is_dir())
        .collect();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 50, "found only {} source files: is the workspace layout changed?", files.len());
    files
}

#[test]
fn every_module_opens_with_a_doc_comment() {
    let undocumented: Vec<_> =
        source_files().into_iter().filter(|path| !std::fs::read_to_string(path).unwrap().starts_with("//!")).collect();
    assert!(undocumented.is_empty(), "modules without a //! doc comment: {undocumented:?}");
}

#[test]
fn no_source_file_is_over_the_line_limit() {
    let oversized: Vec<_> = source_files()
        .into_iter()
        .map(|path| {
            let lines = std::fs::read_to_string(&path).unwrap().lines().count();
            (path, lines)
        })
        .filter(|(_, lines)| *lines > SOURCE_FILE_LINES_MAX)
        .collect();
    assert!(oversized.is_empty(), "split these by job (over {SOURCE_FILE_LINES_MAX} lines): {oversized:?}");
}
