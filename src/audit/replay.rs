//! Replay and time travel: a case's stored history run again through the
//! workflow version it is pinned to ([`engine::replay`](crate::engine::replay)).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value as Json;

use super::source::{CaseEvent, RecordSource};
use super::verify::{PARTS, Progress, Reach, VerifyScope, in_parts};
use super::{AuditError, Result};
use crate::engine::core::{self, Actor, Timer};
use crate::engine::replay::{Divergence, replay};
use crate::lang::validate::Library;
use crate::store::{proto, records};

/// One replayed step: what the history says happened, and where it left the case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayStep {
    pub sequence: u64,
    pub time: DateTime<Utc>,
    /// `agency`, `timer` or `engine`.
    pub actor_kind: &'static str,
    /// The agency id, the timer id, or empty for the engine.
    pub actor: String,
    pub event: String,
    pub payload: Json,
    pub from_state: String,
    pub to_state: String,
    pub variables_changed: BTreeMap<String, Json>,
    pub bindings_changed: BTreeMap<String, String>,
    pub timers_set: Vec<Timer>,
    pub timers_cancelled: Vec<String>,
    /// The working-day calendar the step counted deadlines on.
    pub calendar_version: Option<String>,
    pub workflow_digest: String,
    pub request_id: String,
    /// The case's outcome after the step, once it has one.
    pub outcome: Option<String>,
}

impl ReplayStep {
    fn new(entry: &core::Entry, request_id: &str, after: &core::Case) -> Self {
        let (actor_kind, actor) = match &entry.actor {
            Actor::Agency(a) => ("agency", a.clone()),
            Actor::Timer(t) => ("timer", t.clone()),
            Actor::Engine => ("engine", String::new()),
        };
        ReplayStep {
            sequence: entry.seq,
            time: entry.at,
            actor_kind,
            actor,
            event: entry.event.clone(),
            payload: entry.payload.clone(),
            from_state: entry.from.clone(),
            to_state: entry.to.clone(),
            variables_changed: entry.vars_changed.clone(),
            bindings_changed: entry.bindings_changed.clone(),
            timers_set: entry.timers_set.clone(),
            timers_cancelled: entry.timers_cancelled.clone(),
            calendar_version: entry.calendar_version.clone(),
            workflow_digest: entry.digest.clone(),
            request_id: request_id.to_owned(),
            outcome: after.outcome.clone(),
        }
    }
}

/// Where and why a replay stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stop {
    pub sequence: u64,
    pub reason: String,
}

impl From<Divergence> for Stop {
    fn from(d: Divergence) -> Self {
        Stop {
            sequence: d.sequence,
            reason: d.reason,
        }
    }
}

/// A case replayed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    pub case_id: String,
    pub workflow: String,
    /// The deployed version number the case is pinned to (0 if unknown).
    pub workflow_version: u32,
    pub workflow_digest: String,
    pub parent: Option<String>,
    /// History entries stored (readable ones, up to the first that is not).
    pub stored_steps: u64,
    /// The steps that replayed exactly as stored, in order.
    pub steps: Vec<ReplayStep>,
    /// The first divergence, if any: the step that differs, or the case
    /// record disagreeing with the replayed history.
    pub divergence: Option<Stop>,
}

impl ReplayReport {
    /// True when every step replayed as stored and the case record agrees.
    pub fn matches(&self) -> bool {
        self.divergence.is_none()
    }
}

/// The case record and the readable history of a case.
pub(super) struct Loaded {
    pub case: proto::Case,
    pub entries: Vec<core::Entry>,
    pub request_ids: Vec<String>,
    /// Each entry's stored hash (filled by [`load`], as `request_ids` are).
    pub hashes: Vec<Vec<u8>>,
    /// Why the history could not be read past `entries`.
    pub unreadable: Option<(Option<u64>, String)>,
}

pub(super) fn load(source: &dyn RecordSource, id: &str) -> Result<Loaded> {
    let case = match source.case_record(id)? {
        None => return Err(AuditError::NotFound(id.to_owned())),
        Some(Err(message)) => {
            return Err(AuditError::CaseUndecodable {
                case_id: id.to_owned(),
                message,
            });
        }
        Some(Ok(case)) => case,
    };
    let mut entries = Vec::new();
    let mut request_ids = Vec::new();
    let mut hashes = Vec::new();
    let mut unreadable = None;
    source.visit_history(id, &mut |raw| match raw.entry {
        Ok(entry) => {
            entries.push(records::from_entry(entry));
            request_ids.push(entry.request_id.clone());
            hashes.push(entry.hash.clone());
            ControlFlow::Continue(())
        }
        Err(message) => {
            unreadable = Some((raw.slot, message.to_owned()));
            ControlFlow::Break(())
        }
    })?;
    Ok(Loaded {
        case,
        entries,
        request_ids,
        hashes,
        unreadable,
    })
}

fn parent(case: &proto::Case) -> Option<&str> {
    (!case.parent.is_empty()).then_some(case.parent.as_str())
}

/// Names the first field in which the case record differs from the replayed case.
fn record_difference(stored: &proto::Case, replayed: &core::Case) -> Option<String> {
    let stored = records::from_case(stored);
    let fields: [(&str, bool, String, String); 8] = [
        (
            "state",
            stored.state == replayed.state,
            stored.state.clone(),
            replayed.state.clone(),
        ),
        (
            "outcome",
            stored.outcome == replayed.outcome,
            show(&stored.outcome),
            show(&replayed.outcome),
        ),
        (
            "sequence",
            stored.seq == replayed.seq,
            stored.seq.to_string(),
            replayed.seq.to_string(),
        ),
        (
            "variables",
            stored.vars == replayed.vars,
            show(&stored.vars),
            show(&replayed.vars),
        ),
        (
            "bindings",
            stored.bindings == replayed.bindings,
            show(&stored.bindings),
            show(&replayed.bindings),
        ),
        (
            "timers",
            core::same_deadlines(&stored.timers, &replayed.timers),
            show(&stored.timers),
            show(&replayed.timers),
        ),
        (
            "children",
            stored.children == replayed.children,
            show(&stored.children),
            show(&replayed.children),
        ),
        (
            "signatures",
            stored.signatures == replayed.signatures,
            show(&stored.signatures),
            show(&replayed.signatures),
        ),
    ];
    fields
        .into_iter()
        .find(|(_, same, _, _)| !same)
        .map(|(name, _, s, r)| {
            format!("the case record's {name} differs from the replayed history (stored {s}, replayed {r})")
        })
}

/// A value as compact JSON, for messages.
fn show<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Replays a case through the workflow version it is pinned to and returns
/// every step; stops at the first divergence, saying where and why. A
/// history that replays fully is also compared with the case record.
pub fn replay_case(source: &dyn RecordSource, lib: &Library, id: &str) -> Result<ReplayReport> {
    let loaded = load(source, id)?;
    replay_loaded(source, lib, id, &loaded)
}

fn version_of(source: &dyn RecordSource, case: &proto::Case) -> u32 {
    if case.workflow_version != 0 {
        return case.workflow_version;
    }
    source
        .workflow_versions()
        .ok()
        .and_then(|vs| {
            vs.into_iter()
                .find(|v| v.digest == case.workflow_digest)
                .map(|v| v.version)
        })
        .unwrap_or(0)
}

fn replay_loaded(
    source: &dyn RecordSource,
    lib: &Library,
    id: &str,
    loaded: &Loaded,
) -> Result<ReplayReport> {
    let case = &loaded.case;
    let entries = &loaded.entries;
    let run = |n: usize| {
        replay(
            lib,
            &case.workflow,
            &case.workflow_digest,
            id,
            parent(case),
            &entries[..n],
        )
    };
    let (cases, divergence) = match run(entries.len()) {
        Ok(cases) => {
            let divergence = after_history(loaded, cases.last());
            (cases, divergence)
        }
        Err(d) => {
            let good = usize::try_from(d.sequence.saturating_sub(1))
                .unwrap_or(usize::MAX)
                .min(entries.len());
            (run(good).unwrap_or_default(), Some(Stop::from(d)))
        }
    };
    let steps: Vec<ReplayStep> = cases
        .iter()
        .zip(entries)
        .zip(&loaded.request_ids)
        .map(|((after, entry), request)| ReplayStep::new(entry, request, after))
        .collect();
    Ok(ReplayReport {
        case_id: id.to_owned(),
        workflow: case.workflow.clone(),
        workflow_version: version_of(source, case),
        workflow_digest: case.workflow_digest.clone(),
        parent: parent(case).map(str::to_owned),
        stored_steps: entries.len() as u64,
        steps,
        divergence,
    })
}

/// Once every readable entry replayed as stored (`last` is the case after
/// the last one): the entry that could not be read, or the case record
/// disagreeing with the replayed case, or an empty history.
fn after_history(loaded: &Loaded, last: Option<&core::Case>) -> Option<Stop> {
    let next = loaded.entries.len() as u64 + 1;
    if let Some((slot, message)) = &loaded.unreadable {
        return Some(Stop {
            sequence: slot.unwrap_or(next),
            reason: format!("the stored history entry {message}"),
        });
    }
    match last {
        Some(last) => record_difference(&loaded.case, last).map(|reason| Stop {
            sequence: last.seq,
            reason,
        }),
        None => Some(Stop {
            sequence: 1,
            reason: "no history entry is stored".to_owned(),
        }),
    }
}

/// Replays a loaded case and says where it first differs from what is
/// stored, if anywhere (what [`replay_all`] needs of each case).
fn check_loaded(lib: &Library, id: &str, loaded: &Loaded) -> Option<Stop> {
    let case = &loaded.case;
    match replay(
        lib,
        &case.workflow,
        &case.workflow_digest,
        id,
        parent(case),
        &loaded.entries,
    ) {
        Ok(cases) => after_history(loaded, cases.last()),
        Err(d) => Some(Stop::from(d)),
    }
}

/// A case that did not replay as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseDivergence {
    pub case_id: String,
    /// Its workflow (empty when its case record cannot be read).
    pub workflow: String,
    pub sequence: u64,
    pub reason: String,
}

impl std::fmt::Display for CaseDivergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "case {} ({}) diverges at sequence {}: {}",
            self.case_id,
            if self.workflow.is_empty() {
                "unknown workflow"
            } else {
                &self.workflow
            },
            self.sequence,
            self.reason
        )
    }
}

/// The outcome of replaying many cases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayAllReport {
    /// Cases replayed.
    pub cases: u64,
    /// Stored history entries replayed (every readable one of every case,
    /// up to its first divergence or not).
    pub entries: u64,
    /// Every case that did not replay exactly as stored, by id.
    pub divergences: Vec<CaseDivergence>,
    #[serde(serialize_with = "super::seconds")]
    pub elapsed: Duration,
}

impl ReplayAllReport {
    /// True when every case replayed exactly as stored.
    pub fn matches(&self) -> bool {
        self.divergences.is_empty()
    }

    /// History entries replayed per second.
    pub fn entries_per_second(&self) -> f64 {
        super::per_second(self.entries, self.elapsed)
    }
}

/// Replays every case in `scope` (the whole store, a workflow's cases, or
/// one case) through the versions they are pinned to, in parallel (one
/// thread per core, at most 8), and names each case whose history or case
/// record differs from what the rules produce. `progress` is called now and
/// then (from any worker thread).
pub fn replay_all(
    source: &dyn RecordSource,
    lib: &Library,
    scope: &VerifyScope,
    progress: Option<&(dyn Fn(Progress) + Sync)>,
) -> Result<ReplayAllReport> {
    let started = Instant::now();
    let (reach, workflow) = match scope {
        VerifyScope::Case(id) => {
            if source.case_record(id)?.is_none() {
                return Err(AuditError::NotFound(id.clone()));
            }
            (Reach::Case(id.as_str()), None)
        }
        VerifyScope::All => (Reach::Parts(source.cuts(PARTS)?), None),
        VerifyScope::Workflow(w) => {
            super::known_workflow(source, w)?;
            (Reach::Parts(source.cuts(PARTS)?), Some(w.as_str()))
        }
    };
    let replayed = AtomicU64::new(0);
    let results: Mutex<Vec<CaseDivergence>> = Mutex::new(Vec::new());
    let entries = in_parts(
        source,
        &reach,
        progress,
        // The divergences a thread found, and the case it is reading.
        || {
            (
                Vec::<CaseDivergence>::new(),
                Loaded {
                    case: proto::Case::default(),
                    entries: Vec::new(),
                    request_ids: Vec::new(),
                    hashes: Vec::new(),
                    unreadable: None,
                },
            )
        },
        |(found, loaded), walk| {
            let (mut cases, mut entries) = (0u64, 0u64);
            let mut id = String::new();
            // Some(Ok): a case in scope; Some(Err): a record that cannot be
            // read; None: out of scope.
            let mut current: Option<std::result::Result<(), String>> = None;
            let mut visit = |event: CaseEvent<'_>| match event {
                CaseEvent::Begin { id: begun, record } => {
                    id.clear();
                    id.push_str(begun);
                    loaded.entries.clear();
                    loaded.unreadable = None;
                    current = match record {
                        Some(Ok(case)) => {
                            if workflow.is_some_and(|w| case.workflow != w) {
                                None
                            } else {
                                loaded.case = case;
                                Some(Ok(()))
                            }
                        }
                        Some(Err(message)) if workflow.is_none() => {
                            Some(Err(format!("the case record {message}")))
                        }
                        None if workflow.is_none() => Some(Err(
                            "history entries are stored for a case that has no case record"
                                .to_owned(),
                        )),
                        _ => None,
                    };
                }
                CaseEvent::Entry(raw) => {
                    if !matches!(current, Some(Ok(()))) || loaded.unreadable.is_some() {
                        return;
                    }
                    match raw.entry {
                        Ok(entry) => loaded.entries.push(records::from_entry(entry)),
                        Err(message) => {
                            loaded.unreadable = Some((raw.slot, message.to_owned()));
                        }
                    }
                }
                CaseEvent::End => {
                    cases += 1;
                    match current.take() {
                        None => {}
                        Some(Err(reason)) => {
                            replayed.fetch_add(1, Ordering::Relaxed);
                            found.push(CaseDivergence {
                                case_id: id.clone(),
                                workflow: String::new(),
                                sequence: 1,
                                reason,
                            });
                        }
                        Some(Ok(())) => {
                            replayed.fetch_add(1, Ordering::Relaxed);
                            entries += loaded.entries.len() as u64;
                            if let Some(stop) = check_loaded(lib, &id, loaded) {
                                found.push(CaseDivergence {
                                    case_id: id.clone(),
                                    workflow: loaded.case.workflow.clone(),
                                    sequence: stop.sequence,
                                    reason: stop.reason,
                                });
                            }
                        }
                    }
                }
            };
            walk(&mut visit)?;
            Ok((cases, entries))
        },
        |(mut found, _)| {
            results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut found)
        },
    )?;
    let mut divergences = results.into_inner().unwrap_or_else(|e| e.into_inner());
    divergences.sort_by(|a, b| a.case_id.cmp(&b.case_id));
    Ok(ReplayAllReport {
        cases: replayed.into_inner(),
        entries,
        divergences,
        elapsed: started.elapsed(),
    })
}

/// A point in a case's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Right after the step with this sequence number.
    Sequence(u64),
    /// As of this moment: after the last step at or before it.
    Time(DateTime<Utc>),
}

/// A case as it was at a point of its history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseAt {
    pub case_id: String,
    pub workflow: String,
    pub workflow_version: u32,
    /// The sequence number of the last step taken by then.
    pub sequence: u64,
    /// When that step happened.
    pub time: DateTime<Utc>,
    pub state: String,
    pub outcome: Option<String>,
    pub variables: BTreeMap<String, Json>,
    pub bindings: BTreeMap<String, String>,
    pub timers: Vec<Timer>,
    /// The whole case as replayed.
    pub case: core::Case,
    /// The stored hash of the step that led there: the head of the chain then.
    pub head_hash: Vec<u8>,
    /// The step that led there.
    pub step: ReplayStep,
}

/// The case as of `at`, rebuilt by replaying its history up to that point.
pub fn case_at(source: &dyn RecordSource, lib: &Library, id: &str, at: At) -> Result<CaseAt> {
    let loaded = load(source, id)?;
    let entries = &loaded.entries;
    let last = entries.len() as u64;
    let out_of_range = |requested: String| AuditError::OutOfRange {
        case_id: id.to_owned(),
        requested,
        last,
    };
    let n = match at {
        At::Sequence(s) => {
            if s == 0 || s > last {
                if let Some((slot, message)) = &loaded.unreadable
                    && s > last
                {
                    return Err(AuditError::EntryUndecodable {
                        case_id: id.to_owned(),
                        slot: *slot,
                        message: message.clone(),
                    });
                }
                return Err(out_of_range(format!("{s}")));
            }
            s as usize
        }
        At::Time(t) => {
            let n = entries.iter().take_while(|e| e.at <= t).count();
            if n == 0 {
                return Err(out_of_range(format!(
                    "at or before {} (the case started later)",
                    t.to_rfc3339()
                )));
            }
            if n == entries.len()
                && let Some((slot, message)) = &loaded.unreadable
            {
                return Err(AuditError::EntryUndecodable {
                    case_id: id.to_owned(),
                    slot: *slot,
                    message: message.clone(),
                });
            }
            n
        }
    };
    let case = &loaded.case;
    let cases = replay(
        lib,
        &case.workflow,
        &case.workflow_digest,
        id,
        parent(case),
        &entries[..n],
    )
    .map_err(|divergence| AuditError::Diverged {
        case_id: id.to_owned(),
        divergence,
    })?;
    let (Some(after), Some(entry)) = (cases.last(), entries.get(n - 1)) else {
        return Err(out_of_range(format!("{at:?}")));
    };
    Ok(CaseAt {
        case_id: id.to_owned(),
        workflow: case.workflow.clone(),
        workflow_version: version_of(source, case),
        sequence: entry.seq,
        time: entry.at,
        state: after.state.clone(),
        outcome: after.outcome.clone(),
        variables: after.vars.clone(),
        bindings: after.bindings.clone(),
        timers: after.timers.clone(),
        case: after.clone(),
        head_hash: loaded.hashes[n - 1].clone(),
        step: ReplayStep::new(entry, &loaded.request_ids[n - 1], after),
    })
}
