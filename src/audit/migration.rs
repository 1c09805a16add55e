//! Migration check: before a new version of a workflow is deployed, replay
//! the history of every running case of that workflow against it (same
//! entries, new rules) and list the cases that would break.
//!
//! A case breaks when a step of its history would not be taken, or taken
//! differently, under the new rules (a removed or renamed state, a changed
//! guard, effect, deadline, payload or role), or when the state it is in
//! would no longer accept an event it accepts now (a removed transition it
//! is in the middle of). The workflow digest that every entry records is
//! the one thing expected to differ and is not compared.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::library::AuditLibrary;
use super::replay::load;
use super::source::RecordSource;
use super::{AuditError, Result};
use crate::engine::replay::replay;
use crate::lang::diag::Diagnostic;
use crate::lang::load::{Document, read_source};
use crate::lang::locate::LineCol;
use crate::lang::validate::{CompiledWorkflow, Library, validate};
use crate::store::proto;

/// How a running case would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakKind {
    /// A step of its history replays differently or is refused.
    History,
    /// Its current state would no longer accept an event it accepts now.
    Ahead,
    /// Its history cannot be read, so it cannot be checked.
    Unreadable,
}

/// A running case the new version would break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationBreak {
    pub case_id: String,
    /// The version the case runs on now (0 if unknown).
    pub version: u32,
    /// Its current state.
    pub state: String,
    /// The step that breaks (for `ahead`: the next step, one past the last).
    pub sequence: u64,
    pub kind: BreakKind,
    pub reason: String,
}

/// The outcome of a migration check.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub workflow: String,
    /// The digest the new version would have.
    pub new_digest: String,
    /// Warnings from validating the new version.
    pub warnings: Vec<String>,
    /// Running cases checked.
    pub running: u64,
    /// The cases that would break, by id.
    pub breaking: Vec<MigrationBreak>,
}

impl MigrationReport {
    pub fn is_compatible(&self) -> bool {
        self.breaking.is_empty()
    }
}

fn events(wf: &CompiledWorkflow, state: &str) -> BTreeSet<String> {
    wf.state(state)
        .map(|s| s.transitions.iter().map(|t| t.event.clone()).collect())
        .unwrap_or_default()
}

/// The new version a migration check replays running cases against.
pub struct Candidate<'a> {
    /// The rules in force now: every deployed version, by digest.
    pub old: &'a Library,
    /// The rules with the new version current (and every older version of
    /// every workflow, so that a parent's children still replay).
    pub new: &'a Library,
    /// The new version.
    pub workflow: &'a Arc<CompiledWorkflow>,
    /// The deployed version number of a digest, when known.
    pub version_of: &'a dyn Fn(&str) -> Option<u32>,
}

/// Validates `new_source` (read from `path`, which diagnostics name) as the
/// next version of its workflow against the current library's sources, then
/// replays every running case of that workflow against it.
pub fn migration_check(
    source: &dyn RecordSource,
    lib: &AuditLibrary,
    path: &Path,
    new_source: &str,
) -> Result<MigrationReport> {
    let mut diagnostics = Vec::new();
    let (_, Some(Document::Workflow(workflow))) = read_source(path, new_source, &mut diagnostics)
    else {
        if diagnostics.is_empty() {
            diagnostics.push(Diagnostic::at(
                path,
                LineCol { line: 1, col: 1 },
                "unknown-kind",
                "a migration check takes a `Workflow(` file",
            ));
        }
        return Err(AuditError::InvalidWorkflow(diagnostics));
    };
    let name = workflow.name.clone();
    let validated = validate(&lib.deployed.sources_with_file(&name, path, new_source));
    let Some(mut new_lib) = validated.library else {
        return Err(AuditError::InvalidWorkflow(validated.diagnostics));
    };
    let warnings = validated
        .diagnostics
        .iter()
        .filter(|d| !d.is_error())
        .map(ToString::to_string)
        .collect();
    let Some(new_wf) = new_lib.workflows.get(&name).map(Arc::clone) else {
        return Err(AuditError::InvalidWorkflow(validated.diagnostics));
    };
    // Other workflows' older versions stay available (a parent's children).
    for (digest, old) in &lib.library.versions {
        new_lib
            .versions
            .entry(digest.clone())
            .or_insert_with(|| Arc::clone(old));
    }
    let candidate = Candidate {
        old: &lib.library,
        new: &new_lib,
        workflow: &new_wf,
        version_of: &|digest| lib.version_of(digest),
    };
    let (running, breaking) = check_running(source, &candidate, &|_| true)?;
    Ok(MigrationReport {
        workflow: name,
        new_digest: new_wf.digest.clone(),
        warnings,
        running,
        breaking,
    })
}

/// Replays every running case of the candidate's workflow that `keep`
/// accepts against the new version; returns how many were checked and the
/// ones that would break, by id. What the offline check, the gRPC
/// `CheckMigration` and a deploy that requires the check all run.
pub fn check_running(
    source: &dyn RecordSource,
    candidate: &Candidate<'_>,
    keep: &dyn Fn(&proto::Case) -> bool,
) -> Result<(u64, Vec<MigrationBreak>)> {
    let new_wf = candidate.workflow;
    let name = new_wf.def.name.as_str();
    let mut running = 0;
    let mut breaking = Vec::new();
    let mut after = String::new();
    loop {
        let page = source.candidate_case_ids(name, &after, 1_000)?;
        let Some(last) = page.last() else {
            break;
        };
        after.clone_from(last);
        for id in &page {
            let case = match source.case_record(id)? {
                Some(Ok(case)) => case,
                // A record that does not decode says nothing of its workflow:
                // `verify` reports it.
                _ => continue,
            };
            if case.workflow != name || !case.outcome.is_empty() || !keep(&case) {
                continue;
            }
            running += 1;
            let version =
                (candidate.version_of)(&case.workflow_digest).unwrap_or(case.workflow_version);
            let broken = |sequence, kind, reason: String| MigrationBreak {
                case_id: id.clone(),
                version,
                state: case.state.clone(),
                sequence,
                kind,
                reason,
            };
            let loaded = load(source, id)?;
            if let Some((slot, message)) = &loaded.unreadable {
                breaking.push(broken(
                    slot.unwrap_or(loaded.entries.len() as u64 + 1),
                    BreakKind::Unreadable,
                    format!("the stored history entry {message}"),
                ));
                continue;
            }
            let mut entries = loaded.entries;
            for e in &mut entries {
                e.digest.clone_from(&new_wf.digest);
            }
            let parent = (!case.parent.is_empty()).then_some(case.parent.as_str());
            match replay(candidate.new, name, &new_wf.digest, id, parent, &entries) {
                Err(d) => breaking.push(broken(d.sequence, BreakKind::History, d.reason)),
                Ok(cases) => {
                    let Some(now) = cases.last() else {
                        continue;
                    };
                    let old_events = candidate
                        .old
                        .pinned(name, &case.workflow_digest)
                        .map(|old| events(old, &now.state))
                        .unwrap_or_default();
                    let new_events = events(new_wf, &now.state);
                    let lost: Vec<String> = old_events
                        .difference(&new_events)
                        .map(|e| format!("`{e}`"))
                        .collect();
                    if !lost.is_empty() {
                        breaking.push(broken(
                            now.seq + 1,
                            BreakKind::Ahead,
                            format!(
                                "in state `{}` the new version no longer accepts {}",
                                now.state,
                                lost.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok((running, breaking))
}
