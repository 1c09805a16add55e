//! Audit speed, for BENCHMARKS: [`measure_verify`] times a full
//! verification and [`measure_replay`] a full replay. [`fill_synthetic`]
//! writes a store of chained histories to verify (realistic records, not
//! replayable ones: verification does not run the rules);
//! [`fill_from_scenarios`] writes real, replayable histories: copies of
//! every case the seed scenario files produce.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta};
use serde::Serialize;
use serde_json::json;

use super::replay::replay_all;
use super::source::RecordSource;
use super::verify::{VerifyScope, verify};
use super::{AuditError, Result};
use crate::engine::core::{self, Actor};
use crate::engine::durable::index_keys;
use crate::lang::load::Sources;
use crate::lang::validate::Library;
use crate::scenario::run::record;
use crate::store::{CaseWrite, Commit, IndexKey, Store, proto, records};

/// How fast a verification went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Throughput {
    pub cases: u64,
    pub entries: u64,
    pub seconds: f64,
    pub entries_per_second: f64,
    /// Problems found (0 on an untampered store).
    pub findings: usize,
}

/// Verifies every case of `source` and reports the speed.
pub fn measure_verify(source: &dyn RecordSource) -> Result<Throughput> {
    let report = verify(source, &VerifyScope::All, None)?;
    Ok(Throughput {
        cases: report.cases,
        entries: report.entries,
        seconds: report.elapsed.as_secs_f64(),
        entries_per_second: report.entries_per_second(),
        findings: report.findings.len(),
    })
}

/// Replays every case of `source` through `lib` and reports the speed
/// (`findings`: cases that did not replay as stored).
pub fn measure_replay(source: &dyn RecordSource, lib: &Library) -> Result<Throughput> {
    let report = replay_all(source, lib, &VerifyScope::All, None)?;
    Ok(Throughput {
        cases: report.cases,
        entries: report.entries,
        seconds: report.elapsed.as_secs_f64(),
        entries_per_second: report.entries_per_second(),
        findings: report.divergences.len(),
    })
}

/// Writes copies of every case the scenario files of `sources` produce,
/// until at least `min_entries` history entries are written: each copy runs
/// every scenario through the pure core (as `govflow test` does) with its
/// own case ids (`r{copy:06}-{scenario:03}`, children under them), and its
/// histories are chained and stored as the durable engine stores them
/// (version 1 of every workflow of `sources`, also written). `library` is
/// `sources` validated. Returns the number of entries written.
pub fn fill_from_scenarios(
    store: &dyn Store,
    sources: &Sources,
    library: &Library,
    min_entries: u64,
) -> Result<u64> {
    let scenarios: Vec<_> = sources.scenarios().map(|(_, s)| s).collect();
    if scenarios.is_empty() {
        return Err(AuditError::Scenario("no scenario files to copy".into()));
    }
    let mut written = 0u64;
    let mut commit = Commit::default();
    let mut copy = 0usize;
    while written < min_entries {
        for (n, scenario) in scenarios.iter().enumerate() {
            let main = format!("r{copy:06}-{n:03}");
            let histories = record(library, scenario, &main)
                .map_err(|e| AuditError::Scenario(format!("scenario `{}`: {e}", scenario.name)))?;
            for (id, (case, entries)) in histories {
                let mut previous = Vec::new();
                let records: Vec<proto::HistoryEntry> = entries
                    .iter()
                    .map(|e| {
                        let request = match e.actor {
                            Actor::Agency(_) => format!("{id}#{}", e.seq),
                            Actor::Timer(_) | Actor::Engine => String::new(),
                        };
                        let record =
                            records::entry(&id, e, &request, std::mem::take(&mut previous));
                        previous.clone_from(&record.hash);
                        record
                    })
                    .collect();
                written += records.len() as u64;
                let after = records::case(&case, 1, previous);
                commit.cases.push(CaseWrite {
                    before: None,
                    index_after: index_keys(library, &after),
                    after: Arc::new(after),
                    entries: records,
                    index_before: BTreeSet::new(),
                });
            }
            if commit.cases.len() >= 500 {
                store.apply(&std::mem::take(&mut commit))?;
            }
        }
        copy += 1;
    }
    let deployed = DateTime::from_timestamp(1_577_808_000, 0).unwrap_or_default();
    for (file, workflow) in sources.workflows() {
        if let Some(compiled) = library.workflows.get(&workflow.name) {
            commit.workflows.push(proto::WorkflowVersion {
                name: workflow.name.clone(),
                version: 1,
                source: file.text.clone(),
                digest: compiled.digest.clone(),
                deploy_time: Some(records::timestamp(deployed)),
            });
        }
    }
    store.commit(&commit)?;
    Ok(written)
}

/// Writes `cases` cases of `steps` chained history entries each (case ids
/// `bench-{n}`, workflow `bench`, version 1 with an empty source), in
/// batches, and syncs. Returns the number
/// of entries written.
pub fn fill_synthetic(store: &dyn Store, cases: usize, steps: usize) -> Result<u64> {
    let t0 = DateTime::from_timestamp(1_590_973_200, 0).unwrap_or_default();
    let digest = "0".repeat(64);
    let mut written = 0u64;
    let mut commit = Commit::default();
    for n in 0..cases {
        let id = format!("bench-{n:08}");
        let mut case = core::Case {
            id: id.clone(),
            workflow: "bench".into(),
            digest: digest.clone(),
            state: "open".into(),
            outcome: None,
            vars: [
                ("enterprise".to_owned(), json!("石家庄某制造有限公司")),
                ("notes".to_owned(), json!(0)),
            ]
            .into(),
            bindings: [
                ("handler".to_owned(), "hebei.sjz.zhengding".to_owned()),
                ("supervisor".to_owned(), "hebei.sjz".to_owned()),
            ]
            .into(),
            seq: 0,
            signatures: Default::default(),
            children: Vec::new(),
            parent: None,
            timers: Vec::new(),
            started_at: t0,
            updated_at: t0,
        };
        let mut entries = Vec::with_capacity(steps);
        let mut previous = Vec::new();
        for s in 1..=steps as u64 {
            let at = t0 + TimeDelta::minutes((n as i64) * 7 + s as i64);
            let (event, payload, vars_changed) = if s == 1 {
                (
                    "start",
                    json!({"bindings": {"handler": "hebei.sjz.zhengding"}, "variables": {"enterprise": "石家庄某制造有限公司"}}),
                    case.vars.clone(),
                )
            } else {
                (
                    "note",
                    json!({"text": format!("第{s}次进展：已联系企业，材料齐全")}),
                    [("notes".to_owned(), json!(s - 1))].into(),
                )
            };
            let entry = core::Entry {
                seq: s,
                at,
                actor: Actor::Agency("hebei.sjz.zhengding".into()),
                event: event.into(),
                payload,
                from: if s == 1 { String::new() } else { "open".into() },
                to: "open".into(),
                vars_changed,
                bindings_changed: if s == 1 {
                    case.bindings.clone()
                } else {
                    Default::default()
                },
                timers_set: Vec::new(),
                timers_cancelled: Vec::new(),
                calendar_version: None,
                digest: digest.clone(),
            };
            let record = records::entry(&id, &entry, &format!("req-{n}-{s}"), previous);
            previous = record.hash.clone();
            entries.push(record);
            case.seq = s;
            case.updated_at = at;
        }
        written += entries.len() as u64;
        commit.cases.push(CaseWrite {
            before: None,
            after: Arc::new(records::case(&case, 1, previous)),
            entries,
            index_before: BTreeSet::new(),
            index_after: [IndexKey::Workflow("bench".into())].into(),
        });
        if commit.cases.len() >= 500 {
            store.apply(&std::mem::take(&mut commit))?;
        }
    }
    // The version the entries name, so that scopes by workflow find them.
    commit.workflows.push(proto::WorkflowVersion {
        name: "bench".into(),
        version: 1,
        source: String::new(),
        digest,
        deploy_time: Some(records::timestamp(t0)),
    });
    store.commit(&commit)?;
    Ok(written)
}
