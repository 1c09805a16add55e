//! Auditing: hash-chain verification against on-disk tampering (with the
//! independent Python verifier agreeing), replay, time travel, export
//! filters and migration checks, on a store built by the durable engine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use prost::Message;
use serde_json::{Map, Value as Json, json};

use govflow::audit::{
    self, At, AuditError, AuditLibrary, BreakKind, ExportFilter, Finding, FindingKind,
    RecordSource, SledSource, StoreSource, VerifyScope,
};
use govflow::engine::durable::{Engine, FireRequest, ManualClock, StartRequest};
use govflow::lang::load::load;
use govflow::store::{SledStore, Store, proto, records};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/engine")
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").to_utc()
}

fn t0() -> DateTime<Utc> {
    at("2020-06-01T09:00:00+08:00")
}

fn obj(v: Json) -> Map<String, Json> {
    v.as_object().cloned().unwrap_or_default()
}

const COUNTY: &str = "hebei.sjz.zhengding";
const CITY: &str = "hebei.sjz";

fn start_ledger(id: &str) -> StartRequest {
    StartRequest {
        request_id: format!("start-{id}"),
        case_id: id.into(),
        workflow: "ledger".into(),
        agency: COUNTY.into(),
        bindings: [("handler".to_owned(), COUNTY.to_owned())].into(),
        variables: obj(json!({"enterprise": "石家庄某制造有限公司"})),
    }
}

fn fire(id: &str, request: &str, event: &str, agency: &str, payload: Json) -> FireRequest {
    FireRequest {
        request_id: request.into(),
        case_id: id.into(),
        event: event.into(),
        agency: agency.into(),
        payload: obj(payload),
        expected_sequence: None,
    }
}

/// The store every test starts from (built by the durable engine, then shut down):
///
/// * `a` (ledger v1): start at t0, notes at t0+1h, +2h, +3h, closed at t0+4h: 5 entries, closed.
/// * `b` (ledger v1): start at t0; its reminder and its deadline fire at t0+30d: 3
///   entries, `escalated`.
/// * ledger v2 (a title change) is deployed at t0+5h.
/// * `c` (ledger v2): start at t0+30d, a note at t0+30d+1h: 2 entries, `open`.
/// * `p` (batch): start at t0+6h, dispatch of two items (children `p/0`, `p/1`);
///   `p/0` finishes at t0+7h and `p` records it: 3 entries, `waiting`.
struct Built {
    dir: tempfile::TempDir,
}

impl Built {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn ledger_source() -> String {
    std::fs::read_to_string(data().join("ledger.ron")).expect("ledger source")
}

async fn build() -> Built {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(t0()));
    let sources = load(&[data()]).expect("loads");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store opens"));
    let engine = Engine::open(store, &sources, clock.clone()).expect("engine opens");
    let step = |h: i64| clock.set(t0() + TimeDelta::hours(h));

    engine.start(start_ledger("a")).await.expect("start a");
    engine.start(start_ledger("b")).await.expect("start b");
    for n in 1..=3 {
        step(n);
        engine
            .fire(fire(
                "a",
                &format!("a-note-{n}"),
                "note",
                COUNTY,
                json!({"text": format!("第{n}次进展")}),
            ))
            .await
            .expect("note");
    }
    step(4);
    engine
        .fire(fire("a", "a-close", "close", COUNTY, json!({})))
        .await
        .expect("close");
    step(5);
    let v2 = ledger_source().replace("title: \"台账\"", "title: \"台账（第二版）\"");
    assert!(engine.deploy(v2).await.expect("deploy").created);
    step(6);
    engine
        .start(StartRequest {
            request_id: "start-p".into(),
            case_id: "p".into(),
            workflow: "batch".into(),
            agency: CITY.into(),
            bindings: [("handler".to_owned(), CITY.to_owned())].into(),
            variables: Map::new(),
        })
        .await
        .expect("start p");
    engine
        .fire(fire(
            "p",
            "p-dispatch",
            "dispatch",
            CITY,
            json!({"items": ["x", "y"]}),
        ))
        .await
        .expect("dispatch");
    step(7);
    engine
        .fire(fire("p/0", "p0-finish", "finish", CITY, json!({})))
        .await
        .expect("finish");
    clock.set(t0() + TimeDelta::days(30));
    assert_eq!(
        engine.tick().await.expect("tick"),
        2,
        "b's reminder and deadline"
    );
    engine.start(start_ledger("c")).await.expect("start c");
    clock.set(t0() + TimeDelta::days(30) + TimeDelta::hours(1));
    engine
        .fire(fire(
            "c",
            "c-note",
            "note",
            COUNTY,
            json!({"text": "已联系企业"}),
        ))
        .await
        .expect("note c");
    assert_eq!(engine.case("b").expect("b").state, "escalated");
    assert_eq!(engine.case("p").expect("p").state, "waiting");
    engine.shutdown();
    drop(engine);
    Built { dir }
}

fn lengths() -> BTreeMap<&'static str, u64> {
    [
        ("a", 5),
        ("b", 3),
        ("c", 2),
        ("p", 3),
        ("p/0", 2),
        ("p/1", 1),
    ]
    .into()
}

fn total_entries() -> u64 {
    lengths().values().sum()
}

fn source(built: &Built) -> SledSource {
    SledSource::open(built.path()).expect("audit source opens")
}

fn library(source: &dyn RecordSource) -> AuditLibrary {
    AuditLibrary::load(&data(), source).expect("library")
}

// ───────────────────────────── tampering ─────────────────────────────

fn hkey(case: &str, seq: u64) -> Vec<u8> {
    let mut k = vec![b'H', 0];
    k.extend_from_slice(case.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn ckey(case: &str) -> Vec<u8> {
    let mut k = vec![b'C', 0];
    k.extend_from_slice(case.as_bytes());
    k
}

/// Opens the shut-down store's folder with sled directly and lets `f` change it.
fn tamper(built: &Built, f: impl FnOnce(&sled::Db)) {
    let db = loop {
        match sled::open(built.path()) {
            Ok(db) => break db,
            // The engine's sled may still be closing its files.
            Err(sled::Error::Io(e)) if e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("open for tampering: {e}"),
        }
    };
    f(&db);
    db.flush().expect("flush");
}

fn stored_entry(db: &sled::Db, case: &str, seq: u64) -> proto::HistoryEntry {
    let bytes = db.get(hkey(case, seq)).expect("get").expect("present");
    proto::HistoryEntry::decode(&*bytes).expect("decodes")
}

/// Flips one bit of the first byte of `needle` in the entry's stored bytes.
fn flip_in(db: &sled::Db, case: &str, seq: u64, needle: &[u8]) {
    let mut bytes = db
        .get(hkey(case, seq))
        .expect("get")
        .expect("present")
        .to_vec();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in the record");
    bytes[at] ^= 0x01;
    db.insert(hkey(case, seq), bytes).expect("insert");
}

/// A forged entry at `seq`: plausible content, its own hash recomputed,
/// chained to the wrong entry.
fn forge(db: &sled::Db, case: &str, seq: u64, template: u64) {
    let mut e = stored_entry(db, case, template);
    e.sequence = seq;
    e.request_id = "forged".into();
    e.payload = Some(records::to_struct(&obj(json!({"text": "伪造的进展"}))));
    e.previous_hash = vec![0x42; 32];
    e.hash = records::entry_hash(&e).to_vec();
    db.insert(hkey(case, seq), e.encode_to_vec())
        .expect("insert");
}

/// The findings as a set; each problem is reported once.
fn findings(report: &audit::VerifyReport) -> BTreeSet<(String, Option<u64>, FindingKind)> {
    let set: BTreeSet<_> = report
        .findings
        .iter()
        .map(|f: &Finding| (f.case_id.clone(), f.sequence, f.kind))
        .collect();
    assert_eq!(
        set.len(),
        report.findings.len(),
        "reported twice: {:#?}",
        report.findings
    );
    set
}

fn set(items: &[(&str, Option<u64>, FindingKind)]) -> BTreeSet<(String, Option<u64>, FindingKind)> {
    items
        .iter()
        .map(|(c, s, k)| ((*c).to_owned(), *s, *k))
        .collect()
}

/// Exports everything to a file; returns its path and the summary.
fn export_all(source: &dyn RecordSource, dir: &Path) -> (PathBuf, audit::ExportSummary) {
    let path = dir.join("export.jsonl");
    let mut file = std::fs::File::create(&path).expect("create export");
    let summary = audit::export(source, &ExportFilter::default(), &mut file).expect("export");
    (path, summary)
}

/// Runs tools/verify_export.py; `None` (with a message) when python3 is absent.
fn python_verify(export: &Path, extra: &[&str]) -> Option<(i32, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/verify_export.py");
    let output = match Command::new("python3")
        .arg(script)
        .args(extra)
        .arg(export)
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED the Python verifier: python3 is not installed");
            return None;
        }
        Err(e) => panic!("running python3: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some((output.status.code().unwrap_or(-1), text))
}

/// The Python verifier fails, and names each `(case, sequence, kind)`.
fn python_agrees(source: &dyn RecordSource, scratch: &Path, expected: &[(&str, u64, &str)]) {
    let (export, _) = export_all(source, scratch);
    let Some((code, text)) = python_verify(&export, &["--quiet"]) else {
        return;
    };

    assert_eq!(code, 1, "the Python verifier must fail:\n{text}");
    let bad: Vec<&str> = text.lines().filter(|l| l.starts_with("BAD")).collect();
    for (case, seq, kind) in expected {
        let name = format!("case {case} sequence {seq} ");
        assert!(
            bad.iter()
                .any(|l| l.contains(&name) && l.contains(&format!(": {kind}:"))),
            "the Python verifier does not name {case}@{seq} as {kind}:\n{text}"
        );
    }
    assert_eq!(
        bad.len(),
        expected.len(),
        "exactly the tampered entries:\n{text}"
    );
}

#[tokio::test]
async fn an_untampered_store_verifies_clean_and_so_does_its_export() {
    let built = build().await;
    let src = source(&built);
    let seen = std::sync::Mutex::new(Vec::new());
    let report = audit::verify(
        &src,
        &VerifyScope::All,
        Some(&|p: audit::Progress| seen.lock().expect("lock").push(p)),
    )
    .expect("verify");
    assert!(report.is_clean(), "{:#?}", report.findings);
    assert_eq!(report.cases, 6);
    assert_eq!(report.entries, total_entries());
    let last = *seen
        .lock()
        .expect("lock")
        .last()
        .expect("progress reported");
    assert_eq!((last.cases_done, last.cases_total), (6, 6));
    assert_eq!(last.entries_checked, total_entries());

    // Scopes.
    let ledger =
        audit::verify(&src, &VerifyScope::Workflow("ledger".into()), None).expect("verify");
    assert_eq!((ledger.cases, ledger.entries), (3, 10));
    let one = audit::verify(&src, &VerifyScope::Case("p/0".into()), None).expect("verify");
    assert_eq!((one.cases, one.entries), (1, 2));
    assert!(matches!(
        audit::verify(&src, &VerifyScope::Case("nope".into()), None),
        Err(AuditError::NotFound(_))
    ));

    let scratch = tempfile::tempdir().expect("tempdir");
    let (export, summary) = export_all(&src, scratch.path());
    assert_eq!(summary.entries, total_entries());
    assert!(summary.skipped.is_empty());
    if let Some((code, text)) = python_verify(&export, &[]) {
        assert_eq!(code, 0, "{text}");
        assert!(
            text.contains(&format!(
                "all {} entries in 6 cases verified",
                total_entries()
            )),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_flipped_byte_is_named_whether_or_not_the_record_still_decodes() {
    let built = build().await;
    tamper(&built, |db| {
        // `note` becomes `oote`: still a valid record, with the wrong hash.
        flip_in(db, "a", 3, b"note");
        // The first byte is a field tag: flipped, the record no longer decodes.
        for (case, seq) in [("c", 1), ("p", 2)] {
            let mut bytes = db
                .get(hkey(case, seq))
                .expect("get")
                .expect("present")
                .to_vec();
            bytes[0] = 0xff;
            db.insert(hkey(case, seq), bytes).expect("insert");
        }
    });
    let src = source(&built);
    let report = audit::verify(&src, &VerifyScope::All, None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[
            ("a", Some(3), FindingKind::Altered),
            ("c", Some(1), FindingKind::Undecodable),
            ("p", Some(2), FindingKind::Undecodable),
        ]),
        "{:#?}",
        report.findings
    );
    assert_eq!(
        report.entries,
        total_entries(),
        "an undecodable record stops nothing"
    );
    // Undecodable records cannot be exported: the Python verifier sees them missing.
    let scratch = tempfile::tempdir().expect("tempdir");
    let (_, summary) = export_all(&src, scratch.path());
    let skipped: Vec<(&str, Option<u64>)> = summary
        .skipped
        .iter()
        .map(|s| (s.case_id.as_str(), s.sequence))
        .collect();
    assert_eq!(skipped, [("c", Some(1)), ("p", Some(2))]);
    python_agrees(
        &src,
        scratch.path(),
        &[
            ("a", 3, "altered"),
            ("c", 1, "missing"),
            ("p", 2, "missing"),
        ],
    );
    // Replay stops at the altered entry, and at the undecodable one.
    let lib = library(&src);
    let replayed = audit::replay_case(&src, &lib.library, "a").expect("replay");
    let stop = replayed.divergence.expect("diverges");
    assert_eq!(stop.sequence, 3, "{}", stop.reason);
    assert_eq!(replayed.steps.len(), 2);
    let replayed = audit::replay_case(&src, &lib.library, "p").expect("replay");
    let stop = replayed.divergence.expect("diverges");
    assert_eq!(stop.sequence, 2, "{}", stop.reason);
    assert!(stop.reason.contains("does not decode"), "{}", stop.reason);
    assert_eq!(replayed.steps.len(), 1);
    drop(src);

    // Through the `Store` trait, which fails a whole history on one bad
    // record, the same are found; the entries before a bad one cannot be
    // read that way, and are reported so.
    let store = SledStore::open(built.path()).expect("open");
    let report = audit::verify(&StoreSource(&store), &VerifyScope::All, None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[
            ("a", Some(3), FindingKind::Altered),
            ("c", Some(1), FindingKind::Undecodable),
            ("p", None, FindingKind::Undecodable),
            ("p", Some(2), FindingKind::Undecodable),
        ]),
        "{:#?}",
        report.findings
    );
}

#[tokio::test]
async fn a_deleted_entry_is_named_in_the_middle_and_at_the_end() {
    let built = build().await;
    tamper(&built, |db| {
        db.remove(hkey("b", 2)).expect("remove");
    });
    let src = source(&built);
    let report = audit::verify(&src, &VerifyScope::All, None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[("b", Some(2), FindingKind::Missing)]),
        "{:#?}",
        report.findings
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    python_agrees(&src, scratch.path(), &[("b", 2, "missing")]);
    drop(src);

    // Removed from the end: only the case record's head_hash shows it (an
    // export has no case records, so this one is the store verifier's alone).
    tamper(&built, |db| {
        db.remove(hkey("a", 5)).expect("remove");
    });
    let src = source(&built);
    let report = audit::verify(&src, &VerifyScope::Case("a".into()), None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[("a", Some(5), FindingKind::Missing)]),
        "{:#?}",
        report.findings
    );
    assert!(report.findings[0].detail.contains("removed from the end"));
}

#[tokio::test]
async fn swapped_entries_are_named_as_reordered() {
    let built = build().await;
    tamper(&built, |db| {
        let two = db.get(hkey("p", 2)).expect("get").expect("present");
        let three = db.get(hkey("p", 3)).expect("get").expect("present");
        db.insert(hkey("p", 2), three).expect("insert");
        db.insert(hkey("p", 3), two).expect("insert");
    });
    let src = source(&built);
    let report = audit::verify(&src, &VerifyScope::All, None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[
            ("p", Some(2), FindingKind::Reordered),
            ("p", Some(3), FindingKind::Reordered),
        ]),
        "{:#?}",
        report.findings
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    python_agrees(
        &src,
        scratch.path(),
        &[("p", 2, "reordered"), ("p", 3, "reordered")],
    );
    drop(src);

    // Through the `Store` trait (no keys visible) the swap is still found.
    let store = SledStore::open(built.path()).expect("open");
    let report = audit::verify(&StoreSource(&store), &VerifyScope::All, None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[
            ("p", Some(2), FindingKind::Reordered),
            ("p", Some(3), FindingKind::Reordered),
        ]),
        "{:#?}",
        report.findings
    );
}

#[tokio::test]
async fn a_forged_entry_is_named_in_the_middle_and_beyond_the_head() {
    let built = build().await;
    tamper(&built, |db| {
        forge(db, "a", 3, 3);
        forge(db, "c", 3, 2);
    });
    let src = source(&built);
    let report = audit::verify(&src, &VerifyScope::All, None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[
            ("a", Some(3), FindingKind::Forged),
            ("c", Some(3), FindingKind::Forged),
        ]),
        "{:#?}",
        report.findings
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    python_agrees(
        &src,
        scratch.path(),
        &[("a", 3, "forged"), ("c", 3, "forged")],
    );
}

#[tokio::test]
async fn every_problem_is_reported_in_one_pass() {
    let built = build().await;
    tamper(&built, |db| {
        flip_in(db, "a", 2, b"note");
        db.remove(hkey("b", 2)).expect("remove");
        let two = db.get(hkey("p", 2)).expect("get").expect("present");
        let three = db.get(hkey("p", 3)).expect("get").expect("present");
        db.insert(hkey("p", 2), three).expect("insert");
        db.insert(hkey("p", 3), two).expect("insert");
        forge(db, "c", 2, 2);
        db.insert(hkey("p/1", 1), b"\xff\xff\xff".to_vec())
            .expect("insert");
        // A case record that no longer decodes, and one that is gone.
        db.insert(ckey("p/0"), b"\xff".to_vec()).expect("insert");
        db.remove(ckey("a")).expect("remove");
    });
    let src = source(&built);
    let report = audit::verify(&src, &VerifyScope::All, None).expect("verify");
    assert_eq!(
        findings(&report),
        set(&[
            ("a", None, FindingKind::CaseRecord),
            ("a", Some(2), FindingKind::Altered),
            ("b", Some(2), FindingKind::Missing),
            ("c", Some(2), FindingKind::Forged),
            ("p", Some(2), FindingKind::Reordered),
            ("p", Some(3), FindingKind::Reordered),
            ("p/0", None, FindingKind::CaseRecord),
            ("p/1", Some(1), FindingKind::Undecodable),
        ]),
        "{:#?}",
        report.findings
    );
    // Each finding says what it is about.
    for f in &report.findings {
        assert!(
            f.to_string().starts_with(&format!("case {}", f.case_id)),
            "{f}"
        );
    }
}

#[test]
fn parallel_verification_covers_every_chunk_and_its_boundaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = 1_100;
    {
        let store = SledStore::open(dir.path()).expect("open");
        let written = audit::bench::fill_synthetic(&store, cases, 3).expect("fill");
        assert_eq!(written, 3 * cases as u64);
    }
    let id = |n: usize| format!("bench-{n:08}");
    let built = Built { dir };
    tamper(&built, |db| {
        flip_in(db, &id(0), 2, b"note");
        // A case on a chunk boundary loses its record: its history is still found.
        db.remove(ckey(&id(256))).expect("remove");
        db.remove(hkey(&id(511), 3)).expect("remove");
        db.remove(hkey(&id(512), 2)).expect("remove");
        forge(db, &id(1_099), 3, 3);
    });
    let src = source(&built);
    let last = std::sync::Mutex::new(audit::Progress::default());
    let report = audit::verify(
        &src,
        &VerifyScope::All,
        Some(&|p: audit::Progress| {
            let mut last = last.lock().expect("lock");
            if p.entries_checked > last.entries_checked {
                *last = p;
            }
        }),
    )
    .expect("verify");
    let (zero, boundary, end, middle, forged) = (id(0), id(256), id(511), id(512), id(1_099));
    assert_eq!(
        findings(&report),
        set(&[
            (&zero, Some(2), FindingKind::Altered),
            (&boundary, None, FindingKind::CaseRecord),
            (&end, Some(3), FindingKind::Missing),
            (&middle, Some(2), FindingKind::Missing),
            (&forged, Some(3), FindingKind::Forged),
        ]),
        "{:#?}",
        report.findings
    );
    assert_eq!(report.cases, cases as u64);
    assert_eq!(report.entries, 3 * cases as u64 - 2);
    let last = *last.lock().expect("lock");
    assert_eq!(last.entries_checked, report.entries);
    assert_eq!(last.cases_total, cases as u64 - 1, "cases with a record");

    let bench = audit::verify(&src, &VerifyScope::Workflow("bench".into()), None).expect("verify");
    assert_eq!(bench.cases, cases as u64);
    let none = audit::verify(&src, &VerifyScope::Workflow("ledger".into()), None).expect("verify");
    assert_eq!((none.cases, none.entries), (0, 0));
    assert!(none.is_clean(), "{:#?}", none.findings);
}

// ───────────────────────────── replay and time travel ─────────────────────────────

#[tokio::test]
async fn every_case_replays_exactly_as_stored() {
    let built = build().await;
    let src = source(&built);
    let lib = library(&src);
    for (id, len) in lengths() {
        let report = audit::replay_case(&src, &lib.library, id).expect("replay");
        assert!(report.matches(), "{id}: {:?}", report.divergence);
        assert_eq!(report.steps.len() as u64, len, "{id}");
        let store_history: Vec<proto::HistoryEntry> = {
            let mut out = Vec::new();
            src.visit_history(id, &mut |raw| {
                out.push(raw.entry.expect("decodes").clone());
                std::ops::ControlFlow::Continue(())
            })
            .expect("history");
            out
        };
        for (step, stored) in report.steps.iter().zip(&store_history) {
            assert_eq!(step.sequence, stored.sequence);
            assert_eq!(step.event, stored.event);
            assert_eq!(step.to_state, stored.to_state);
            assert_eq!(step.request_id, stored.request_id);
            assert_eq!(step.time, records::from_timestamp(stored.time.as_ref()));
        }
    }
    // Versions: b runs on v1, c on v2 (deployed while the engine ran).
    assert_eq!(
        audit::replay_case(&src, &lib.library, "b")
            .expect("b")
            .workflow_version,
        1
    );
    assert_eq!(
        audit::replay_case(&src, &lib.library, "c")
            .expect("c")
            .workflow_version,
        2
    );
    // Who did what: b's last two steps were its timers.
    let b = audit::replay_case(&src, &lib.library, "b").expect("b");
    assert_eq!(b.steps[1].event, "reminder:escalate");
    assert_eq!(b.steps[2].actor_kind, "timer");
    assert_eq!(
        (b.steps[2].from_state.as_str(), b.steps[2].to_state.as_str()),
        ("open", "escalated")
    );
    // The parent recorded its child settling.
    let p = audit::replay_case(&src, &lib.library, "p").expect("p");
    assert_eq!(p.steps[2].actor_kind, "engine");
    assert_eq!(
        p.steps[2].payload,
        json!({"child": "p/0", "outcome": "done"})
    );
    assert!(matches!(
        audit::replay_case(&src, &lib.library, "nope"),
        Err(AuditError::NotFound(_))
    ));
}

#[tokio::test]
async fn time_travel_by_sequence_and_by_moment() {
    let built = build().await;
    let src = source(&built);
    let lib = &library(&src).library;
    let case_at = |id: &str, when: At| audit::case_at(&src, lib, id, when);

    let first = case_at("a", At::Sequence(1)).expect("a@1");
    assert_eq!(first.state, "open");
    assert_eq!(first.variables["notes"], json!(0));
    assert_eq!(first.bindings["supervisor"], CITY);
    assert_eq!(first.timers.len(), 2, "deadline and reminder set");
    let third = case_at("a", At::Sequence(3)).expect("a@3");
    assert_eq!(
        (third.state.as_str(), third.variables["notes"].clone()),
        ("open", json!(2))
    );
    assert_eq!(third.step.event, "note");
    let last = case_at("a", At::Sequence(5)).expect("a@5");
    assert_eq!(
        (last.state.as_str(), last.outcome.as_deref()),
        ("closed", Some("closed"))
    );

    // A moment selects the last step at or before it.
    let moment = case_at("a", At::Time(t0() + TimeDelta::minutes(150))).expect("a@2h30");
    assert_eq!(moment.sequence, 3);
    let exact = case_at("a", At::Time(t0() + TimeDelta::hours(4))).expect("a@4h");
    assert_eq!(exact.sequence, 5);
    let b_before = case_at("b", At::Time(t0() + TimeDelta::days(29))).expect("b@29d");
    assert_eq!((b_before.sequence, b_before.state.as_str()), (1, "open"));
    let b_after = case_at("b", At::Time(t0() + TimeDelta::days(31))).expect("b@31d");
    assert_eq!((b_after.sequence, b_after.state.as_str()), (3, "escalated"));
    assert_eq!(b_after.bindings["supervisor"], CITY);

    assert!(matches!(
        case_at("a", At::Sequence(6)),
        Err(AuditError::OutOfRange { .. })
    ));
    assert!(matches!(
        case_at("a", At::Sequence(0)),
        Err(AuditError::OutOfRange { .. })
    ));
    assert!(matches!(
        case_at("a", At::Time(t0() - TimeDelta::hours(1))),
        Err(AuditError::OutOfRange { .. })
    ));
}

// ───────────────────────────── export ─────────────────────────────

fn export_with(source: &dyn RecordSource, filter: ExportFilter) -> Vec<Json> {
    let mut out = Vec::new();
    audit::export(source, &filter, &mut out).expect("export");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn cases_of(lines: &[Json]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| l["case_id"].as_str().expect("case_id").to_owned())
        .collect()
}

fn names(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn export_lines_are_the_entries_and_filters_select_them() {
    let built = build().await;
    let src = source(&built);

    // Unfiltered: every entry, in case and sequence order, byte for byte entry_json.
    let mut out = Vec::new();
    let summary = audit::export(&src, &ExportFilter::default(), &mut out).expect("export");
    assert_eq!((summary.cases, summary.entries), (6, total_entries()));
    let text = String::from_utf8(out).expect("utf-8");
    let mut expected = String::new();
    for id in lengths().keys() {
        src.visit_history(id, &mut |raw| {
            let e = raw.entry.expect("decodes");
            expected.push_str(&serde_json::to_string(&records::entry_json(e)).expect("json"));
            expected.push('\n');
            std::ops::ControlFlow::Continue(())
        })
        .expect("history");
    }
    assert_eq!(text, expected);
    assert!(
        text.contains("石家庄某制造有限公司"),
        "UTF-8, not \\u escapes"
    );

    let by = |filter: ExportFilter| cases_of(&export_with(&src, filter));
    assert_eq!(
        by(ExportFilter {
            workflow: Some("item".into()),
            ..Default::default()
        }),
        names(&["p/0", "p/1"])
    );
    assert_eq!(
        by(ExportFilter {
            state: Some("escalated".into()),
            ..Default::default()
        }),
        names(&["b"])
    );
    assert_eq!(
        by(ExportFilter {
            agency: Some(COUNTY.into()),
            ..Default::default()
        }),
        names(&["a", "b", "c"])
    );
    assert_eq!(
        by(ExportFilter {
            agency: Some(CITY.into()),
            workflow: Some("batch".into()),
            ..Default::default()
        }),
        names(&["p"])
    );
    assert!(
        by(ExportFilter {
            agency: Some("hebei".into()),
            ..Default::default()
        })
        .is_empty()
    );
    assert_eq!(
        export_with(
            &src,
            ExportFilter {
                case: Some("p/0".into()),
                ..Default::default()
            }
        )
        .len(),
        2
    );

    // Time range: [since, until) on the entry's time.
    let window = export_with(
        &src,
        ExportFilter {
            since: Some(t0() + TimeDelta::hours(1)),
            until: Some(t0() + TimeDelta::hours(3)),
            ..Default::default()
        },
    );
    let picked: Vec<(String, u64)> = window
        .iter()
        .map(|l| {
            (
                l["case_id"].as_str().unwrap_or_default().to_owned(),
                l["sequence"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(picked, [("a".to_owned(), 2), ("a".to_owned(), 3)]);

    // A time-filtered export checks out with --partial.
    let scratch = tempfile::tempdir().expect("tempdir");
    let path = scratch.path().join("window.jsonl");
    let mut file = std::fs::File::create(&path).expect("create");
    audit::export(
        &src,
        &ExportFilter {
            since: Some(t0() + TimeDelta::hours(2)),
            ..Default::default()
        },
        &mut file,
    )
    .expect("export");
    if let Some((code, text)) = python_verify(&path, &["--partial"]) {
        assert_eq!(code, 0, "{text}");
    }
    if let Some((code, text)) = python_verify(&path, &[]) {
        assert_eq!(code, 1, "without --partial a chain must start at 1: {text}");
    }
}

// ───────────────────────────── migration check ─────────────────────────────

#[tokio::test]
async fn a_migration_check_names_the_cases_an_edit_would_break() {
    let built = build().await;
    let src = source(&built);
    let lib = library(&src);
    let v1 = ledger_source();

    // A title change breaks nothing.
    let retitled = v1.replace("title: \"台账\"", "title: \"企业问题台账\"");
    let report =
        audit::migration_check(&src, &lib, Path::new("ledger.ron"), &retitled).expect("check");
    assert_eq!(report.workflow, "ledger");
    assert_eq!(report.running, 2, "b and c run; a is closed");
    assert!(report.is_compatible(), "{:#?}", report.breaking);

    // Renaming the state b is in: b's escalation would now lead elsewhere.
    let renamed = v1
        .replace("name: \"escalated\"", "name: \"supervised\"")
        .replace("to: \"escalated\"", "to: \"supervised\"");
    let report =
        audit::migration_check(&src, &lib, Path::new("ledger.ron"), &renamed).expect("check");
    let broken: Vec<(&str, u64, BreakKind)> = report
        .breaking
        .iter()
        .map(|b| (b.case_id.as_str(), b.sequence, b.kind))
        .collect();
    assert_eq!(
        broken,
        [("b", 3, BreakKind::History)],
        "{:#?}",
        report.breaking
    );
    assert!(
        report.breaking[0].reason.contains("to state"),
        "{}",
        report.breaking[0].reason
    );

    // Removing a transition c has taken: its history no longer replays.
    let no_note = v1.replace(
        "                Transition(event: \"note\", title: \"记录进展\", to: \"open\", roles: [\"handler\", \"supervisor\"],\n                    payload: [Field(name: \"text\", type: String)],\n                    effects: [Set(var: \"notes\", value: \"vars.notes + 1\")]),\n",
        "",
    );
    assert_ne!(no_note, v1);
    let report =
        audit::migration_check(&src, &lib, Path::new("ledger.ron"), &no_note).expect("check");
    let broken: Vec<(&str, u64, BreakKind)> = report
        .breaking
        .iter()
        .map(|b| (b.case_id.as_str(), b.sequence, b.kind))
        .collect();
    assert_eq!(
        broken,
        [("c", 2, BreakKind::History)],
        "{:#?}",
        report.breaking
    );

    // Removing a transition nobody has taken yet, out of the state c is in.
    let no_report = v1.replace(
        "                Transition(event: \"report\", title: \"报告进展（不延期）\", to: \"open\", roles: [\"handler\"],\n                    payload: [Field(name: \"text\", type: String)], keep_deadline: true),\n",
        "",
    );
    assert_ne!(no_report, v1);
    let report =
        audit::migration_check(&src, &lib, Path::new("ledger.ron"), &no_report).expect("check");
    let broken: Vec<(&str, u64, BreakKind)> = report
        .breaking
        .iter()
        .map(|b| (b.case_id.as_str(), b.sequence, b.kind))
        .collect();
    assert_eq!(
        broken,
        [("c", 3, BreakKind::Ahead)],
        "{:#?}",
        report.breaking
    );
    assert!(report.breaking[0].reason.contains("`report`"));

    // A version that does not validate is refused with its diagnostics.
    let invalid = v1.replace(
        "to: \"closed\", roles: [\"handler\"]",
        "to: \"nowhere\", roles: [\"handler\"]",
    );
    match audit::migration_check(&src, &lib, Path::new("ledger.ron"), &invalid) {
        Err(AuditError::InvalidWorkflow(diagnostics)) => {
            assert!(
                diagnostics.iter().any(|d| d.message.contains("nowhere")),
                "{diagnostics:#?}"
            )
        }
        other => panic!("expected InvalidWorkflow, got {other:?}"),
    }
}

// ───────────────────────────── speed ─────────────────────────────

/// BENCHMARKS input: `cargo test --release --test tests audit::verify_speed -- --ignored --nocapture`
/// (`GOVFLOW_AUDIT_BENCH_ENTRIES`, default 1,000,000; `GOVFLOW_AUDIT_BENCH_DIR` keeps the store).
#[test]
#[ignore = "builds a store of a million history entries; run in release"]
fn verify_speed() {
    let entries: usize = std::env::var("GOVFLOW_AUDIT_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let steps = 10;
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = std::env::var_os("GOVFLOW_AUDIT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    if !dir.join("db").exists() {
        let store = SledStore::open(&dir).expect("open");
        let started = std::time::Instant::now();
        let written = audit::bench::fill_synthetic(&store, entries / steps, steps).expect("fill");
        eprintln!("wrote {written} entries in {:.1?}", started.elapsed());
    }
    let src = SledSource::open(&dir).expect("source");
    let speed = audit::bench::measure_verify(&src).expect("verify");
    eprintln!(
        "verify: {} entries in {} cases in {:.2} s = {:.0} entries/s ({} threads available)",
        speed.entries,
        speed.cases,
        speed.seconds,
        speed.entries_per_second,
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    assert_eq!(speed.findings, 0);
    if !cfg!(debug_assertions) {
        assert!(
            speed.entries_per_second >= 500_000.0,
            "verify runs at {:.0} entries/s",
            speed.entries_per_second
        );
    }
}
