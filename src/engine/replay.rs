//! Replay: run a case's stored history through the core again, with the
//! workflow version it is pinned to, and check each step against what is
//! stored. Pure, like the core: the same history always replays the same way.

use std::sync::Arc;

use super::core::{self, Case, Entry, Input, Step};
use crate::lang::validate::{CompiledWorkflow, Library};

/// Where and why a replay stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sequence {sequence}: {reason}")]
pub struct Divergence {
    /// The first entry whose replay differs from what is stored.
    pub sequence: u64,
    pub reason: String,
}

/// The case after each replayed step, in order.
pub type Replayed = Vec<Case>;

fn diverge(sequence: u64, reason: impl Into<String>) -> Divergence {
    Divergence {
        sequence,
        reason: reason.into(),
    }
}

/// Names the first field in which two entries differ.
fn difference(stored: &Entry, produced: &Entry) -> Option<String> {
    let fields: [(&str, bool); 12] = [
        ("time", stored.at == produced.at),
        ("actor", stored.actor == produced.actor),
        ("event", stored.event == produced.event),
        ("payload", stored.payload == produced.payload),
        ("from state", stored.from == produced.from),
        ("to state", stored.to == produced.to),
        (
            "variables changed",
            stored.vars_changed == produced.vars_changed,
        ),
        (
            "bindings changed",
            stored.bindings_changed == produced.bindings_changed,
        ),
        ("timers set", stored.timers_set == produced.timers_set),
        (
            "timers cancelled",
            stored.timers_cancelled == produced.timers_cancelled,
        ),
        (
            "calendar version",
            stored.calendar_version == produced.calendar_version,
        ),
        ("workflow digest", stored.digest == produced.digest),
    ];
    fields.iter().find(|(_, same)| !same).map(|(name, _)| {
        let show = |e: &Entry| match *name {
            "to state" => e.to.clone(),
            "variables changed" => serde_json::to_string(&e.vars_changed).unwrap_or_default(),
            "payload" => e.payload.to_string(),
            "event" => e.event.clone(),
            "timers set" => serde_json::to_string(&e.timers_set).unwrap_or_default(),
            _ => format!("{:?}", e.seq),
        };
        format!(
            "the stored {name} differs from what the rules produce (stored {}, produced {})",
            show(stored),
            show(produced)
        )
    })
}

/// A stored deadline spent on a refusal other than "no transition applies",
/// as govflow did before 2026-11-27: the same step again, when the rules
/// still refuse it with the code it recorded.
fn spent_before(
    lib: &Library,
    case: &Case,
    input: &Input,
    stored: &Entry,
    refusal: &core::Rejection,
) -> Option<Step> {
    let Input::Timer { timer_id } = input else {
        return None;
    };
    let recorded = stored.payload.get(core::SPENT_KEY)?.as_str()?;
    let code = recorded.split(':').next()?;
    (code == refusal.code.as_str())
        .then(|| core::spent_as_before(lib, case, timer_id, refusal, stored.at))
        .flatten()
}

/// Replays `entries` (from sequence 1) of case `case_id`, pinned to `digest`
/// of `workflow`, with `parent` as its parent case if it is a child.
pub fn replay(
    lib: &Library,
    workflow: &str,
    digest: &str,
    case_id: &str,
    parent: Option<&str>,
    entries: &[Entry],
) -> Result<Replayed, Divergence> {
    let wf: &Arc<CompiledWorkflow> = lib.pinned(workflow, digest).ok_or_else(|| {
        diverge(
            1,
            format!("workflow `{workflow}` version {digest} is not available"),
        )
    })?;
    if wf.digest != digest {
        return Err(diverge(
            1,
            format!(
                "workflow `{workflow}` version {digest} is not available (only {})",
                wf.digest
            ),
        ));
    }
    let mut cases = Vec::with_capacity(entries.len());
    let mut current: Option<Case> = None;
    for (i, stored) in entries.iter().enumerate() {
        let expected_seq = i as u64 + 1;
        if stored.seq != expected_seq {
            return Err(diverge(
                expected_seq,
                format!(
                    "entry {} is stored where {expected_seq} should be",
                    stored.seq
                ),
            ));
        }
        let step: Step = match &current {
            None => {
                let args = stored
                    .start_args()
                    .ok_or_else(|| diverge(1, "the first entry is not a start"))?;
                let mut step = core::start_version(
                    lib,
                    wf,
                    case_id,
                    &args.starter,
                    &args.bindings,
                    &args.variables,
                    stored.at,
                )
                .map_err(|r| diverge(1, format!("the start is refused now: {r}")))?;
                step.case.parent = parent.map(str::to_owned);
                step
            }
            Some(case) => {
                let input: Input = stored
                    .input()
                    .ok_or_else(|| diverge(stored.seq, "a second start entry"))?;
                core::apply(lib, case, &input, stored.at).or_else(|r| {
                    spent_before(lib, case, &input, stored, &r).ok_or_else(|| {
                        diverge(stored.seq, format!("the rules refuse this step now: {r}"))
                    })
                })?
            }
        };
        if let Some(reason) = difference(stored, &step.entry) {
            return Err(diverge(stored.seq, reason));
        }
        cases.push(step.case.clone());
        current = Some(step.case);
    }
    Ok(cases)
}
