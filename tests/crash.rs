//! SIGKILL a writer under load, many times, and prove that every acknowledged
//! step is there, every history chain is intact and no case is half-written.
//!
//! After each kill, the requests the run had acknowledged, and some of the
//! first run's, are sent again to an engine on what is left: each gets its
//! first answer and appends nothing.
//!
//! `GOVFLOW_CRASH_RUNS` sets how many kills (default 20); each run restarts on
//! the data the previous kill left, so recovery itself is crashed too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use std::sync::Arc;

use serde_json::json;

use govflow::engine::durable::{Engine, FireRequest, StartRequest, SystemClock};
use govflow::lang::load::load;
use govflow::store::{SledStore, Store, records};

use crate::common::{data, env_or, obj};

const AGENCY: &str = "hebei.sjz.zhengding";

/// Sends again the worker's requests behind this run's acknowledgements of
/// `ledger` cases (`r{run}-t{task}-{i}`: a start, then notes 0, 1, 2): each
/// must get the answer it got before the kill, and no case may move.
fn check_retries(dir: &Path, acked_now: &BTreeMap<String, u64>) -> Result<usize, String> {
    let sources = load(&[data()]).map_err(|e| e.to_string())?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).map_err(|e| e.to_string())?);
    let engine = Engine::open(store, &sources, Arc::new(SystemClock)).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut retried = 0;
    let ledgers = acked_now
        .iter()
        .filter(|(id, _)| id.matches('-').count() == 2 && id.starts_with('r'));
    for (id, &seq) in ledgers {
        let before = engine.case(id).map_err(|e| e.to_string())?.sequence;
        let i = id.rsplit('-').next().unwrap_or_default();
        let started = runtime
            .block_on(engine.start(StartRequest {
                request_id: id.clone(),
                case_id: id.clone(),
                workflow: "ledger".into(),
                agency: AGENCY.into(),
                bindings: [("handler".to_owned(), AGENCY.to_owned())].into(),
                variables: obj(json!({"enterprise": format!("企业{i}")})),
            }))
            .map_err(|e| format!("retried start of {id}: {e}"))?;
        if started.sequence != 1 {
            return Err(format!(
                "retried start of {id} answered step {}",
                started.sequence
            ));
        }
        for n in 0..seq.saturating_sub(1).min(3) {
            let answer = runtime
                .block_on(engine.fire(FireRequest {
                    request_id: format!("{id}-n{n}"),
                    case_id: id.clone(),
                    event: "note".into(),
                    agency: AGENCY.into(),
                    payload: obj(json!({"text": "进展"})),
                    expected_sequence: Some(1 + n),
                }))
                .map_err(|e| format!("retried note {n} of {id}: {e}"))?;
            if answer.sequence != n + 2 {
                return Err(format!(
                    "retried note {n} of {id} answered step {}, not {}",
                    answer.sequence,
                    n + 2
                ));
            }
            retried += 1;
        }
        let after = engine.case(id).map_err(|e| e.to_string())?.sequence;
        if after != before {
            return Err(format!("retries moved {id} from step {before} to {after}"));
        }
    }
    engine.shutdown();
    Ok(retried)
}

fn check_store(dir: &Path, acked: &BTreeMap<String, u64>) -> Result<usize, String> {
    let store = SledStore::open(dir).map_err(|e| format!("reopen: {e}"))?;
    let ids = store.case_ids("", usize::MAX).map_err(|e| e.to_string())?;
    for id in &ids {
        let case = store
            .case(id)
            .map_err(|e| e.to_string())?
            .ok_or("listed case vanished")?;
        let history = store
            .history(id, 0, usize::MAX)
            .map_err(|e| e.to_string())?;
        if history.len() as u64 != case.sequence {
            return Err(format!(
                "case {id} is at sequence {} but has {} entries: half-written",
                case.sequence,
                history.len()
            ));
        }
        let mut previous = Vec::new();
        for (i, entry) in history.iter().enumerate() {
            if entry.sequence != i as u64 + 1
                || entry.previous_hash != previous
                || entry.hash != records::entry_hash(entry).to_vec()
            {
                return Err(format!("case {id}: chain broken at entry {}", i + 1));
            }
            previous.clone_from(&entry.hash);
        }
        if case.head_hash != previous {
            return Err(format!(
                "case {id}: head hash does not match its last entry"
            ));
        }
        for child in &case.children {
            let Some(c) = store.case(&child.case_id).map_err(|e| e.to_string())? else {
                return Err(format!(
                    "case {id} spawned {} but the child is missing",
                    child.case_id
                ));
            };
            if c.parent != *id || (!c.outcome.is_empty() && child.outcome != c.outcome) {
                return Err(format!("child {} and parent {id} disagree", child.case_id));
            }
        }
    }
    for (id, seq) in acked {
        match store.case(id).map_err(|e| e.to_string())? {
            Some(case) if case.sequence >= *seq => {}
            Some(case) => {
                return Err(format!(
                    "acknowledged {id}@{seq} lost: store has {}",
                    case.sequence
                ));
            }
            None => return Err(format!("acknowledged case {id} lost")),
        }
    }
    Ok(ids.len())
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_step() {
    let runs: u32 = env_or("GOVFLOW_CRASH_RUNS", 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let workflows = data();
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut total_acks = 0usize;
    let mut total_retries = 0usize;
    // Some of the first run's requests, sent again after every later kill too.
    let mut first_run: BTreeMap<String, u64> = BTreeMap::new();
    for run in 0..runs {
        let mut worker = Command::new(env!("CARGO_BIN_EXE_govflow"))
            .args(["crash-worker", "--run", &run.to_string(), "--data"])
            .arg(dir.path().join("data"))
            .arg("--workflows")
            .arg(&workflows)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts");
        let stdout = worker.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        // Kill at a different moment each run: 150 to 650 ms in.
        std::thread::sleep(Duration::from_millis(150 + u64::from(run * 137 % 500)));
        worker.kill().expect("SIGKILL");
        worker.wait().expect("reaped");
        let lines = reader.join().expect("reader");
        total_acks += lines.len();
        let mut acked_now: BTreeMap<String, u64> = BTreeMap::new();
        for line in lines {
            let mut parts = line.split_whitespace();
            if let (Some("ack"), Some(id), Some(seq)) = (parts.next(), parts.next(), parts.next()) {
                let seq: u64 = seq.parse().expect("sequence");
                for seen in [&mut acked, &mut acked_now] {
                    let known = seen.entry(id.to_owned()).or_default();
                    *known = (*known).max(seq);
                }
            }
        }
        if let Err(problem) = check_store(&dir.path().join("data"), &acked) {
            panic!("after kill {run}: {problem}");
        }
        if run == 0 {
            first_run = acked_now
                .iter()
                .take(200)
                .map(|(k, v)| (k.clone(), *v))
                .collect();
        }
        acked_now.extend(first_run.iter().map(|(k, v)| (k.clone(), *v)));
        match check_retries(&dir.path().join("data"), &acked_now) {
            Ok(n) => total_retries += n,
            Err(problem) => panic!("after kill {run}: {problem}"),
        }
    }
    assert!(
        total_acks > 0,
        "the worker acknowledged nothing: the test proved nothing"
    );
    assert!(total_retries > 0, "no acknowledged request was retried");
    eprintln!(
        "{runs} kills, {total_acks} acknowledged steps, all present; {total_retries} acknowledged notes sent again, each with its first answer"
    );
}
