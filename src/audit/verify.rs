//! Verification of the hash chains (docs/hash-chain.md).
//!
//! For each case, every stored history record is decoded and hashed again
//! (with [`canonical::Encoder`], which allocates nothing per entry once
//! warm), and the chain is checked against the keys the records are stored
//! under and against the case record's `head_hash`. Every problem is
//! reported, each naming its case and sequence; a problem is not reported
//! again as the broken link it causes in the next entry.
//!
//! Cases are checked in parallel (one thread per core, at most 8).

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::source::{CaseEvent, CaseRecord, RawEntry, RecordSource, visit_case};
use super::{AuditError, Result};
use crate::store::canonical::Encoder;
use crate::store::proto;

/// Which cases to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyScope {
    /// Every case in the store (and histories left without a case record).
    All,
    /// The cases of one workflow, any version.
    Workflow(String),
    /// One case.
    Case(String),
}

/// What kind of problem a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// The entry's stored hash is not the hash of its content: it was changed.
    Altered,
    /// Entries are gone: a gap in the sequence numbers, or entries removed
    /// from the end (the case record's `head_hash` and sequence say more).
    Missing,
    /// An entry is stored where another belongs (under another sequence
    /// number), or links to an entry that comes after it.
    Reordered,
    /// An entry whose own hash is right but that does not link to the entry
    /// before it, or that lies beyond the head the case record seals: inserted
    /// or forged.
    Forged,
    /// The record does not decode at all.
    Undecodable,
    /// An entry of another case is stored under this one.
    Misplaced,
    /// The case record itself: undecodable, missing while history exists,
    /// or disagreeing with its history in a way that is not one of the above.
    CaseRecord,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Altered => "altered",
            FindingKind::Missing => "missing",
            FindingKind::Reordered => "reordered",
            FindingKind::Forged => "forged",
            FindingKind::Undecodable => "undecodable",
            FindingKind::Misplaced => "misplaced",
            FindingKind::CaseRecord => "case-record",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem: which case, which sequence number (the position in the
/// chain: the sequence of the key a record is stored under), what and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub case_id: String,
    /// `None` when the problem has no position (a case record, an entry
    /// whose position the source cannot tell).
    pub sequence: Option<u64>,
    pub kind: FindingKind,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.sequence {
            Some(s) => write!(
                f,
                "case {} sequence {}: {}: {}",
                self.case_id, s, self.kind, self.detail
            ),
            None => write!(f, "case {}: {}: {}", self.case_id, self.kind, self.detail),
        }
    }
}

/// How far a verification has got, for a progress bar. A whole-store or
/// workflow pass works through the store in parts (key ranges of similar
/// size), so its total number of cases is not known until it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub cases_done: u64,
    pub entries_checked: u64,
    pub parts_done: u64,
    pub parts_total: u64,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Cases checked.
    pub cases: u64,
    /// History records checked (decodable or not).
    pub entries: u64,
    /// Every problem found, by case and sequence.
    pub findings: Vec<Finding>,
    #[serde(serialize_with = "super::seconds")]
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// History records checked per second.
    pub fn entries_per_second(&self) -> f64 {
        super::per_second(self.entries, self.elapsed)
    }
}

/// A hash as stored: up to 32 bytes inline (any other length never matches
/// a SHA-256 and is kept as "invalid").
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stored {
    len: u8,
    bytes: [u8; 32],
}

impl Stored {
    const INVALID: u8 = u8::MAX;

    fn new(b: &[u8]) -> Self {
        let mut bytes = [0; 32];
        match b.len() {
            n @ 0..=32 => {
                bytes[..n].copy_from_slice(b);
                Stored {
                    len: n as u8,
                    bytes,
                }
            }
            _ => Stored {
                len: Self::INVALID,
                bytes,
            },
        }
    }

    fn is(&self, hash: &[u8; 32]) -> bool {
        self.len == 32 && self.bytes == *hash
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What verification keeps of one record: no heap unless something is wrong.
enum Checked {
    Undecodable(String),
    Entry {
        sequence: u64,
        stored: Stored,
        computed: [u8; 32],
        previous: Stored,
        /// The case id the entry names, when it is not the case's.
        other_case: Option<String>,
        workflow_digest_known: bool,
    },
}

struct Record {
    slot: Option<u64>,
    checked: Checked,
}

/// One worker's reusable state.
struct Worker<'s> {
    encoder: Encoder,
    records: Vec<Record>,
    sound: Vec<bool>,
    findings: Vec<Finding>,
    /// For the workflow scope: digests of its versions.
    digests: Option<&'s BTreeSet<String>>,
    /// For each child a checked case record lists: each must be in the store.
    children: Vec<ParentAndChild>,
}

/// A case id, and the id of a child its record lists.
type ParentAndChild = (String, String);

fn finding(
    case_id: &str,
    sequence: Option<u64>,
    kind: FindingKind,
    detail: impl Into<String>,
) -> Finding {
    Finding {
        case_id: case_id.to_owned(),
        sequence,
        kind,
        detail: detail.into(),
    }
}

fn short(bytes: &[u8]) -> String {
    let h = hex::encode(bytes);
    if h.is_empty() {
        "(empty)".to_owned()
    } else if h.len() > 16 {
        format!("{}…", &h[..16])
    } else {
        h
    }
}

impl Worker<'_> {
    /// Hashes one record of case `id` and keeps what the checks need.
    fn push(&mut self, id: &str, raw: RawEntry<'_>) {
        let checked = match raw.entry {
            Err(message) => Checked::Undecodable(message.to_owned()),
            Ok(entry) => Checked::Entry {
                sequence: entry.sequence,
                stored: Stored::new(&entry.hash),
                computed: self.encoder.hash(entry),
                previous: Stored::new(&entry.previous_hash),
                other_case: (entry.case_id != id).then(|| entry.case_id.clone()),
                workflow_digest_known: self
                    .digests
                    .is_none_or(|d| d.contains(&entry.workflow_digest)),
            },
        };
        self.records.push(Record {
            slot: raw.slot,
            checked,
        });
    }

    /// Checks one case whose records were pushed; returns the number of
    /// records checked, or `None` when the case is out of scope.
    fn finish(
        &mut self,
        id: &str,
        record: Option<CaseRecord>,
        workflow: Option<&str>,
    ) -> Option<u64> {
        let case = match record {
            Some(Ok(case)) => {
                if workflow.is_some_and(|w| case.workflow != w) {
                    return None;
                }
                if case.id != id {
                    self.findings.push(finding(
                        id,
                        None,
                        FindingKind::CaseRecord,
                        format!(
                            "the case record stored under `{id}` is the record of `{}`",
                            case.id
                        ),
                    ));
                }
                self.children.extend(
                    case.children
                        .iter()
                        .map(|child| (id.to_owned(), child.case_id.clone())),
                );
                Some(case)
            }
            unreadable_or_missing => {
                // Whose case is it? The entries' workflow digests tell.
                if workflow.is_some() && !self.in_workflow() {
                    return None;
                }
                let detail = match unreadable_or_missing {
                    Some(Err(message)) => format!("the case record {message}"),
                    _ => "history entries are stored for a case that has no case record".into(),
                };
                self.findings
                    .push(finding(id, None, FindingKind::CaseRecord, detail));
                None
            }
        };
        self.walk(id, case.as_ref());
        Some(self.records.len() as u64)
    }

    /// Whether any decodable entry ran under a version of the scope's workflow
    /// (or no entry can tell).
    fn in_workflow(&self) -> bool {
        let mut any = false;
        for r in &self.records {
            if let Checked::Entry {
                workflow_digest_known,
                ..
            } = r.checked
            {
                if workflow_digest_known {
                    return true;
                }
                any = true;
            }
        }
        !any
    }

    /// The chain checks over the records read, then the case record's head.
    fn walk(&mut self, id: &str, case: Option<&proto::Case>) {
        let records = &self.records;
        let findings = &mut self.findings;
        // Whether each record is sound (no finding of its own): only then is
        // the next entry's link to it checked.
        let sound = &mut self.sound;
        sound.clear();
        sound.resize(records.len(), false);
        let mut expected: Option<u64> = Some(1);
        for (i, r) in records.iter().enumerate() {
            let slot = r.slot;
            match (slot, expected) {
                (Some(s), Some(e)) if s > e => {
                    let what = if s - e == 1 {
                        format!("entry {e} is missing (the next stored entry is {s})")
                    } else {
                        format!(
                            "entries {e} to {} are missing (the next stored entry is {s})",
                            s - 1
                        )
                    };
                    findings.push(finding(id, Some(e), FindingKind::Missing, what));
                }
                (Some(s), Some(e)) if s < e => {
                    // Only a source that guesses positions can get here.
                    findings.push(finding(
                        id,
                        Some(s),
                        FindingKind::Reordered,
                        format!("stored after entry {}", e - 1),
                    ));
                }
                _ => {}
            }
            let contiguous = matches!((slot, expected), (Some(s), Some(e)) if s == e);
            expected = slot.map(|s| s.saturating_add(1));
            match &r.checked {
                Checked::Undecodable(message) => {
                    findings.push(finding(
                        id,
                        slot,
                        FindingKind::Undecodable,
                        format!("the history record {message}"),
                    ));
                }
                Checked::Entry {
                    sequence,
                    stored,
                    computed,
                    previous,
                    other_case,
                    ..
                } => {
                    if let Some(other) = other_case {
                        findings.push(finding(
                            id,
                            slot,
                            FindingKind::Misplaced,
                            format!("the entry stored here belongs to case `{other}`"),
                        ));
                        continue;
                    }
                    if !stored.is(computed) {
                        findings.push(finding(
                            id,
                            slot,
                            FindingKind::Altered,
                            format!(
                                "the stored hash {} is not the hash of the entry's content ({})",
                                short(&stored.bytes[..usize::from(stored.len.min(32))]),
                                short(computed)
                            ),
                        ));
                        continue;
                    }
                    if slot.is_some_and(|s| s != *sequence) {
                        findings.push(finding(
                            id,
                            slot,
                            FindingKind::Reordered,
                            format!("entry {sequence} is stored here"),
                        ));
                        continue;
                    }
                    if *sequence == 1 {
                        if !previous.is_empty() {
                            findings.push(finding(
                                id,
                                slot,
                                FindingKind::Forged,
                                "the first entry names a previous hash: an entry was inserted \
                                 before it or it was forged",
                            ));
                            continue;
                        }
                    } else if contiguous && i > 0 && sound[i - 1] {
                        let Checked::Entry {
                            stored: p_stored,
                            computed: p_computed,
                            ..
                        } = &records[i - 1].checked
                        else {
                            continue;
                        };
                        if *previous != *p_stored && !previous.is(p_computed) {
                            // Does it link to an entry that comes later?
                            let later = records[i + 1..].iter().find_map(|r| match &r.checked {
                                Checked::Entry {
                                    stored, sequence, ..
                                } if stored.len == 32 && *stored == *previous => Some(*sequence),
                                _ => None,
                            });
                            let (kind, detail) = match later {
                                Some(n) => (
                                    FindingKind::Reordered,
                                    format!("it links to entry {n}, which is stored after it"),
                                ),
                                None => (
                                    FindingKind::Forged,
                                    format!(
                                        "its hash is right but its previous_hash {} does not \
                                         match entry {} ({}): inserted or forged",
                                        short(&previous.bytes[..usize::from(previous.len.min(32))]),
                                        sequence - 1,
                                        short(&p_stored.bytes[..usize::from(p_stored.len.min(32))])
                                    ),
                                ),
                            };
                            findings.push(finding(id, slot, kind, detail));
                            continue;
                        }
                    }
                    sound[i] = true;
                }
            }
        }
        let Some(case) = case else {
            return;
        };
        let head = Stored::new(&case.head_hash);
        let last = records.iter().rposition(|r| r.slot.is_some());
        let last_slot = last.and_then(|i| records[i].slot).unwrap_or(0);
        let head_matches = last.is_some_and(|i| match &records[i].checked {
            Checked::Entry {
                stored, computed, ..
            } => head == *stored || head.is(computed),
            Checked::Undecodable(_) => false,
        });
        let last_sound = last.is_some_and(|i| sound[i]);
        if records.is_empty() {
            findings.push(finding(
                id,
                Some(1),
                FindingKind::Missing,
                format!(
                    "the case record says {} steps but no history entry is stored",
                    case.sequence
                ),
            ));
        } else if case.sequence > last_slot && !head_matches {
            let what = if case.sequence - last_slot == 1 {
                format!(
                    "entry {} was removed from the end (the case record's head_hash seals \
                     entry {} but the history ends at {last_slot})",
                    case.sequence, case.sequence
                )
            } else {
                format!(
                    "entries {} to {} were removed from the end (the history ends at {last_slot})",
                    last_slot + 1,
                    case.sequence
                )
            };
            findings.push(finding(id, Some(last_slot + 1), FindingKind::Missing, what));
        } else if case.sequence < last_slot && !head_matches {
            let beyond = format!(
                "entries after {} are stored beyond the head the case record seals \
                 (the history runs to {last_slot})",
                case.sequence
            );
            let first_beyond = Some(case.sequence + 1);
            match findings
                .iter_mut()
                .rev()
                .take_while(|f| f.case_id == id)
                .find(|f| f.sequence == first_beyond)
            {
                Some(f) => {
                    f.detail.push_str("; ");
                    f.detail.push_str(&beyond);
                }
                None => findings.push(finding(id, first_beyond, FindingKind::Forged, beyond)),
            }
        } else if case.sequence == last_slot && !head_matches && last_sound {
            findings.push(finding(
                id,
                Some(last_slot),
                FindingKind::Forged,
                "the last entry is not the one the case record's head_hash seals: it was \
                 replaced, or the case record was altered",
            ));
        } else if head_matches && case.sequence != last_slot {
            findings.push(finding(
                id,
                None,
                FindingKind::CaseRecord,
                format!(
                    "the case record says {} steps but its head_hash seals entry {last_slot}",
                    case.sequence
                ),
            ));
        }
    }
}

/// Parts a whole-store pass is cut into (see [`RecordSource::cuts`]): many
/// more than threads, so that threads finishing early take more.
pub(crate) const PARTS: usize = 256;

/// Worker threads for a pass over `parts` parts: one per core, at most 8.
pub(crate) fn threads_for(parts: usize) -> usize {
    if parts < 2 {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, 8)
            .min(parts)
    }
}

/// Where a pass runs: one case, or the whole store cut into parts at these
/// case ids (`[cuts[k-1], cuts[k])`, open at both ends, so that histories
/// without a case record fall in one too).
pub(crate) enum Reach<'a> {
    Case(&'a str),
    Parts(Vec<String>),
}

/// A walk over one part's cases with a visitor.
pub(crate) type Walk<'w> = &'w mut dyn FnMut(&mut dyn FnMut(CaseEvent<'_>)) -> Result<()>;

/// Runs a pass over `reach` on [`threads_for`] threads, for verify and
/// replay alike. Each thread makes its state with `start`; for each part it
/// takes, `part` gets the state and the walk over that part and returns the
/// cases and entries it went through; `finish` gets each thread's state at
/// the end. The first error stops the pass. Returns the entries gone through.
pub(crate) fn in_parts<S>(
    source: &dyn RecordSource,
    reach: &Reach<'_>,
    progress: Option<&(dyn Fn(Progress) + Sync)>,
    start: impl Fn() -> S + Sync,
    part: impl Fn(&mut S, Walk<'_>) -> Result<(u64, u64)> + Sync,
    finish: impl Fn(S) + Sync,
) -> Result<u64> {
    let parts = match reach {
        Reach::Case(_) => 1,
        Reach::Parts(cuts) => cuts.len() + 1,
    };
    let next = AtomicUsize::new(0);
    // Counted and reported under one lock, so that the reports come in
    // order and each is whole (reported apart, they went backwards).
    let done_so_far = Mutex::new(Progress {
        cases_done: 0,
        entries_checked: 0,
        parts_done: 0,
        parts_total: parts as u64,
    });
    let first_error: Mutex<Option<AuditError>> = Mutex::new(None);
    let work = || {
        let mut state = start();
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            if k >= parts {
                break;
            }
            let mut walk = |visit: &mut dyn FnMut(CaseEvent<'_>)| match reach {
                Reach::Case(id) => visit_case(source, id, visit),
                Reach::Parts(cuts) => source.visit_range(
                    k.checked_sub(1).map(|k| cuts[k].as_str()),
                    cuts.get(k).map(String::as_str),
                    visit,
                ),
            };
            match part(&mut state, &mut walk) {
                Ok((cases, entries)) => {
                    let mut so_far = done_so_far.lock().unwrap_or_else(|e| e.into_inner());
                    so_far.cases_done += cases;
                    so_far.entries_checked += entries;
                    so_far.parts_done += 1;
                    if let Some(progress) = progress {
                        progress(*so_far);
                    }
                }
                Err(e) => {
                    let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(e);
                    next.store(parts, Ordering::Relaxed);
                    break;
                }
            }
        }
        finish(state);
    };
    let threads = threads_for(parts);
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            // Replaying evaluates the workflows' expressions (see STACK_BYTES).
            let started = (0..threads)
                .filter(|_| {
                    std::thread::Builder::new()
                        .stack_size(crate::lang::expr::STACK_BYTES)
                        .spawn_scoped(s, work)
                        .is_ok()
                })
                .count();
            // Parts are taken from a shared counter, so any thread does them all.
            if started == 0 {
                work();
            }
        });
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(done_so_far
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .entries_checked)
}

/// Verifies the hash chains of the cases in `scope`. `progress` is called
/// now and then (from any of the worker threads) with how far it got.
pub fn verify(
    source: &dyn RecordSource,
    scope: &VerifyScope,
    progress: Option<&(dyn Fn(Progress) + Sync)>,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let (reach, workflow, digests) = match scope {
        VerifyScope::Case(id) => {
            let mut exists = source.case_record(id)?.is_some();
            if !exists {
                source.visit_history(id, &mut |_| {
                    exists = true;
                    ControlFlow::Break(())
                })?;
            }
            if !exists {
                return Err(AuditError::NotFound(id.clone()));
            }
            (Reach::Case(id.as_str()), None, None)
        }
        VerifyScope::All => (Reach::Parts(source.cuts(PARTS)?), None, None),
        VerifyScope::Workflow(name) => {
            super::known_workflow(source, name)?;
            let digests: BTreeSet<String> = source
                .workflow_versions()?
                .into_iter()
                .filter(|v| v.name == *name)
                .map(|v| v.digest)
                .collect();
            (
                Reach::Parts(source.cuts(PARTS)?),
                Some(name.as_str()),
                Some(digests),
            )
        }
    };
    let in_scope = AtomicU64::new(0);
    let results: Mutex<(Vec<Finding>, Vec<ParentAndChild>)> = Mutex::default();
    let entries = in_parts(
        source,
        &reach,
        progress,
        || Worker {
            encoder: Encoder::new(),
            records: Vec::new(),
            sound: Vec::new(),
            findings: Vec::new(),
            digests: digests.as_ref(),
            children: Vec::new(),
        },
        |worker, walk| {
            let mut entries = 0;
            let mut cases = 0;
            let mut id = String::new();
            let mut record = None;
            let mut skip = false;
            let mut visit = |event: CaseEvent<'_>| match event {
                CaseEvent::Begin {
                    id: begun,
                    record: r,
                } => {
                    worker.records.clear();
                    id.clear();
                    id.push_str(begun);
                    // Out of the workflow scope: nothing to hash.
                    skip = matches!((&r, workflow), (Some(Ok(c)), Some(w)) if c.workflow != w);
                    record = r;
                }
                CaseEvent::Entry(raw) => {
                    if !skip {
                        worker.push(&id, raw);
                    }
                }
                CaseEvent::End => {
                    cases += 1;
                    if let Some(n) = worker.finish(&id, record.take(), workflow) {
                        entries += n;
                        in_scope.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            walk(&mut visit)?;
            Ok((cases, entries))
        },
        |mut worker| {
            let mut results = results.lock().unwrap_or_else(|e| e.into_inner());
            results.0.append(&mut worker.findings);
            results.1.append(&mut worker.children);
        },
    )?;
    let (mut findings, children) = results.into_inner().unwrap_or_else(|e| e.into_inner());
    // A case taken out of the store whole (record and history) leaves no
    // chain to break: the parent that lists it tells.
    for (parent, child) in children {
        if source.case_record(&child)?.is_none() {
            let mut has_history = false;
            source.visit_history(&child, &mut |_| {
                has_history = true;
                ControlFlow::Break(())
            })?;
            if !has_history {
                findings.push(finding(
                    &child,
                    None,
                    FindingKind::Missing,
                    format!(
                        "case `{parent}` lists `{child}` as its child, and the store holds neither its record nor its history: it was taken out"
                    ),
                ));
            }
        }
    }
    // By case, then position (unpositioned first), then kind: a stable report.
    findings.sort_by(|a, b| {
        (&a.case_id, a.sequence, a.kind, &a.detail)
            .cmp(&(&b.case_id, b.sequence, b.kind, &b.detail))
    });
    Ok(VerifyReport {
        cases: in_scope.into_inner(),
        entries,
        findings,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{DateTime, TimeDelta};
    use serde_json::json;

    use super::*;
    use crate::audit::source::testing::{Memory, Slot};
    use crate::engine::core::{self, Actor};
    use crate::store::records;

    fn chain(id: &str, n: u64) -> Vec<proto::HistoryEntry> {
        let t0 = DateTime::from_timestamp(1_590_973_200, 0).expect("time");
        let mut previous = Vec::new();
        (1..=n)
            .map(|seq| {
                let e = core::Entry {
                    seq,
                    at: t0 + TimeDelta::minutes(seq as i64),
                    actor: Actor::Agency("hebei.sjz".into()),
                    event: if seq == 1 { "start" } else { "note" }.into(),
                    payload: json!({"text": format!("第{seq}步")}),
                    from: "open".into(),
                    to: "open".into(),
                    vars_changed: BTreeMap::new(),
                    bindings_changed: BTreeMap::new(),
                    timers_set: Vec::new(),
                    timers_cancelled: Vec::new(),
                    calendar_version: None,
                    digest: "d".into(),
                };
                let record = records::entry(id, &e, "", std::mem::take(&mut previous));
                previous.clone_from(&record.hash);
                record
            })
            .collect()
    }

    /// A store with one case `x` of `n` entries, as `tamper` leaves it.
    fn store(n: u64, tamper: impl FnOnce(&mut proto::Case, &mut Vec<Slot>)) -> Memory {
        let entries = chain("x", n);
        let mut case = proto::Case {
            id: "x".into(),
            workflow: "w".into(),
            sequence: n,
            head_hash: entries.last().map(|e| e.hash.clone()).unwrap_or_default(),
            ..Default::default()
        };
        let mut stored: Vec<_> = entries.into_iter().map(|e| (e.sequence, Ok(e))).collect();
        tamper(&mut case, &mut stored);
        let mut memory = Memory::default();
        memory.cases.insert("x".into(), case);
        memory.history.insert("x".into(), stored);
        memory
    }

    fn found(memory: &Memory) -> Vec<(Option<u64>, FindingKind)> {
        let report = verify(memory, &VerifyScope::All, None).expect("verify");
        report
            .findings
            .iter()
            .map(|f| (f.sequence, f.kind))
            .collect()
    }

    fn reseal(e: &mut proto::HistoryEntry) {
        e.hash = records::entry_hash(e).to_vec();
    }

    #[test]
    fn an_intact_chain_has_no_finding() {
        assert_eq!(found(&store(5, |_, _| {})), []);
    }

    #[test]
    fn an_entry_of_another_case_is_misplaced() {
        let memory = store(3, |_, h| {
            let mut other = chain("y", 2).remove(1);
            other.previous_hash = h[0].1.as_ref().expect("entry").hash.clone();
            reseal(&mut other);
            h[1].1 = Ok(other);
        });
        assert_eq!(found(&memory), [(Some(2), FindingKind::Misplaced)]);
    }

    #[test]
    fn a_link_to_a_later_entry_is_a_reordering() {
        let memory = store(4, |_, h| {
            let later = h[2].1.as_ref().expect("entry").hash.clone();
            let e = h[1].1.as_mut().expect("entry");
            e.previous_hash = later;
            reseal(e);
        });
        // Entry 3 then links to an entry that is no longer sealed: a consequence, not reported.
        assert_eq!(found(&memory), [(Some(2), FindingKind::Reordered)]);
    }

    #[test]
    fn a_first_entry_with_a_previous_hash_is_forged() {
        let memory = store(2, |_, h| {
            let e = h[0].1.as_mut().expect("entry");
            e.previous_hash = vec![7; 32];
            reseal(e);
        });
        assert_eq!(found(&memory), [(Some(1), FindingKind::Forged)]);
    }

    #[test]
    fn an_undecodable_record_in_the_middle_does_not_cascade() {
        let memory = store(4, |_, h| h[1].1 = Err("does not decode".into()));
        assert_eq!(found(&memory), [(Some(2), FindingKind::Undecodable)]);
    }

    #[test]
    fn an_entry_appended_beyond_the_head_is_forged_even_when_chained() {
        let memory = store(3, |_, h| {
            let mut extra = chain("x", 4).remove(3);
            extra.previous_hash = h[2].1.as_ref().expect("entry").hash.clone();
            reseal(&mut extra);
            h.push((4, Ok(extra)));
        });
        assert_eq!(found(&memory), [(Some(4), FindingKind::Forged)]);
    }

    #[test]
    fn a_case_record_disagreeing_with_its_sealed_head_is_reported() {
        let memory = store(3, |case, _| case.sequence = 2);
        assert_eq!(found(&memory), [(None, FindingKind::CaseRecord)]);
        let memory = store(3, |case, _| case.head_hash = vec![1; 32]);
        assert_eq!(found(&memory), [(Some(3), FindingKind::Forged)]);
    }

    #[test]
    fn a_case_without_history_is_missing_its_entries() {
        let memory = store(2, |_, h| h.clear());
        assert_eq!(found(&memory), [(Some(1), FindingKind::Missing)]);
    }

    #[test]
    fn a_hash_of_the_wrong_length_is_an_alteration() {
        let memory = store(3, |_, h| {
            let e = h[1].1.as_mut().expect("entry");
            e.hash.push(0);
        });
        assert_eq!(found(&memory), [(Some(2), FindingKind::Altered)]);
    }

    #[test]
    fn several_missing_entries_are_one_finding() {
        let memory = store(6, |_, h| {
            h.drain(1..4);
        });
        assert_eq!(found(&memory), [(Some(2), FindingKind::Missing)]);
    }
}
