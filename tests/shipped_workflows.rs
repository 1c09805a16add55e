//! The workflows shipped under `workflows/` validate and draw.

use std::path::Path;
use std::process::Command;

fn workflows() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows")
}

#[test]
fn shipped_workflows_validate_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_govflow"))
        .arg("validate")
        .arg(workflows())
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_shipped_workflow_draws_in_every_format() {
    let sources = govflow::lang::load::load(&[workflows()]).expect("loads");
    let mut drawn = 0;
    for (file, workflow) in sources.workflows() {
        for format in [
            govflow::render::Format::Dot,
            govflow::render::Format::Mermaid,
            govflow::render::Format::Svg,
        ] {
            let picture = govflow::render::render(workflow, format);
            for state in &workflow.states {
                assert!(
                    picture.contains(&state.name),
                    "{} {format:?} lacks state {}",
                    file.path.display(),
                    state.name
                );
            }
        }
        drawn += 1;
    }
    assert!(drawn >= 1, "no workflows were drawn");
}

#[test]
fn every_seed_scenario_passes_with_full_transition_coverage() {
    let out = Command::new(env!("CARGO_BIN_EXE_govflow"))
        .args(["test", "--min-coverage", "100"])
        .arg(workflows())
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}
