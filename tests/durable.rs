//! The durable engine on sled: atomic, synced, idempotent, concurrent, with
//! timers and children that survive restarts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::TimeDelta;
use serde_json::{Map, json};

use govflow::engine::RejectCode;
use govflow::engine::durable::{
    Engine, EngineError, FireRequest, ManualClock, Monotonic, StartRequest,
};
use govflow::lang::load::load;
use govflow::store::{CaseFilter, SledStore, Store, SyncStep, proto, records};

use crate::common::{
    CITY, COUNTY, TestStore, data, engine_on_test_store, env_or, fire, fresh_engine, obj,
    open_engine, start_batch, start_handled, start_ledger, t0,
};

fn note(id: &str, request: &str) -> FireRequest {
    fire(id, request, "note", COUNTY, json!({"text": "进展"}))
}

/// Everything the store holds about its cases, for before/after comparisons.
fn snapshot(engine: &Engine) -> BTreeMap<String, (proto::Case, Vec<proto::HistoryEntry>)> {
    let store = engine.store();
    store
        .case_ids("", 10_000)
        .expect("ids")
        .into_iter()
        .map(|id| {
            let case = store.case(&id).expect("read").expect("present");
            let history = store.history(&id, 0, usize::MAX).expect("history");
            (id, (case, history))
        })
        .collect()
}

fn chain_intact(history: &[proto::HistoryEntry]) -> bool {
    let mut previous = Vec::new();
    history.iter().enumerate().all(|(i, e)| {
        let ok = e.sequence == i as u64 + 1
            && e.previous_hash == previous
            && e.hash == records::entry_hash(e).to_vec();
        previous.clone_from(&e.hash);
        ok
    })
}

#[tokio::test]
async fn reopening_after_every_kind_of_operation_finds_everything_as_it_was() {
    let (dir, clock, mut engine) = fresh_engine();
    type Op = Box<dyn Fn(Engine) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>;
    let ops: Vec<(&str, Op)> = vec![
        (
            "start",
            Box::new(|e: Engine| {
                Box::pin(async move {
                    e.start(start_ledger("a")).await.expect("start");
                })
            }),
        ),
        (
            "fire",
            Box::new(|e: Engine| {
                Box::pin(async move {
                    e.fire(note("a", "n1")).await.expect("fire");
                })
            }),
        ),
        (
            "spawn",
            Box::new(|e: Engine| {
                Box::pin(async move {
                    e.start(start_batch("b", "b")).await.expect("start");
                    let items = json!({"items": ["x", "y"]});
                    e.fire(fire("b", "d", "dispatch", CITY, items))
                        .await
                        .expect("dispatch");
                })
            }),
        ),
        (
            "child settles",
            Box::new(|e: Engine| {
                Box::pin(async move {
                    e.fire(fire("b/0", "f0", "finish", CITY, json!({})))
                        .await
                        .expect("finish");
                })
            }),
        ),
        (
            "timer",
            Box::new(|e: Engine| {
                Box::pin(async move {
                    e.tick().await.expect("tick");
                })
            }),
        ),
        (
            "deploy",
            Box::new(|e: Engine| {
                Box::pin(async move {
                    let source = std::fs::read_to_string(data().join("ledger.ron"))
                        .expect("read")
                        .replace("台账", "台账（第二版）");
                    assert!(e.deploy(source).await.expect("deploy").created);
                })
            }),
        ),
    ];
    for (name, op) in ops {
        if name == "timer" {
            clock.set(t0() + TimeDelta::days(5));
        }
        op(engine.clone()).await;
        let before = snapshot(&engine);
        let versions = engine.workflow_versions().expect("versions");
        engine.shutdown();
        drop(engine);
        engine = open_engine(dir.path(), &clock);
        assert_eq!(snapshot(&engine), before, "after {name}");
        if name != "deploy" {
            assert_eq!(
                engine.workflow_versions().expect("versions"),
                versions,
                "after {name}"
            );
        }
        for (id, (_, history)) in &before {
            assert!(chain_intact(history), "chain of {id} after {name}");
        }
    }
    // The deploy is remembered: reopening with the older file still on disk
    // neither undoes it nor numbers the older content again.
    let ledger: Vec<u32> = engine
        .workflow_versions()
        .expect("versions")
        .iter()
        .filter(|v| v.name == "ledger")
        .map(|v| v.version)
        .collect();
    assert_eq!(ledger, [1, 2]);
    let a = engine.case("a").expect("a");
    assert_eq!(
        (a.state.as_str(), a.sequence),
        ("escalated", 4),
        "start, note, reminder, escalation"
    );
    let b = engine.case("b").expect("b");
    assert_eq!(b.children.iter().filter(|c| c.outcome == "done").count(), 1);
    let mine = engine
        .list(
            &CaseFilter {
                workflow: Some("ledger".into()),
                variable: Some(("enterprise".into(), "石家庄某制造有限公司".into())),
                ..Default::default()
            },
            "",
            10,
        )
        .expect("list");
    assert_eq!(mine.cases.len(), 1);
    engine
        .start(start_ledger("after-reopening"))
        .await
        .expect("start");
    assert_eq!(
        engine
            .case("after-reopening")
            .expect("case")
            .workflow_version,
        2,
        "new cases start on the version deployed, not the folder's older one"
    );
    assert_eq!(engine.case("a").expect("a").workflow_version, 1);
}

#[derive(Debug)]
enum Event {
    Applied(Vec<(String, u64)>),
    Flushed,
    Syncing,
    Synced,
    Ack(String, u64),
}

#[tokio::test]
async fn no_acknowledgement_comes_before_the_sync_of_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(t0()));
    let log: Arc<Mutex<Vec<Event>>> = Arc::default();
    let sink = Arc::clone(&log);
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open(dir.path())
            .expect("store")
            .with_observer(Arc::new(move |step| {
                let event = match step {
                    SyncStep::Applied(written) => Event::Applied(written),
                    SyncStep::Flushed => Event::Flushed,
                    SyncStep::Syncing => Event::Syncing,
                    // After `Flushed`; this test's workflows make no blobs.
                    SyncStep::BlobsSynced(_) => return,
                    SyncStep::Synced => Event::Synced,
                };
                sink.lock().expect("lock").push(event)
            })),
    );
    let sources = load(&[data()]).expect("loads");
    let engine = Engine::open(store, &sources, clock).expect("opens");
    let mut tasks = Vec::new();
    for c in 0..8 {
        let (engine, log) = (engine.clone(), Arc::clone(&log));
        tasks.push(tokio::spawn(async move {
            let id = format!("case-{c}");
            let started = engine.start(start_ledger(&id)).await.expect("start");
            log.lock()
                .expect("lock")
                .push(Event::Ack(id.clone(), started.sequence));
            for i in 0..25 {
                let case = engine
                    .fire(note(&id, &format!("{id}-{i}")))
                    .await
                    .expect("fire");
                log.lock()
                    .expect("lock")
                    .push(Event::Ack(id.clone(), case.sequence));
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let log = log.lock().expect("lock");
    let first_after = |from: usize, wanted: fn(&Event) -> bool| {
        log[from..].iter().position(wanted).map(|i| from + i)
    };
    let mut acks = 0;
    for (at, event) in log.iter().enumerate() {
        let Event::Ack(id, seq) = event else { continue };
        acks += 1;
        let applied = log[..at]
            .iter()
            .rposition(
                |e| matches!(e, Event::Applied(w) if w.iter().any(|(c, s)| c == id && s == seq)),
            )
            .unwrap_or_else(|| panic!("{id}@{seq} was acknowledged before it was even applied"));
        // The data must be written out after it was applied, and an
        // fdatasync must have started after that and returned before the ack.
        let synced = first_after(applied, |e| matches!(e, Event::Flushed))
            .and_then(|flushed| first_after(flushed, |e| matches!(e, Event::Syncing)))
            .and_then(|syncing| first_after(syncing, |e| matches!(e, Event::Synced)));
        assert!(
            synced.is_some_and(|synced| synced < at),
            "{id}@{seq} was acknowledged before a sync covered it"
        );
    }
    assert_eq!(acks, 8 * 26);
    let syncs = log.iter().filter(|e| matches!(e, Event::Synced)).count();
    assert!(
        syncs < acks,
        "concurrent callers share syncs ({syncs} syncs for {acks} commits)"
    );
}

/// Sends every request at once, each from its own task; the answers in order.
async fn fire_at_once(
    engine: &Engine,
    requests: impl IntoIterator<Item = FireRequest>,
) -> Vec<Result<proto::Case, EngineError>> {
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.fire(request).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

#[tokio::test]
async fn many_callers_on_one_case_lose_no_update() {
    let (_dir, _clock, engine) = fresh_engine();
    engine.start(start_ledger("a")).await.expect("start");
    for answer in fire_at_once(&engine, (0..100).map(|i| note("a", &format!("n{i}")))).await {
        answer.expect("fire");
    }
    let case = engine.case("a").expect("case");
    assert_eq!(case.sequence, 101);
    let notes = records::from_struct(case.variables.as_ref())["notes"].clone();
    assert_eq!(notes, json!(100));
    assert!(chain_intact(&engine.history("a").expect("history")));

    // With an expected sequence, exactly one of those racing for it wins.
    let racers = (0..20).map(|i| FireRequest {
        expected_sequence: Some(101),
        ..note("a", &format!("race{i}"))
    });
    let mut won = 0;
    for answer in fire_at_once(&engine, racers).await {
        match answer {
            Ok(_) => won += 1,
            Err(EngineError::SequenceMismatch {
                current,
                expected: 101,
                ..
            }) => assert_eq!(current, 102),
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(won, 1);
}

/// Notes each caller fires.
const NOTES: usize = 100;

/// 40 callers on `cases` cases (started first), each firing [`NOTES`] notes on
/// its case.
async fn many_callers_on_many_cases(engine: &Engine, cases: usize) {
    for c in 0..cases {
        let id = format!("case-{c}");
        engine.start(start_ledger(&id)).await.expect("start");
    }
    let tasks: Vec<_> = (0..40)
        .map(|caller| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let id = format!("case-{}", caller % cases);
                for n in 0..NOTES {
                    engine
                        .fire(note(&id, &format!("{caller}-{n}")))
                        .await
                        .expect("fire");
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(60), t)
            .await
            .expect("no deadlock")
            .expect("task");
    }
    let notes_each = NOTES * 40 / cases;
    for c in 0..cases {
        let id = format!("case-{c}");
        let case = engine.case(&id).expect("case");
        assert_eq!(case.sequence, 1 + notes_each as u64, "{id}");
        let notes = records::from_struct(case.variables.as_ref())["notes"].clone();
        assert_eq!(notes, json!(notes_each), "{id}");
        assert!(chain_intact(&engine.history(&id).expect("history")), "{id}");
    }
    let inbox = engine
        .inbox("hebei.sjz.zhengding", "", 1000)
        .expect("inbox");
    assert_eq!(inbox.cases.len(), cases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_callers_on_many_cases_finish_without_deadlock() {
    let (_dir, _clock, engine) = fresh_engine();
    many_callers_on_many_cases(&engine, 40).await;
}

/// With a cache of two cases for ten, nearly every step is on a case the
/// writer has forgotten, so callers read it ahead; with four callers on each
/// case, the case often changes, and is forgotten again, between a caller's
/// read and its step. A copy that is no longer the latest must not be used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_callers_on_many_cases_lose_no_update_with_a_small_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store opens"));
    let engine = Engine::open_with(
        store,
        &load(&[data()]).expect("loads"),
        Arc::new(ManualClock::new(t0())),
        govflow::engine::durable::EngineOptions { cache_cases: 2 },
    )
    .expect("engine opens");
    many_callers_on_many_cases(&engine, 10).await;
}

#[tokio::test]
async fn retries_get_the_first_answer_even_after_a_restart() {
    let (dir, clock, engine) = fresh_engine();
    engine.start(start_ledger("a")).await.expect("start");
    let first = engine.fire(note("a", "same")).await.expect("fire");
    // The city may not close a county's case.
    let closing = fire("a", "refused", "close", CITY, json!({"text": "进展"}));
    let refused = engine.fire(closing.clone()).await;
    assert!(
        matches!(&refused, Err(EngineError::Rejected(r)) if r.code == RejectCode::RoleNotAllowed)
    );
    engine.fire(note("a", "later")).await.expect("fire");
    engine.shutdown();
    drop(engine);
    let engine = open_engine(dir.path(), &clock);
    assert_eq!(engine.fire(note("a", "same")).await.expect("retry"), first);
    let again = engine.fire(closing).await;
    assert!(matches!(again, Err(EngineError::Rejected(r)) if r.code == RejectCode::RoleNotAllowed));
    assert_eq!(
        engine.case("a").expect("case").sequence,
        3,
        "retries appended nothing"
    );
    assert_eq!(
        engine
            .start(start_ledger("a"))
            .await
            .expect("retried start")
            .id,
        "a"
    );
    let reused = engine
        .fire(FireRequest {
            payload: obj(json!({"text": "不同"})),
            ..note("a", "same")
        })
        .await;
    assert!(matches!(reused, Err(EngineError::RequestIdReused(_))));
}

#[tokio::test]
async fn answers_from_before_each_of_several_restarts_are_all_kept() {
    // Request outcomes are stored per commit, under commit numbers that must
    // go on across restarts rather than start again (and overwrite).
    let (dir, clock, engine) = fresh_engine();
    let started = engine.start(start_ledger("a")).await.expect("start");
    let mut engine = engine;
    let mut first = Vec::new();
    for round in 0..3 {
        first.push(
            engine
                .fire(note("a", &format!("n-{round}")))
                .await
                .expect("fire"),
        );
        engine.shutdown();
        drop(engine);
        engine = open_engine(dir.path(), &clock);
    }
    assert_eq!(
        engine
            .start(start_ledger("a"))
            .await
            .expect("retried start"),
        started
    );
    for (round, answer) in first.iter().enumerate() {
        let retried = engine.fire(note("a", &format!("n-{round}"))).await;
        assert_eq!(&retried.expect("retry"), answer);
    }
    assert_eq!(
        engine.case("a").expect("case").sequence,
        4,
        "retries appended nothing"
    );
}

#[tokio::test]
async fn the_same_request_sent_many_times_at_once_makes_one_step_and_one_answer() {
    let (_dir, _clock, engine) = fresh_engine();
    engine.start(start_ledger("a")).await.expect("start");
    let answers: Vec<proto::Case> = fire_at_once(&engine, (0..16).map(|_| note("a", "twice")))
        .await
        .into_iter()
        .map(|a| a.expect("fire"))
        .collect();
    assert!(answers.iter().all(|a| *a == answers[0]));
    assert_eq!(engine.case("a").expect("case").sequence, 2);
}

#[tokio::test]
async fn a_running_case_stays_on_its_version_and_a_bad_deploy_changes_nothing() {
    let (_dir, _clock, engine) = fresh_engine();
    engine.start(start_ledger("old")).await.expect("start");
    let v1 = engine.case("old").expect("case").workflow_digest;
    // Version 2 drops the `note` transition.
    let source = std::fs::read_to_string(data().join("ledger.ron")).expect("read");
    let start = source
        .find("Transition(event: \"note\"")
        .expect("note transition");
    let end = source[start..]
        .find("Transition(event: \"close\"")
        .expect("close")
        + start;
    let v2_source = format!("{}{}", &source[..start], &source[end..]);
    // Saved by Notepad: a byte-order mark first, which is not part of the text.
    let deployed = engine
        .deploy(format!("\u{feff}{v2_source}"))
        .await
        .expect("deploy");
    assert_eq!((deployed.version, deployed.created), (2, true));
    let again = engine.deploy(v2_source).await.expect("deploy");
    assert_eq!((again.version, again.created), (2, false));
    engine
        .fire(note("old", "n-old"))
        .await
        .expect("the old case still has `note`");
    engine.start(start_ledger("new")).await.expect("start");
    assert_ne!(engine.case("new").expect("case").workflow_digest, v1);
    let refused = engine.fire(note("new", "n-new")).await;
    assert!(matches!(refused, Err(EngineError::Rejected(r)) if r.code == RejectCode::UnknownEvent));

    let broken = source.replace(
        "to: \"closed\", roles: [\"handler\"]",
        "to: \"clsoed\", roles: [\"handler\"]",
    );
    let versions = engine.workflow_versions().expect("versions");
    match engine.deploy(broken).await {
        Err(EngineError::Invalid(diagnostics)) => {
            assert!(diagnostics.iter().any(|d| d.code == "unknown-state"))
        }
        other => panic!("expected invalid, got {other:?}"),
    }
    assert_eq!(engine.workflow_versions().expect("versions"), versions);
    engine.start(start_ledger("newer")).await.expect("start");
    assert_eq!(engine.case("newer").expect("case").workflow_version, 2);
}

#[tokio::test]
async fn timers_fire_once_in_due_order_also_after_a_restart() {
    let (dir, clock, engine) = fresh_engine();
    for (i, id) in ["late", "early", "closed"].iter().enumerate() {
        clock.set(t0() + TimeDelta::hours(i as i64));
        engine
            .start(StartRequest {
                request_id: id.to_string(),
                ..start_ledger(id)
            })
            .await
            .expect("start");
    }
    // Started first but with a later deadline: re-entering `open` restarts it.
    clock.set(t0() + TimeDelta::hours(3));
    engine.fire(note("late", "push")).await.expect("note");
    // Leaving the state cancels the deadline: it must never fire.
    engine
        .fire(FireRequest {
            event: "close".into(),
            payload: Map::new(),
            ..note("closed", "close")
        })
        .await
        .expect("close");
    engine.shutdown();
    drop(engine);

    // The engine is down while everything comes due.
    clock.set(t0() + TimeDelta::days(30));
    let engine = open_engine(dir.path(), &clock);
    assert_eq!(
        engine.tick().await.expect("tick"),
        4,
        "two reminders and two expiries"
    );
    assert_eq!(engine.tick().await.expect("tick"), 0, "each fires once");
    assert_eq!(engine.case("early").expect("case").state, "escalated");
    assert_eq!(engine.case("late").expect("case").state, "escalated");
    let closed = engine.history("closed").expect("history");
    assert!(
        closed
            .iter()
            .all(|e| e.event != "escalate" && !e.event.starts_with("reminder")),
        "a cancelled deadline fired"
    );
    // In due order: had an expiry fired before its own reminder, leaving the
    // state would have cancelled the reminder and only two timers would fire.
    for id in ["early", "late"] {
        let events: Vec<String> = engine
            .history(id)
            .expect("history")
            .into_iter()
            .skip(1)
            .map(|e| e.event)
            .filter(|e| e != "note")
            .collect();
        assert_eq!(events, ["reminder:escalate", "escalate"], "{id}");
    }
}

#[tokio::test]
async fn children_start_and_settle_their_parent_in_the_same_commit() {
    let (_dir, _clock, engine) = fresh_engine();
    engine.start(start_batch("p", "p")).await.expect("start");
    let items = json!({"items": ["甲", "乙", "丙"]});
    let parent = engine
        .fire(fire("p", "d", "dispatch", CITY, items))
        .await
        .expect("dispatch");
    assert_eq!(parent.children.len(), 3);
    for i in 0..3 {
        let child = engine
            .case(&format!("p/{i}"))
            .expect("child started with its parent");
        assert_eq!(child.parent, "p");
    }
    for i in 0..3 {
        let child = format!("p/{i}");
        let finish = fire(&child, &format!("f{i}"), "finish", CITY, json!({}));
        engine.fire(finish).await.expect("finish");
    }
    let parent = engine.case("p").expect("parent");
    assert_eq!(
        (parent.state.as_str(), parent.outcome.as_str()),
        ("done", "done")
    );
    assert_eq!(
        engine
            .history("p")
            .expect("history")
            .iter()
            .filter(|e| e.event == "child-settled")
            .count(),
        3
    );
}

#[tokio::test]
async fn a_progress_report_keeps_the_running_deadline() {
    let (_dir, clock, engine) = fresh_engine();
    let started = engine.start(start_ledger("a")).await.expect("start");
    clock.set(t0() + TimeDelta::days(1));
    let reported = engine
        .fire(FireRequest {
            event: "report".into(),
            ..note("a", "report")
        })
        .await
        .expect("report");
    assert_eq!(
        reported.timers, started.timers,
        "the deadline was not restarted"
    );
    let entry = engine.history("a").expect("history").pop().expect("entry");
    assert!(entry.timers_set.is_empty() && entry.timers_cancelled.is_empty());
    // A note (without keep_deadline) re-enters the state and restarts it.
    let noted = engine.fire(note("a", "note")).await.expect("note");
    assert_ne!(noted.timers, started.timers);
}

#[tokio::test]
async fn a_cache_exactly_as_large_as_the_cases_in_use_reads_none_of_them_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(TestStore::open(dir.path()));
    let sources = load(&[data()]).expect("loads");
    let engine = Engine::open_with(
        store.clone(),
        &sources,
        Arc::new(ManualClock::new(t0())),
        govflow::engine::durable::EngineOptions { cache_cases: 4 },
    )
    .expect("engine opens");
    for c in 0..4 {
        engine
            .start(start_ledger(&format!("c{c}")))
            .await
            .expect("start");
    }
    let reads = || store.case_reads.load(Ordering::SeqCst);
    let after_starts = reads();
    for n in 0..20 {
        let id = format!("c{}", n % 4);
        engine
            .fire(note(&id, &format!("{id}-{n}")))
            .await
            .expect("fire");
    }
    assert_eq!(
        reads(),
        after_starts,
        "every fire found its case in the cache"
    );
}

/// Regression: a case whose record had grown over the store's limit step by
/// step (a list appended to each time) refused a small request with
/// `record-too-large`, "send less data", as if the request were at fault.
/// It is `case-too-large` now, naming what fills the case.
#[tokio::test]
async fn a_case_grown_too_large_refuses_a_small_step_and_says_why() {
    let (_dir, _clock, engine) = fresh_engine();
    engine
        .start(start_handled("grow", "g", COUNTY))
        .await
        .expect("start");
    let add = |n: usize| {
        engine.fire(fire(
            "g",
            &format!("add-{n}"),
            "add",
            COUNTY,
            json!({"text": "记".repeat(7_000)}),
        ))
    };
    // Each note is about 21 KB, and each step records the whole list it
    // changes: two fit, the third does not, though its own payload is well
    // under the limit.
    for n in 0..2 {
        add(n).await.expect("fits");
    }
    let refused = add(2).await;
    match refused {
        Err(EngineError::BadField {
            reason: "case-too-large",
            message,
            ..
        }) => {
            assert!(
                message.contains("case `g` has grown too large"),
                "{message}"
            );
            assert!(message.contains("`log`"), "{message}");
        }
        other => panic!("expected case-too-large, got {other:?}"),
    }
    engine
        .fire(fire("g", "finish", "finish", COUNTY, json!({})))
        .await
        .expect("a step that adds nothing is taken");
}

/// Regression: one request whose records were over the store's limit (a
/// 200 KB payload, or a rejection quoting a 200 KB event name) failed the
/// commit, and with it every later write of the engine.
#[tokio::test]
async fn a_request_too_large_to_store_is_refused_alone_and_the_engine_goes_on() {
    let (_dir, _clock, engine) = fresh_engine();
    engine.start(start_ledger("a")).await.expect("start");
    let before = snapshot(&engine);

    let huge = "长".repeat(70_000);
    let refused = engine
        .fire(fire(
            "a",
            "huge-note",
            "note",
            COUNTY,
            json!({"text": huge}),
        ))
        .await;
    match refused {
        Err(EngineError::BadField {
            reason: "record-too-large",
            message,
            ..
        }) => assert!(message.contains("over the limit"), "{message}"),
        other => panic!("expected record-too-large, got {other:?}"),
    }
    assert_eq!(
        snapshot(&engine),
        before,
        "nothing of the refused step was kept"
    );

    let event = "x".repeat(200_000);
    let first = engine
        .fire(fire("a", "huge-event", &event, COUNTY, json!({})))
        .await;
    let Err(EngineError::Rejected(r)) = &first else {
        panic!("expected a rejection, got {first:?}");
    };
    assert_eq!(r.code, RejectCode::UnknownEvent);
    assert!(
        r.message.len() <= 1024 + '…'.len_utf8(),
        "{}",
        r.message.len()
    );
    let retried = engine
        .fire(fire("a", "huge-event", &event, COUNTY, json!({})))
        .await;
    assert_eq!(
        format!("{retried:?}"),
        format!("{first:?}"),
        "a retry gets the same answer"
    );

    // Later requests are stored as usual.
    let after = engine
        .fire(note("a", "after"))
        .await
        .expect("the engine goes on");
    assert_eq!(after.sequence, 2);
    let source = std::fs::read_to_string(data().join("ledger.ron")).expect("read");
    let padded = format!("{source}\n// {}\n", "注".repeat(30_000));
    let versions = engine.workflow_versions().expect("versions");
    match engine.deploy(padded).await {
        Err(EngineError::BadField {
            field: "source",
            reason: "record-too-large",
            message,
        }) => assert!(message.contains("over the limit"), "{message}"),
        other => panic!("expected record-too-large, got {other:?}"),
    }
    assert_eq!(engine.workflow_versions().expect("versions"), versions);
    engine
        .fire(note("a", "still"))
        .await
        .expect("the engine goes on");
}

/// A workflow whose deadline step can never be stored: it triples a text
/// that is already over a third of the record limit.
const SWELL: &str = r#"Workflow(
    name: "swell",
    title: "膨胀",
    roles: [Role(name: "handler", title: "承办单位", binding: Given)],
    variables: [Variable(name: "text", type: String, default: "", given: true)],
    start: "open",
    states: [
        State(name: "open", title: "办理中",
            deadline: Deadline(within: Days(1), on_expiry: "expire"),
            transitions: [
                Transition(event: "expire", title: "逾期", to: "expired",
                    effects: [Set(var: "text", value: "vars.text + vars.text + vars.text")]),
            ]),
        State(name: "expired", title: "逾期", outcome: "expired"),
    ],
)"#;

/// Regression: timers whose steps are refused stayed first in due order, and
/// a tick looked only at the first 256 due, so 256 of them held back every
/// later deadline for good; and each was tried, and logged, at every tick.
#[tokio::test]
async fn refused_timers_wait_and_never_hold_back_later_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workflows = dir.path().join("workflows");
    std::fs::create_dir_all(&workflows).expect("mkdir");
    for file in ["agencies.ron", "ledger.ron"] {
        std::fs::copy(data().join(file), workflows.join(file)).expect("copy");
    }
    std::fs::write(workflows.join("swell.ron"), SWELL).expect("write");
    let clock = Arc::new(ManualClock::new(t0()));
    let store = Arc::new(TestStore::open(&dir.path().join("store")));
    let engine = Engine::open(
        store.clone(),
        &load(&[workflows]).expect("loads"),
        clock.clone(),
    )
    .expect("engine opens");
    let handed_out = || store.timers_handed_out.swap(0, Ordering::SeqCst);
    let text = "x".repeat(25_000);
    for i in 0..300 {
        engine
            .start(StartRequest {
                request_id: format!("start-swell-{i}"),
                case_id: format!("swell-{i:03}"),
                workflow: "swell".into(),
                agency: COUNTY.into(),
                bindings: [("handler".to_owned(), COUNTY.to_owned())].into(),
                variables: obj(json!({ "text": text })),
            })
            .await
            .expect("start swell");
    }
    // Due an hour after every swell timer.
    clock.set(t0() + TimeDelta::hours(1));
    engine.start(start_ledger("a")).await.expect("start ledger");

    clock.set(t0() + TimeDelta::days(4));
    assert_eq!(
        engine.tick().await.expect("tick"),
        2,
        "the ledger's reminder and expiry"
    );
    assert_eq!(engine.case("a").expect("a").state, "escalated");
    assert_eq!(engine.case("swell-000").expect("swell").state, "open");
    handed_out();
    // Refused ones wait a minute before they are tried again, then longer.
    clock.set(t0() + TimeDelta::days(4) + TimeDelta::seconds(30));
    assert_eq!(engine.tick().await.expect("tick"), 0);
    assert_eq!(handed_out(), 0, "none is tried while it waits");
    clock.set(t0() + TimeDelta::days(4) + TimeDelta::minutes(1));
    assert_eq!(engine.tick().await.expect("tick"), 0);
    assert!(
        handed_out() >= 300,
        "each is tried again once its wait is over"
    );
    clock.set(t0() + TimeDelta::days(4) + TimeDelta::minutes(2));
    assert_eq!(engine.tick().await.expect("tick"), 0);
    assert_eq!(handed_out(), 0, "the second wait is two minutes");
    assert_eq!(engine.history("swell-000").expect("history").len(), 1);
}

/// A storage failure stops every change and says why: a failed sync (as
/// from a full disk), and a panic inside the store (sled's apply, on the
/// applier thread), which used to end that thread with the batch's answers
/// (callers got "stopped", and the engine looked alive while it refused
/// everything). Regression: reads went on answering, and showed the step
/// whose commit had failed (sled held it in memory) until a restart undid
/// it; every read is now refused too, saying why.
#[tokio::test]
async fn a_storage_failure_stops_every_change_and_says_why() {
    type Switch = fn(&TestStore) -> &AtomicBool;
    let failures: [(Switch, &str); 2] = [
        (|store| &store.fail_syncs, "no space left on device"),
        (
            |store| &store.panic_on_apply,
            "panic in apply: a test's panic",
        ),
    ];
    for (switch, why) in failures {
        let (_dir, store, engine) = engine_on_test_store();
        engine.start(start_ledger("a")).await.expect("start");
        assert_eq!(engine.storage_failure(), None);
        switch(&store).store(true, Ordering::SeqCst);
        let refused = engine.fire(note("a", "n1")).await;
        assert!(
            matches!(refused, Err(EngineError::Store(_))),
            "{why}: {refused:?}"
        );
        let reason = engine.storage_failure().expect("the failure is known");
        assert!(reason.contains(why), "{reason}");
        // The disk is back, but what sled holds may differ from it: nothing
        // more is written until the engine is opened again.
        switch(&store).store(false, Ordering::SeqCst);
        let still = engine.fire(note("a", "n2")).await;
        assert!(
            matches!(still, Err(EngineError::Store(_))),
            "{why}: {still:?}"
        );
        for read in [
            engine.case("a").map(|_| ()),
            engine.history("a").map(|_| ()),
            engine.list(&CaseFilter::default(), "", 10).map(|_| ()),
        ] {
            let Err(EngineError::Store(e)) = read else {
                panic!("{why}: a read answered after storage failed: {read:?}");
            };
            assert!(
                e.to_string()
                    .contains("nothing is read until govflow is restarted"),
                "{e}"
            );
        }
    }
}

/// A bug that panics inside the engine used to end the writer thread: every
/// later request then found the engine stopped.
#[tokio::test]
async fn a_panic_on_one_request_fails_it_alone_and_the_engine_goes_on() {
    let (_dir, store, engine) = engine_on_test_store();
    engine.start(start_ledger("a")).await.expect("start");
    store.panic_on_due_timers.store(true, Ordering::SeqCst);
    let failed = engine.tick().await;
    assert!(
        matches!(&failed, Err(EngineError::Internal(m)) if m.contains("a test's panic")),
        "{failed:?}"
    );
    store.panic_on_due_timers.store(false, Ordering::SeqCst);
    let noted = engine
        .fire(note("a", "n1"))
        .await
        .expect("the engine goes on");
    assert_eq!(noted.sequence, 2);
    assert_eq!(engine.tick().await.expect("tick"), 0);
    assert_eq!(engine.storage_failure(), None);
}

/// A panic in the middle of a request's steps (here a child's step, when its
/// parent is read to tell it) undoes that request's steps whole: none of it
/// is stored, neither the case nor its history nor the event feed.
#[tokio::test]
async fn a_panic_inside_a_request_undoes_its_steps_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(TestStore::open(dir.path()));
    let sources = load(&[data()]).expect("loads");
    let clock = Arc::new(ManualClock::new(t0()));
    let open = || Engine::open(store.clone(), &sources, clock.clone()).expect("engine opens");
    let engine = open();
    engine.start(start_batch("p", "p")).await.expect("start");
    let items = json!({"items": ["甲", "乙"]});
    engine
        .fire(fire("p", "d", "dispatch", CITY, items))
        .await
        .expect("dispatch");
    engine.shutdown();
    drop(engine);
    // A new engine holds no case, so settling the child reads its parent.
    let engine = open();
    let feed_before = engine.feed(0, 1000).expect("feed").len();
    *store.panic_on_case.lock().expect("lock") = Some("p".into());
    let finish = fire("p/0", "f0", "finish", CITY, json!({}));
    let failed = engine.fire(finish.clone()).await;
    assert!(
        matches!(&failed, Err(EngineError::Internal(m)) if m.contains("a test's panic")),
        "{failed:?}"
    );
    assert_eq!(engine.case("p/0").expect("child").state, "open");
    assert_eq!(engine.history("p/0").expect("history").len(), 1);
    assert_eq!(engine.feed(0, 1000).expect("feed").len(), feed_before);
    *store.panic_on_case.lock().expect("lock") = None;
    let done = engine.fire(finish).await.expect("the retry is run afresh");
    assert_eq!(done.state, "done");
    assert_eq!(engine.feed(0, 1000).expect("feed").len(), feed_before + 2);
    assert_eq!(
        engine
            .history("p")
            .expect("history")
            .last()
            .expect("entry")
            .event,
        "child-settled"
    );
}

/// Starts `nest` case `root` and hands it down `depth` levels; the ids of
/// the chain, the root's first.
async fn nested_chain(engine: &Engine, root: &str, depth: usize) -> Vec<String> {
    engine
        .start(start_handled("nest", root, CITY))
        .await
        .expect("start");
    let mut ids = vec![root.to_owned()];
    for level in 0..depth {
        let handed = engine
            .fire(fire(
                ids.last().expect("an id"),
                &format!("h{level}"),
                "hand_down",
                CITY,
                json!({}),
            ))
            .await
            .expect("hand down");
        ids.push(handed.children.first().expect("a child").case_id.clone());
    }
    ids
}

/// When the deepest of a chain of nested cases settles, every level above
/// settles in the same request. The writer told each parent by recursion,
/// so a deep enough chain (300 levels in a debug build) overflowed its
/// stack and took the process down.
#[tokio::test]
async fn a_deep_chain_of_child_cases_settles_level_by_level_without_recursion() {
    let (_dir, _clock, engine) = fresh_engine();
    let depth = env_or("GOVFLOW_NEST_DEPTH", 500usize);
    let ids = nested_chain(&engine, "n", depth).await;
    let deepest = ids.last().expect("the deepest");
    let done = engine
        .fire(fire(deepest, "finish", "finish", CITY, json!({})))
        .await
        .expect("the deepest finishes");
    assert_eq!(done.state, "done");
    let root = engine.case("n").expect("root");
    assert_eq!(
        (root.state.as_str(), root.outcome.as_str()),
        ("done", "done")
    );
}

/// Regression: a case that settled while its children ran (a withdrawal)
/// left them running for ever in their agencies' inboxes, and no rule could
/// reach them. Each running child is now told (`parent-settled`, with the
/// parent's outcome), in the same request, level by level down a chain as
/// deep as one built up: without recursion, which a deep chain would
/// overflow.
#[tokio::test]
async fn a_settled_case_tells_its_running_children_level_by_level_down() {
    let (_dir, _clock, engine) = fresh_engine();
    let depth = env_or("GOVFLOW_NEST_DEPTH", 500usize);
    let ids = nested_chain(&engine, "w", depth).await;
    let withdrawn = engine
        .fire(fire("w", "withdraw", "withdraw", CITY, json!({})))
        .await
        .expect("the top level withdraws");
    assert_eq!(withdrawn.outcome, "withdrawn");
    for id in &ids {
        let case = engine.case(id).expect("case");
        assert_eq!(
            (case.state.as_str(), case.outcome.as_str()),
            ("withdrawn", "withdrawn"),
            "{id}"
        );
    }
    // The deepest's last step is the engine's, with the parent's outcome.
    let last = engine
        .history(ids.last().expect("deepest"))
        .expect("history")
        .pop()
        .expect("an entry");
    assert_eq!(last.event, "parent-settled");
    assert_eq!(
        records::from_struct(last.payload.as_ref())["outcome"],
        json!("withdrawn")
    );
    // The steps replay as stored: the outcome each child was told is in
    // its entry.
    let replayed = govflow::audit::replay_all(
        &govflow::audit::StoreSource(engine.store().as_ref()),
        &engine.library(),
        &govflow::audit::VerifyScope::All,
        None,
    )
    .expect("replays");
    assert!(replayed.matches(), "{:#?}", replayed.divergences);
    assert_eq!(replayed.cases, ids.len() as u64);
}

/// Regression: a chain of nested cases could be handed down until a child's
/// id was over the 1,024 bytes a request may name, and that child could then
/// never be read or moved. The spawn that would make it is refused.
#[tokio::test]
async fn a_child_whose_id_no_request_could_name_is_not_spawned() {
    let (_dir, _clock, engine) = fresh_engine();
    engine
        .start(start_handled("nest", "deep", CITY))
        .await
        .expect("start");
    let mut id = "deep".to_owned();
    let refused = loop {
        match engine
            .fire(fire(
                &id,
                &format!("h-{}", id.len()),
                "hand_down",
                CITY,
                json!({}),
            ))
            .await
        {
            Ok(handed) => id = handed.children.first().expect("a child").case_id.clone(),
            Err(e) => break e,
        }
    };
    assert!(id.len() <= 1024, "{}", id.len());
    assert!(id.len() > 1020, "{}", id.len());
    match refused {
        EngineError::Rejected(r) => {
            assert_eq!(r.code, RejectCode::EffectFailed);
            assert!(r.message.contains("over 1024 bytes"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
}

/// Regression: a workflow whose cases, told their parent settled, spawn more
/// of their kind ran on inside one request: a server grew to 15 GB and wrote
/// 14 GB in 38 s, every other request waiting. One request makes at most
/// 10,000 steps; a relative's step past them is not taken, and the caller's
/// own step stands.
#[tokio::test]
async fn one_request_sets_off_a_bounded_number_of_steps() {
    let (_dir, _clock, engine) = fresh_engine();
    engine
        .start(start_handled("relay_down", "r", CITY))
        .await
        .expect("start");
    engine
        .fire(fire("r", "r-fan", "fan", CITY, json!({})))
        .await
        .expect("fan");
    let withdrawn = engine
        .fire(fire("r", "r-withdraw", "withdraw", CITY, json!({})))
        .await
        .expect("the caller's step stands");
    assert_eq!(withdrawn.outcome, "done");
    let cases = engine.list(&CaseFilter::default(), "", 1000).expect("list");
    assert!(!cases.cases.is_empty());
    // The store holds the steps of that one request, at most 10,000.
    let mut total = 0;
    let mut token = String::new();
    loop {
        let page = engine
            .list(&CaseFilter::default(), &token, 1000)
            .expect("list");
        total += page.cases.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(total > 1000 && total <= 10_001, "{total} cases");
}

/// Regression: a case could spawn more children than its record had room
/// to record the outcomes of; past the room each child-settled step was
/// dropped, and a wait for all of them never ended. Such a spawn is refused.
#[tokio::test]
async fn a_case_never_spawns_more_children_than_it_can_record_the_outcomes_of() {
    let (_dir, _clock, engine) = fresh_engine();
    engine
        .start(start_batch("start-wide", "wide"))
        .await
        .expect("start");
    let items: Vec<String> = (0..3000).map(|i| format!("{i:04}")).collect();
    let refused = engine
        .fire(fire(
            "wide",
            "wide-dispatch",
            "dispatch",
            CITY,
            json!({"items": items}),
        ))
        .await
        .err()
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|| "accepted".to_owned());
    assert!(
        refused.contains("whose outcomes could not all be recorded"),
        "{}",
        &refused[..refused.len().min(300)]
    );
    assert!(refused.contains("EffectFailed"), "{refused:.300}");
    // A fan with room for its outcomes goes ahead.
    let items: Vec<String> = (0..500).map(|i| format!("{i:04}")).collect();
    engine
        .fire(fire(
            "wide",
            "wide-dispatch-2",
            "dispatch",
            CITY,
            json!({"items": items}),
        ))
        .await
        .expect("room enough");
}

/// Regression: the engine's step on a related case was held to the record
/// limit as part of the request that caused it: an agency that filled its
/// child case to the limit kept another agency's parent case from being
/// withdrawn, and the refusal named the child's variables and their sizes to
/// an agency that cannot see it. The parent's step stands; the related
/// case's step is not taken (and logged).
#[tokio::test]
async fn a_related_case_at_the_record_limit_never_holds_up_the_callers_step() {
    let (_dir, _clock, engine) = fresh_engine();
    let mut start = start_handled("holder", "h", CITY);
    start.bindings.insert("agent".to_owned(), COUNTY.to_owned());
    engine.start(start).await.expect("start");
    let delegated = engine
        .fire(fire("h", "h-delegate", "delegate", CITY, json!({})))
        .await
        .expect("delegate");
    let child = delegated.children.first().expect("a child").case_id.clone();
    // The agent fills its case until a note no longer fits: big notes, then
    // small ones, so that it ends within a few bytes of the limit.
    let mut n = 0;
    for size in [1_000, 10] {
        loop {
            n += 1;
            let note = json!({"text": "x".repeat(size)});
            match engine
                .fire(fire(&child, &format!("add-{n}"), "add", COUNTY, note))
                .await
            {
                Ok(_) => {}
                Err(EngineError::BadField {
                    reason: "case-too-large",
                    ..
                }) => break,
                Err(e) => panic!("add {n}: {e:?}"),
            }
        }
    }
    let before = engine.case(&child).expect("child");
    let withdrawn = engine
        .fire(fire("h", "h-withdraw", "withdraw", CITY, json!({})))
        .await
        .expect("the parent is withdrawn whatever its child holds");
    assert_eq!(withdrawn.outcome, "withdrawn");
    let after = engine.case(&child).expect("child");
    assert_eq!(
        (after.sequence, after.state.as_str()),
        (before.sequence, "open"),
        "the child's step, over the limit, is not taken"
    );
}

/// An expression as deep as the length limit allows is checked, and refused
/// or run, on the writer thread. Deep member chains (`vars.a.a.a…`) are what
/// recursion goes deepest on: with a thread's default stack, one 5,000 deep
/// aborted the process (a release build), and the limit still allows ~1,000.
#[tokio::test]
async fn an_expression_nested_as_deep_as_allowed_is_checked_and_run() {
    let (_dir, _clock, engine) = fresh_engine();
    let source = std::fs::read_to_string(data().join("ledger.ron")).expect("read");
    let with_guard = |guard: &str| {
        let deployed = source.replace(
            r#"effects: [Set(var: "notes", value: "vars.notes + 1")]),"#,
            &format!(
                r#"guard: "{guard}", effects: [Set(var: "notes", value: "vars.notes + 1")]),"#
            ),
        );
        assert_ne!(deployed, source);
        deployed
    };
    let chain = format!("vars{} == 1", ".a".repeat(995));
    match engine.deploy(with_guard(&chain)).await {
        Err(EngineError::Invalid(diagnostics)) => {
            assert!(
                diagnostics.iter().all(|d| d.code != "expr-too-long"),
                "{diagnostics:?}"
            )
        }
        other => panic!("expected the chain refused by the checker, got {other:?}"),
    }
    let negations = format!("{}true", "!".repeat(1994));
    engine
        .deploy(with_guard(&negations))
        .await
        .expect("deployed");
    engine.start(start_ledger("deep")).await.expect("start");
    let noted = engine
        .fire(note("deep", "n1"))
        .await
        .expect("the guard holds");
    assert_eq!(noted.sequence, 2);
}

/// Regression: a case could be started under an id of the form
/// `{parent}/{n}`, which is how spawned children are named; when `b` later
/// spawned its first child, `b/0`, the child was written over that case,
/// its history overwritten from the first entry. `/` is now kept for
/// children: a started case's id may not hold one.
#[tokio::test]
async fn a_started_case_cannot_take_a_childs_id() {
    let (_dir, _clock, engine) = fresh_engine();
    let refused = engine.start(start_ledger("b/0")).await;
    assert!(
        matches!(&refused, Err(EngineError::BadField { field: "case_id", message, .. }) if message.contains("`/`")),
        "{refused:?}"
    );
    engine.start(start_batch("b", "b")).await.expect("start");
    let items = json!({"items": ["x", "y"]});
    engine
        .fire(fire("b", "d", "dispatch", CITY, items))
        .await
        .expect("dispatch");
    let child = engine.case("b/0").expect("the child");
    assert_eq!(child.parent, "b");
    assert_eq!(engine.history("b/0").expect("history").len(), 1);
}

/// A store written before that rule may hold a started case under a
/// child's id: spawning that child is refused, and the case is untouched.
#[tokio::test]
async fn a_spawn_never_writes_a_child_over_a_case_of_its_id() {
    let (dir, clock, engine) = fresh_engine();
    engine.start(start_ledger("a")).await.expect("start");
    engine.fire(note("a", "n1")).await.expect("note");
    // What an older govflow let a department do: a case started as `b/0`.
    let store = engine.store();
    let mut legacy = store.case("a").expect("read").expect("present");
    legacy.id = "b/0".into();
    let mut entries = store.history("a", 0, usize::MAX).expect("history");
    for entry in &mut entries {
        entry.case_id = "b/0".into();
    }
    let commit = govflow::store::Commit {
        cases: vec![govflow::store::CaseWrite {
            before: None,
            after: Arc::new(legacy.clone()),
            entries: entries.clone(),
            index_before: Default::default(),
            index_after: Default::default(),
        }],
        ..Default::default()
    };
    store.apply_all(&[&commit]).expect("applied");
    store.write_out().expect("written out");
    store.sync().expect("synced");
    engine.shutdown();
    drop(engine);
    let engine = open_engine(dir.path(), &clock);

    engine.start(start_batch("b", "b")).await.expect("start");
    let items = json!({"items": ["x", "y"]});
    let refused = engine.fire(fire("b", "d", "dispatch", CITY, items)).await;
    assert!(
        matches!(&refused, Err(EngineError::Rejected(r))
            if r.code == RejectCode::EffectFailed && r.message.contains("`b/0`")),
        "{refused:?}"
    );
    assert_eq!(engine.case("b/0").expect("kept"), legacy);
    assert_eq!(engine.history("b/0").expect("kept"), entries);
    assert_eq!(engine.case("b").expect("parent").sequence, 1);
}

/// Regression: request ids were one namespace for every agency, so a
/// department system whose ids happened to match another's (`1`, `2`, …)
/// was refused as `request-id-reused`, and learnt which ids the other had
/// used. Each agency's ids are now its own, also after a restart.
#[tokio::test]
async fn two_agencies_may_use_the_same_request_id() {
    let (dir, clock, engine) = fresh_engine();
    let mut county = start_ledger("a");
    county.request_id = "1".into();
    let mut city = start_batch("1", "b");
    city.request_id = "1".into();
    let a = engine
        .start(county.clone())
        .await
        .expect("the county's start");
    let b = engine
        .start(city.clone())
        .await
        .expect("the city's start, id 1 too");
    let note = fire("a", "2", "note", COUNTY, json!({"text": "进展"}));
    let noted = engine.fire(note.clone()).await.expect("the county's note");
    let dispatch = fire("b", "2", "dispatch", CITY, json!({"items": ["x"]}));
    let dispatched = engine.fire(dispatch.clone()).await.expect("the city's 2");
    engine.shutdown();
    drop(engine);
    let engine = open_engine(dir.path(), &clock);
    assert_eq!(engine.start(county).await.expect("retry"), a);
    assert_eq!(engine.start(city).await.expect("retry"), b);
    assert_eq!(engine.fire(note).await.expect("retry"), noted);
    assert_eq!(engine.fire(dispatch).await.expect("retry"), dispatched);
    assert_eq!(engine.history("a").expect("history").len(), 2);
    assert_eq!(engine.history("b").expect("history").len(), 2);
    // Started without a case id, the same request id of two agencies
    // starts two cases (the id is derived from the agency's request).
    let mut county = start_ledger("");
    county.request_id = "3".into();
    let mut city = start_ledger("");
    city.request_id = "3".into();
    city.agency = CITY.into();
    city.bindings = [("handler".to_owned(), CITY.to_owned())].into();
    let first = engine.start(county.clone()).await.expect("the county's 3");
    let second = engine.start(city.clone()).await.expect("the city's 3");
    assert_ne!(first.id, second.id);
    assert_eq!(engine.start(county).await.expect("retry").id, first.id);
    assert_eq!(engine.start(city).await.expect("retry").id, second.id);
    // Within one agency, an id used for another request is still refused.
    let other = fire("a", "2", "note", COUNTY, json!({"text": "另一条"}));
    assert!(matches!(
        engine.fire(other).await,
        Err(EngineError::RequestIdReused(_))
    ));
}

/// Regression: the server's engine took each batch's time from the system
/// clock as it was, so when the clock was set back a little (an NTP step) a
/// case's next step was recorded before the one it follows. The server's
/// clock (`Monotonic`) holds over a step back of up to `CLOCK_HOLD`; a larger
/// one is a wrong clock being corrected, and is followed.
#[tokio::test]
async fn a_clock_set_back_a_little_never_makes_a_history_go_back_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Arc::new(ManualClock::new(t0()));
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store opens"));
    let clock = Arc::new(Monotonic::new(Arc::clone(&system)));
    let engine = Engine::open(store, &load(&[data()]).expect("loads"), clock).expect("opens");
    let times = |engine: &Engine| -> Vec<_> {
        engine
            .history("a")
            .expect("history")
            .iter()
            .map(|e| records::from_timestamp(e.time.as_ref()))
            .collect()
    };
    engine.start(start_ledger("a")).await.expect("start");
    system.set(t0() + TimeDelta::hours(1));
    engine.fire(note("a", "n1")).await.expect("note");
    system.set(t0() + TimeDelta::hours(1) - TimeDelta::minutes(5));
    engine.fire(note("a", "n2")).await.expect("note");
    assert_eq!(times(&engine)[2], t0() + TimeDelta::hours(1));
    // Corrected from a wrong time (an hour ahead): followed.
    system.set(t0());
    engine.fire(note("a", "n3")).await.expect("note");
    assert_eq!(times(&engine)[3], t0());
    // Set back a little while the server was down: it starts its clock no
    // earlier than the last step the store holds.
    engine.shutdown();
    drop(engine);
    system.set(t0() - TimeDelta::minutes(3));
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store reopens"));
    let clock = Arc::new(Monotonic::new(Arc::clone(&system)));
    let engine =
        Engine::open(store, &load(&[data()]).expect("loads"), clock.clone()).expect("reopens");
    let last = engine.last_step_time().expect("read").expect("a step");
    assert_eq!(last, t0());
    clock.raise_to(last);
    engine.fire(note("a", "n4")).await.expect("note");
    assert_eq!(times(&engine)[4], t0());
}

/// Regression: deadlines that expire as soon as they are set, in a loop (here
/// two states of `pause` = 0 hours), made one case take every tick's whole
/// budget (4,096 steps a tick, about 4,000 a second on a server), writing
/// history without end and holding back every other case's timers. A case
/// now takes at most 16 timer steps a tick; then its timer waits an hour.
#[tokio::test]
async fn deadlines_that_loop_without_time_passing_are_held_back() {
    let (_dir, clock, engine) = fresh_engine();
    engine
        .start(start_handled("relay", "relay", COUNTY))
        .await
        .expect("start");
    engine.tick().await.expect("tick");
    let after_first = engine.case("relay").expect("case").sequence;
    assert!(after_first <= 1 + 16, "{after_first} steps in one tick");
    engine.tick().await.expect("tick");
    clock.set(t0() + TimeDelta::minutes(59));
    engine.tick().await.expect("tick");
    assert_eq!(engine.case("relay").expect("case").sequence, after_first);
    // The case can still be moved by hand, and stopped.
    engine
        .fire(fire("relay", "stop", "stop", COUNTY, json!({})))
        .await
        .expect("stop");
    assert_eq!(engine.case("relay").expect("case").outcome, "stopped");
}

/// Regression: a workflow deployed over the API, and not in the workflows
/// folder, could start no new case once the server restarted ("no workflow
/// is loaded"): a deploy lasted until the next restart.
#[tokio::test]
async fn a_deployed_workflow_not_in_the_folder_stays_current_after_a_restart() {
    let (dir, clock, engine) = fresh_engine();
    let source = std::fs::read_to_string(data().join("ledger.ron")).expect("read");
    let renamed = source.replace("name: \"ledger\"", "name: \"ledger_two\"");
    assert_ne!(renamed, source);
    let deployed = engine.deploy(renamed).await.expect("deploy");
    assert_eq!((deployed.version, deployed.created), (1, true));
    let versions = engine.workflow_versions().expect("versions");
    engine.shutdown();
    drop(engine);
    let engine = open_engine(dir.path(), &clock);
    assert_eq!(engine.workflow_versions().expect("versions"), versions);
    engine
        .start(StartRequest {
            workflow: "ledger_two".into(),
            ..start_ledger("two")
        })
        .await
        .expect("a case starts on the deployed workflow after the restart");
    assert_eq!(engine.case("two").expect("case").workflow_version, 1);
}

/// Cases by deadline: those due before a time, soonest first, filtered and
/// paged like any list; a reminder is not a deadline, and a closed case has
/// none.
#[tokio::test]
async fn cases_are_listed_by_deadline_soonest_first() {
    let (_dir, clock, engine) = fresh_engine();
    // Started a day apart, latest first, so that id order is not due order.
    for (day, id) in [(0, "c"), (1, "b"), (2, "a"), (3, "z")] {
        clock.set(t0() + TimeDelta::days(day));
        engine.start(start_ledger(id)).await.expect("start");
    }
    engine
        .fire(fire("z", "close-z", "close", COUNTY, json!({})))
        .await
        .expect("close");
    let ids = |page: &govflow::store::Page| -> Vec<String> {
        page.cases.iter().map(|c| c.id.clone()).collect()
    };
    let timer = |id: &str, kind: proto::TimerKind| {
        let case = engine.case(id).expect("case");
        let timer = case
            .timers
            .iter()
            .find(|t| t.kind == kind as i32)
            .expect("timer")
            .clone();
        records::from_timestamp(timer.due_time.as_ref())
    };
    let deadline = |id: &str| timer(id, proto::TimerKind::Expiry);
    assert!(deadline("c") < deadline("b") && deadline("b") < deadline("a"));
    let everything = CaseFilter::default();
    let listed = engine
        .list_due(
            &everything,
            deadline("a") - TimeDelta::nanoseconds(1),
            "",
            50,
        )
        .expect("list");
    assert_eq!(ids(&listed), ["c", "b"], "due before, soonest first");
    // Regression: a deadline at the very time asked for was left out, so
    // `--due-before 2026-12-12` missed the cases due at the end of the 11th.
    let listed = engine
        .list_due(&everything, deadline("a"), "", 50)
        .expect("list");
    assert_eq!(ids(&listed), ["c", "b", "a"], "due at or before");
    // A reminder before the first deadline is no deadline.
    let reminder = timer("c", proto::TimerKind::Reminder);
    assert!(reminder < deadline("c"));
    let listed = engine
        .list_due(
            &everything,
            deadline("c") - TimeDelta::nanoseconds(1),
            "",
            50,
        )
        .expect("list");
    assert!(listed.cases.is_empty(), "{:?}", ids(&listed));
    let later = deadline("a") + TimeDelta::days(30);
    let listed = engine.list_due(&everything, later, "", 50).expect("list");
    assert_eq!(
        ids(&listed),
        ["c", "b", "a"],
        "a closed case has no deadline"
    );
    // Paged: each page goes on from the last one, without gaps or repeats.
    let first = engine.list_due(&everything, later, "", 2).expect("list");
    assert_eq!(ids(&first), ["c", "b"]);
    let rest = engine
        .list_due(&everything, later, &first.next_page_token, 2)
        .expect("list");
    assert_eq!(ids(&rest), ["a"]);
    assert!(rest.next_page_token.is_empty());
    // Filtered as any list.
    let theirs = CaseFilter {
        agency: Some(CITY.into()),
        state: Some("open".into()),
        workflow: Some("ledger".into()),
        ..Default::default()
    };
    let listed = engine.list_due(&theirs, later, "", 50).expect("list");
    assert_eq!(ids(&listed), ["c", "b", "a"]);
    let nobody = CaseFilter {
        agency: Some("hebei".into()),
        ..Default::default()
    };
    assert!(
        engine
            .list_due(&nobody, later, "", 50)
            .expect("list")
            .cases
            .is_empty()
    );
    assert!(matches!(
        engine.list_due(&everything, later, "not a token", 50),
        Err(EngineError::BadField {
            reason: "bad-page-token",
            ..
        })
    ));
}

/// One call reads a bounded number of timers: where the filter leaves most
/// out, a page ends early with a token, and going on finds every match.
#[tokio::test]
async fn a_deadline_listing_reads_a_bounded_number_of_timers_per_page() {
    let (_dir, _clock, engine) = fresh_engine();
    let mut started = Vec::new();
    for i in 0..2100 {
        let engine = engine.clone();
        started.push(tokio::spawn(async move {
            let id = format!("n{i:04}");
            engine.start(start_ledger(&id)).await.expect("start");
        }));
    }
    for task in started {
        task.await.expect("started");
    }
    // Reminders and deadlines of 2,100 cases: 4,200 timers, none of them
    // of a case the filter selects.
    let only = CaseFilter {
        workflow: Some("ledger".into()),
        state: Some("nowhere".into()),
        ..Default::default()
    };
    let later = t0() + TimeDelta::days(400);
    let first = engine.list_due(&only, later, "", 50).expect("list");
    assert!(first.cases.is_empty());
    assert!(!first.next_page_token.is_empty(), "the page ended early");
    let second = engine
        .list_due(&only, later, &first.next_page_token, 50)
        .expect("list");
    assert!(second.cases.is_empty());
    assert!(second.next_page_token.is_empty(), "and the rest was read");
    let all = engine
        .list_due(&CaseFilter::default(), later, "", 1000)
        .expect("list");
    assert_eq!(all.cases.len(), 1000);
}

/// Regression: a spawn whose child workflow is named at run time (so that
/// validation cannot check it) could set a variable the child keeps.
#[tokio::test]
async fn a_spawn_named_at_run_time_sets_only_given_variables_of_its_child() {
    const KEEPER: &str = r#"Workflow(
        name: "keeper",
        title: "子流程",
        roles: [Role(name: "handler", binding: Given)],
        variables: [
            Variable(name: "label", type: String, given: true),
            Variable(name: "approved", type: Boolean, default: false),
        ],
        start: "open",
        states: [
            State(name: "open", title: "办理", transitions: [
                Transition(event: "close", to: "done", roles: ["handler"]),
            ]),
            State(name: "done", title: "完成", outcome: "done"),
        ],
    )"#;
    let spawner = |variables: &str| {
        format!(
            r#"Workflow(
        name: "spawner",
        title: "父流程",
        roles: [Role(name: "handler", binding: Given)],
        start: "open",
        states: [
            State(name: "open", title: "办理", transitions: [
                Transition(event: "spawn", to: "waiting", roles: ["handler"],
                    spawn: Spawn(for_each: "[1]", workflow: "'kee' + 'per'",
                        variables: {{{variables}}}, bindings: {{"handler": Starter}})),
            ]),
            State(name: "waiting", title: "等待", children: AwaitChildren(wait: All, to: "done")),
            State(name: "done", title: "完成", outcome: "done"),
        ],
    )"#
        )
    };
    let (_dir, _clock, engine) = fresh_engine();
    engine.deploy(KEEPER.into()).await.expect("child deploys");
    engine
        .deploy(spawner(r#""label": "'x'", "approved": "true""#))
        .await
        .expect("deploys: the child is named at run time");
    engine
        .start(start_handled("spawner", "s", COUNTY))
        .await
        .expect("start");
    let refused = engine
        .fire(fire("s", "spawn-forged", "spawn", COUNTY, json!({})))
        .await;
    match refused {
        Err(EngineError::Rejected(r)) => {
            assert_eq!(r.code, RejectCode::EffectFailed);
            assert!(
                r.message.contains("child `s/0` cannot start")
                    && r.message
                        .contains("`approved` is kept by workflow `keeper`"),
                "{r}"
            );
        }
        other => panic!("a forged child variable was {other:?}"),
    }
    assert!(engine.case("s/0").is_err(), "no child was started");
    engine
        .deploy(spawner(r#""label": "'x'""#))
        .await
        .expect("deploys");
    engine
        .start(start_handled("spawner", "t", COUNTY))
        .await
        .expect("start");
    engine
        .fire(fire("t", "spawn", "spawn", COUNTY, json!({})))
        .await
        .expect("a spawn that sets only given variables");
    assert_eq!(engine.case("t/0").expect("child").workflow, "keeper");
}
