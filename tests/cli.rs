//! The `govflow` binary as a user runs it: exit codes and output.

use std::path::Path;
use std::process::Command;

fn govflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_govflow"))
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn validate_reports_all_independent_mistakes_and_exits_1() {
    let out = govflow()
        .arg("validate")
        .arg(root().join("tests/data/invalid/several_mistakes.ron"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for code in [
        "unknown-state",
        "unknown-role",
        "expr-syntax",
        "type-mismatch",
    ] {
        assert!(
            text.contains(&format!("error[{code}]")),
            "missing {code} in:\n{text}"
        );
    }
    assert!(
        text.lines().filter(|l| l.contains(": error[")).count() >= 5,
        "{text}"
    );
}

#[test]
fn validate_json_is_machine_readable() {
    let out = govflow()
        .args(["validate", "--format", "json"])
        .arg(root().join("tests/data/invalid/unknown_state.ron"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let first = &report["diagnostics"][0];
    assert_eq!(first["code"], "unknown-state");
    assert_eq!(first["line"], 9);
    assert_eq!(first["path"], "states[0].transitions[0].to");
    assert_eq!(first["hint"], "did you mean `county_handling`?");
}

#[test]
fn usage_errors_exit_2() {
    let missing = govflow()
        .args(["validate", "no/such/file.ron"])
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no/such/file.ron"));
    let no_args = govflow().arg("validate").output().expect("runs");
    assert_eq!(no_args.status.code(), Some(2));
}
