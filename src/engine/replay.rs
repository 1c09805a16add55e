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

/// Names the first field in which two entries differ, with both values.
fn difference(stored: &Entry, produced: &Entry) -> Option<String> {
    fn json(value: &impl serde::Serialize) -> String {
        serde_json::to_string(value).unwrap_or_default()
    }
    let (s, p) = (stored, produced);
    type Show = fn(&Entry) -> String;
    let fields: [(&str, bool, Show); 12] = [
        ("time", s.at == p.at, |e| e.at.to_rfc3339()),
        ("actor", s.actor == p.actor, |e| json(&e.actor)),
        ("event", s.event == p.event, |e| e.event.clone()),
        ("payload", s.payload == p.payload, |e| e.payload.to_string()),
        ("from state", s.from == p.from, |e| e.from.clone()),
        ("to state", s.to == p.to, |e| e.to.clone()),
        ("variables changed", s.vars_changed == p.vars_changed, |e| {
            json(&e.vars_changed)
        }),
        (
            "bindings changed",
            s.bindings_changed == p.bindings_changed,
            |e| json(&e.bindings_changed),
        ),
        // Compared as deadlines: a calendar extended since gives them a new
        // calendar version (see `core::same_deadlines`), and the step's.
        (
            "timers set",
            core::same_deadlines(&s.timers_set, &p.timers_set),
            |e| json(&e.timers_set),
        ),
        (
            "timers cancelled",
            s.timers_cancelled == p.timers_cancelled,
            |e| json(&e.timers_cancelled),
        ),
        (
            "calendar version",
            s.calendar_version == p.calendar_version
                || (s.calendar_version.is_some() == p.calendar_version.is_some()
                    && core::same_deadlines(&s.timers_set, &p.timers_set)),
            |e| json(&e.calendar_version),
        ),
        ("workflow digest", s.digest == p.digest, |e| {
            e.digest.clone()
        }),
    ];
    fields
        .iter()
        .find(|(_, same, _)| !same)
        .map(|(name, _, show)| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit;

    /// The first step of a `permit` case `c1`, started by `ent` at `at`.
    fn started_permit(lib: &Library, at: chrono::DateTime<chrono::Utc>) -> Step {
        core::start(
            lib,
            "permit",
            "c1",
            "ent",
            &[("tax".to_owned(), "tax".to_owned())].into(),
            &object(serde_json::json!({"county": "k"})),
            at,
        )
        .expect("starts")
    }

    fn object(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    /// Regression: appending next year's holidays to the calendar, as the
    /// README asks every winter, gave the calendar a new version, and every
    /// stored step that had set a deadline then failed to replay ("stored
    /// timers set differs"), though its deadlines were the same.
    #[test]
    fn a_calendar_extended_since_replays_the_same_deadlines() {
        let docs = testkit::standard_docs();
        let before = testkit::library_of(&testkit::sources(&docs, Some(testkit::CALENDAR)));
        let extended = format!("{}2021-01-01,holiday\n", testkit::CALENDAR);
        let after = testkit::library_of(&testkit::sources(&docs, Some(&extended)));
        let t0 = testkit::at("2020-06-01T09:00:00+08:00");
        let started = started_permit(&before, t0);
        let submit = Input::Fire {
            event: "submit".into(),
            agency: "ent".into(),
            payload: object(serde_json::json!({"amount": 5})),
        };
        let submitted = core::apply(
            &before,
            &started.case,
            &submit,
            t0 + chrono::TimeDelta::hours(1),
        )
        .expect("submits");
        assert!(!submitted.entry.timers_set.is_empty(), "it sets a deadline");
        let entries = [started.entry, submitted.entry];
        let digest = started.case.digest.clone();
        assert!(replay(&before, "permit", &digest, "c1", None, &entries).is_ok());
        let replayed = replay(&after, "permit", &digest, "c1", None, &entries);
        assert!(replayed.is_ok(), "{:?}", replayed.err());
        // A deadline the rules now count differently is still a divergence.
        let mut moved = entries.clone();
        moved[1].timers_set[0].due += chrono::TimeDelta::hours(1);
        assert!(replay(&after, "permit", &digest, "c1", None, &moved).is_err());
    }

    /// Regression: fields without a display of their own were shown as the
    /// step's sequence ("stored 2, produced 2"), which hid what differed.
    #[test]
    fn a_divergence_shows_the_two_values_that_differ() {
        let lib = testkit::library();
        let entry = started_permit(&lib, testkit::at("2020-06-01T09:00:00+08:00")).entry;
        let mut other = entry.clone();
        other.digest = "f".repeat(64);
        let said = difference(&entry, &other).expect("differs");
        assert!(
            said.starts_with("the stored workflow digest differs")
                && said.contains(&entry.digest)
                && said.contains(&other.digest),
            "{said}"
        );
        let mut later = entry.clone();
        later.calendar_version = Some("cn_holidays@2".into());
        let said = difference(&entry, &later).expect("differs");
        assert!(said.contains("cn_holidays@2"), "{said}");
        assert_eq!(difference(&entry, &entry.clone()), None);
    }
}
