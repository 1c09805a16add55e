//! Auditing (DESIGN §7): prove a history untouched, replay it, look at a case
//! as of any step or moment, export histories for outside tools, and check a
//! new workflow version against the cases it would carry.
//!
//! Everything here reads records through a [`RecordSource`] — a sled store
//! folder opened directly ([`SledSource`]) or any [`Store`](crate::store::Store)
//! ([`StoreSource`]) — and the rules through a [`Library`](crate::lang::validate::Library)
//! (see [`AuditLibrary`] for building one offline, with every stored version
//! compiled). Nothing here writes, and bad data is reported, never a panic.
//!
//! * [`verify`]: recompute every hash chain and name each altered, missing,
//!   reordered, forged or undecodable entry.
//! * [`replay_case`]: every step of a case re-run through its pinned version;
//!   [`replay_all`]: every case of the store or of a workflow, in parallel.
//! * [`case_at`]: a case as of a sequence number or a moment.
//! * [`export`]: histories as JSON Lines, one entry per line, filtered.
//! * [`migration_check`]: the running cases a new version would break
//!   ([`check_running`] is its core, which the durable engine's deploy runs).
//! * [`bench`]: verification and replay speed, and stores to measure them on.

pub mod bench;
mod export;
mod library;
mod migration;
mod replay;
mod source;
mod verify;

pub use export::{ExportFilter, ExportSummary, SkippedRecord, export};
pub use library::AuditLibrary;
pub use migration::{
    BreakKind, Candidate, MigrationBreak, MigrationReport, check_running, migration_check,
};
pub use replay::{
    At, CaseAt, CaseDivergence, ReplayAllReport, ReplayReport, ReplayStep, Stop, case_at,
    replay_all, replay_case,
};
pub use source::{
    CaseEvent, CaseRecord, RawEntry, RecordSource, SledSource, StoreSource, WithPending, visit_case,
};
pub use verify::{Finding, FindingKind, Progress, VerifyReport, VerifyScope, verify};

use crate::engine::replay::Divergence;
use crate::lang::diag::Diagnostic;
use crate::lang::load::LoadError;
use crate::store::StoreError;

/// Why an audit could not be carried out (as opposed to what it found).
///
/// Every message already says its cause, so no variant also hands the cause
/// out as its [`source`](std::error::Error::source): a report that prints
/// the chain (`anyhow`'s `{:#}`) would print each cause twice.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Store(StoreError),
    #[error("the store cannot be read: {}", crate::store::sled_message(.0))]
    Sled(sled::Error),
    #[error("{0} is not a govflow store folder (no sled database in it)")]
    NoStore(String),
    /// Every store the engine has opened holds its workflow versions, so a
    /// store with none has lost its records (or was never one).
    #[error(
        "the store in {0} holds no records, not even its workflow versions: its log could not be read (damaged or emptied), or it is not a store govflow wrote"
    )]
    EmptyStore(String),
    #[error("the store in {0} is in use by another process: stop it, or audit a copy")]
    StoreInUse(String),
    #[error("no case `{0}`")]
    NotFound(String),
    #[error("no workflow `{name}` was ever deployed in this store (its workflows: {known})")]
    UnknownWorkflow { name: String, known: String },
    #[error("no state `{name}` in the workflows of this store (their states: {known})")]
    UnknownState { name: String, known: String },
    #[error("case `{case_id}`: the case record does not decode ({message})")]
    CaseUndecodable { case_id: String, message: String },
    #[error("case `{case_id}`: the history entry stored at {} {message}", slot.map_or_else(|| "an unknown position".to_owned(), |s| format!("sequence {s}")))]
    EntryUndecodable {
        case_id: String,
        slot: Option<u64>,
        message: String,
    },
    #[error("case `{case_id}` has no step {requested}: its steps are 1 to {last}")]
    OutOfRange {
        case_id: String,
        requested: String,
        last: u64,
    },
    #[error("case `{case_id}` cannot be replayed: {divergence}")]
    Diverged {
        case_id: String,
        divergence: Divergence,
    },
    #[error("loading the workflows: {0}")]
    Load(LoadError),
    #[error("the workflows do not validate ({})", crate::lang::validate::count(.0.iter().filter(|d| d.is_error()).count(), "problem", "problems"))]
    InvalidLibrary(Vec<Diagnostic>),
    #[error("the new workflow version does not validate ({})", crate::lang::validate::count(.0.iter().filter(|d| d.is_error()).count(), "problem", "problems"))]
    InvalidWorkflow(Vec<Diagnostic>),
    #[error("writing the export: {0}")]
    Write(#[source] std::io::Error),
    #[error("{0}")]
    Scenario(String),
}

/// Refuses a filter naming a workflow the store has no version of: the
/// audit would pass over every case and report a clean result for a
/// misspelt name.
pub fn known_workflow(source: &dyn RecordSource, name: &str) -> Result<()> {
    let versions = source.workflow_versions()?;
    if versions.iter().any(|v| v.name == name) {
        return Ok(());
    }
    let known: std::collections::BTreeSet<&str> =
        versions.iter().map(|v| v.name.as_str()).collect();
    Err(AuditError::UnknownWorkflow {
        name: name.to_owned(),
        known: known.into_iter().collect::<Vec<_>>().join(", "),
    })
}

/// Refuses a state filter that no stored version of the workflow (of any
/// workflow, when none is named) has: it could match no entry.
pub fn known_state(source: &dyn RecordSource, workflow: Option<&str>, state: &str) -> Result<()> {
    let mut states = std::collections::BTreeSet::new();
    for version in source.workflow_versions()? {
        if workflow.is_some_and(|w| w != version.name) {
            continue;
        }
        // A version that no longer reads names no state; its cases still
        // have records to match, so nothing is refused on its account.
        let Ok(def) = crate::lang::load::ron_options()
            .from_str::<crate::lang::model::Workflow>(&version.source)
        else {
            return Ok(());
        };
        states.extend(def.states.into_iter().map(|s| s.name));
    }
    if states.contains(state) {
        return Ok(());
    }
    Err(AuditError::UnknownState {
        name: state.to_owned(),
        known: states.into_iter().collect::<Vec<_>>().join(", "),
    })
}

impl From<StoreError> for AuditError {
    fn from(e: StoreError) -> Self {
        AuditError::Store(e)
    }
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Sled(e)
    }
}

impl From<LoadError> for AuditError {
    fn from(e: LoadError) -> Self {
        AuditError::Load(e)
    }
}

impl AuditError {
    /// Whether the store's own data could not be read (as opposed to a case
    /// that is not there, rules that do not load, or an export that could
    /// not be written).
    pub fn is_unreadable_store(&self) -> bool {
        matches!(self, AuditError::Store(_) | AuditError::Sled(_))
    }

    /// What could not be read, without the "the store cannot be read" that
    /// [`AuditError::Sled`] starts with (for a message that names the store).
    pub fn unreadable_reason(&self) -> String {
        match self {
            AuditError::Sled(e) => crate::store::sled_message(e),
            AuditError::Store(StoreError::Sled(e)) => crate::store::sled_message(e),
            other => other.to_string(),
        }
    }
}

pub type Result<T, E = AuditError> = std::result::Result<T, E>;

/// A duration as seconds in a report.
fn seconds<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// How many per second `n` took in `elapsed` (0 when no time passed).
fn per_second(n: u64, elapsed: std::time::Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}
