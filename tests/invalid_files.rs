//! Data-driven validation tests: every `tests/data/invalid/*.ron` has a
//! `.expected` file beside it listing the exact diagnostics (`line:col code:
//! message`, `line:col code (warning): message` for a warning, then an
//! indented hint line). Run with `UPDATE_EXPECT=1` to rewrite the expected
//! files after a deliberate change, then review the diff.
//!
//! The folder has no `calendar/`, so every deadline that needs the
//! working-day calendar is also warned of (`missing-calendar`).

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
        let severity = if d.is_error() { "" } else { " (warning)" };
        out.push_str(&format!(
            "{}:{} {}{severity}: {}\n",
            d.line, d.col, d.code, d.message
        ));
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

/// `govflow validate` on a workflow whose deadlines need the calendar, in a
/// folder without one: each is a warning with `file:line:col` and a hint, the
/// summary counts it, and the exit code is 0 (warnings do not fail).
#[test]
fn validate_shows_missing_calendar_warnings_and_exits_0() {
    let file = data_dir().join("working_days_without_calendar.ron");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_govflow"))
        .arg("validate")
        .arg(&file)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "{}:13:40: warning[missing-calendar]: the deadline of state `accepted` counts 5 \
             working days, and no working-day calendar is loaded\n  hint: add the calendar \
             file (calendar/*.csv) beside the workflows: without it, entering state \
             `accepted` is rejected\n",
            file.display()
        )),
        "{text}"
    );
    assert_eq!(
        text.matches("warning[missing-calendar]").count(),
        4,
        "{text}"
    );
    // Regression: "1 errors"; a count of one is singular.
    assert!(
        text.ends_with("\n0 errors, 4 warnings in 3 files\n"),
        "{text}"
    );
    let one = std::process::Command::new(env!("CARGO_BIN_EXE_govflow"))
        .arg("validate")
        .arg(data_dir().join("unknown_state.ron"))
        .output()
        .expect("runs");
    assert_eq!(one.status.code(), Some(1));
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(
        text.ends_with("\n1 error, 0 warnings in 3 files\n"),
        "{text}"
    );
}

/// Regression: an error in the holiday calendar was located at line 1,
/// column 1, whatever line it was on, so an editor jumped to the wrong place.
#[test]
fn a_calendar_error_is_located_at_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let calendar = dir.path().join("calendar");
    std::fs::create_dir(&calendar).expect("calendar folder");
    let csv = calendar.join("cn_holidays.csv");
    std::fs::write(
        &csv,
        "date,kind\n2026-10-01,holiday\n2026-10-02,holiday\n2026-10-03,holidya\n",
    )
    .expect("written");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_govflow"))
        .arg("validate")
        .arg(dir.path())
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("{}:4:1: error[calendar]: ", csv.display())),
        "{text}"
    );
    assert!(text.contains("unknown kind `holidya`"), "{text}");
}
