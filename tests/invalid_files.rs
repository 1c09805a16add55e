//! Data-driven validation tests: every `tests/data/invalid/*.ron` has a
//! `.expected` file beside it listing the exact diagnostics (`line:col code:
//! message`, then an indented hint line). Run with `UPDATE_EXPECT=1` to
//! rewrite the expected files after a deliberate change, then review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use govflow::lang::load::load;
use govflow::lang::validate::validate;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/invalid")
}

/// The diagnostics for one file, in the `.expected` format.
fn render(file: &Path) -> String {
    let sources = load(&[file.to_path_buf()]).expect("the test file loads");
    let validated = validate(&sources);
    let mut out = String::new();
    for d in validated
        .diagnostics
        .iter()
        .filter(|d| Path::new(&d.file) == file)
    {
        out.push_str(&format!("{}:{} {}: {}\n", d.line, d.col, d.code, d.message));
        if let Some(hint) = &d.hint {
            out.push_str(&format!("  hint: {hint}\n"));
        }
    }
    out
}

#[test]
fn every_invalid_file_reports_exactly_the_expected_diagnostics() {
    let mut files: Vec<PathBuf> = fs::read_dir(data_dir())
        .expect("tests/data/invalid exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "ron")
                && p.file_name() != Some("agencies.ron".as_ref())
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "expected one file per validation rule, found {}",
        files.len()
    );
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut failures = Vec::new();
    for file in &files {
        let actual = render(file);
        let expected_path = file.with_extension("expected");
        if update {
            fs::write(&expected_path, &actual).expect("write expected");
            continue;
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_default();
        if actual.is_empty() {
            failures.push(format!("{}: no diagnostics at all", file.display()));
        } else if actual != expected {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- actual\n{actual}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_shared_test_data_itself_is_valid() {
    let sources = load(&[
        data_dir().join("agencies.ron"),
        data_dir().join("catalogues/items.ron"),
    ])
    .expect("loads");
    let validated = validate(&sources);
    assert_eq!(validated.diagnostics, vec![]);
}
