//! What the test modules share: the engine's test workflows, the moments the
//! tests start at, and the requests and engines they start from.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json, json};

use govflow::engine::durable::{Engine, FireRequest, ManualClock, StartRequest};
use govflow::lang::load::load;
use govflow::store::{CaseFilter, SledStore, Store, StoreError, proto};

/// The engine's test workflows (`ledger`, `batch`, `item`).
pub(crate) fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/engine")
}

/// The seed workflows and scenario files shipped in `workflows/`.
pub(crate) fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows")
}

pub(crate) fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").to_utc()
}

/// When the engine tests begin: Monday 2020-06-01, 09:00 in Shanghai.
pub(crate) fn t0() -> DateTime<Utc> {
    at("2020-06-01T09:00:00+08:00")
}

pub(crate) fn obj(v: Json) -> Map<String, Json> {
    v.as_object().cloned().unwrap_or_default()
}

/// The county that handles the `ledger` cases.
pub(crate) const COUNTY: &str = "hebei.sjz.zhengding";
/// The city that handles the `batch` cases.
pub(crate) const CITY: &str = "hebei.sjz";

/// Starts `ledger` case `id`, handled by [`COUNTY`].
pub(crate) fn start_ledger(id: &str) -> StartRequest {
    StartRequest {
        request_id: format!("start-{id}"),
        case_id: id.into(),
        workflow: "ledger".into(),
        agency: COUNTY.into(),
        bindings: [("handler".to_owned(), COUNTY.to_owned())].into(),
        variables: obj(json!({"enterprise": "石家庄某制造有限公司"})),
    }
}

/// Starts case `id` of `workflow`, whose one role, `handler`, is `agency`'s
/// (request `start-{id}`).
pub(crate) fn start_handled(workflow: &str, id: &str, agency: &str) -> StartRequest {
    StartRequest {
        request_id: format!("start-{id}"),
        case_id: id.into(),
        workflow: workflow.into(),
        agency: agency.into(),
        bindings: [("handler".to_owned(), agency.to_owned())].into(),
        variables: Map::new(),
    }
}

/// Starts `batch` case `id`, handled by [`CITY`].
pub(crate) fn start_batch(request: &str, id: &str) -> StartRequest {
    StartRequest {
        request_id: request.into(),
        ..start_handled("batch", id, CITY)
    }
}

pub(crate) fn fire(
    id: &str,
    request: &str,
    event: &str,
    agency: &str,
    payload: Json,
) -> FireRequest {
    FireRequest {
        request_id: request.into(),
        case_id: id.into(),
        event: event.into(),
        agency: agency.into(),
        payload: obj(payload),
        expected_sequence: None,
    }
}

/// The engine on the store in `dir`, with the workflows of [`data`].
pub(crate) fn open_engine(dir: &Path, clock: &Arc<ManualClock>) -> Engine {
    let sources = load(&[data()]).expect("loads");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).expect("store opens"));
    Engine::open(store, &sources, clock.clone()).expect("engine opens")
}

/// An engine on a [`TestStore`] in a new temporary folder, its clock at [`t0`].
pub(crate) fn engine_on_test_store() -> (tempfile::TempDir, Arc<TestStore>, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(TestStore::open(dir.path()));
    let sources = load(&[data()]).expect("loads");
    let engine = Engine::open(store.clone(), &sources, Arc::new(ManualClock::new(t0())))
        .expect("engine opens");
    (dir, store, engine)
}

/// [`open_engine`] on a new temporary folder, its clock at [`t0`].
pub(crate) fn fresh_engine() -> (tempfile::TempDir, Arc<ManualClock>, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(t0()));
    let engine = open_engine(dir.path(), &clock);
    (dir, clock, engine)
}

/// The environment variable `name` as a number, or `default` when it is
/// unset or not one.
pub(crate) fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Copies the folder `from`, with everything under it, to `to`.
pub(crate) fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A sled store the tests watch and break: it counts the case records read
/// from it and the due timers it hands out; once told to, it fails every
/// sync as a full or failing disk would, or panics when asked for due
/// timers, for a given case or to apply a commit, as a bug would.
pub(crate) struct TestStore {
    inner: SledStore,
    pub case_reads: AtomicUsize,
    pub timers_handed_out: AtomicUsize,
    pub fail_syncs: AtomicBool,
    pub panic_on_due_timers: AtomicBool,
    pub panic_on_apply: AtomicBool,
    pub panic_on_case: std::sync::Mutex<Option<String>>,
    pub history_entries_read: AtomicUsize,
}

impl TestStore {
    pub(crate) fn open(dir: &Path) -> TestStore {
        TestStore {
            inner: SledStore::open(dir).expect("store opens"),
            case_reads: Default::default(),
            timers_handed_out: Default::default(),
            fail_syncs: Default::default(),
            panic_on_due_timers: Default::default(),
            panic_on_apply: Default::default(),
            panic_on_case: Default::default(),
            history_entries_read: Default::default(),
        }
    }
}

impl Store for TestStore {
    fn apply_all(&self, commits: &[&govflow::store::Commit]) -> govflow::store::Result<()> {
        assert!(
            !self.panic_on_apply.load(Ordering::SeqCst),
            "a test's panic in the store"
        );
        self.inner.apply_all(commits)
    }
    fn write_out(&self) -> govflow::store::Result<()> {
        self.inner.write_out()
    }
    fn sync(&self) -> govflow::store::Result<()> {
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                path: "db".into(),
                source: std::io::Error::other("no space left on device (a test's failing disk)"),
            });
        }
        self.inner.sync()
    }
    fn case(&self, id: &str) -> govflow::store::Result<Option<proto::Case>> {
        self.case_reads.fetch_add(1, Ordering::SeqCst);
        let panic_on = self.panic_on_case.lock().expect("lock").clone();
        assert!(
            panic_on.as_deref() != Some(id),
            "a test's panic in the store"
        );
        self.inner.case(id)
    }
    fn history(
        &self,
        id: &str,
        from: u64,
        limit: usize,
    ) -> govflow::store::Result<Vec<proto::HistoryEntry>> {
        let entries = self.inner.history(id, from, limit)?;
        self.history_entries_read
            .fetch_add(entries.len(), Ordering::SeqCst);
        Ok(entries)
    }
    fn scan_requests(&self, each: &mut dyn FnMut(&str, u64)) -> govflow::store::Result<u64> {
        self.inner.scan_requests(each)
    }
    fn request_outcome(
        &self,
        number: u64,
        request_id: &str,
    ) -> govflow::store::Result<Option<proto::RequestOutcome>> {
        self.inner.request_outcome(number, request_id)
    }
    fn workflow_versions(&self) -> govflow::store::Result<Vec<proto::WorkflowVersion>> {
        self.inner.workflow_versions()
    }
    fn due_timers(
        &self,
        until: chrono::DateTime<chrono::Utc>,
        after: Option<&govflow::store::DueTimer>,
        limit: usize,
        skip: &dyn Fn(&govflow::store::DueTimer) -> bool,
    ) -> govflow::store::Result<Vec<govflow::store::DueTimer>> {
        assert!(
            !self.panic_on_due_timers.load(Ordering::SeqCst),
            "a test's panic in the store"
        );
        let due = self.inner.due_timers(until, after, limit, skip)?;
        self.timers_handed_out
            .fetch_add(due.len(), Ordering::SeqCst);
        Ok(due)
    }
    fn list(
        &self,
        filter: &CaseFilter,
        page_token: &str,
        page_size: usize,
    ) -> govflow::store::Result<govflow::store::Page> {
        self.inner.list(filter, page_token, page_size)
    }
    fn inbox(
        &self,
        agency: &str,
        page_token: &str,
        page_size: usize,
    ) -> govflow::store::Result<govflow::store::Page> {
        self.inner.inbox(agency, page_token, page_size)
    }
    fn case_ids(&self, after: &str, limit: usize) -> govflow::store::Result<Vec<String>> {
        self.inner.case_ids(after, limit)
    }
    fn feed(
        &self,
        after: u64,
        limit: usize,
    ) -> govflow::store::Result<Vec<govflow::store::FeedItem>> {
        self.inner.feed(after, limit)
    }
    fn last_position(&self) -> govflow::store::Result<u64> {
        self.inner.last_position()
    }
    fn secret(&self) -> [u8; 32] {
        self.inner.secret()
    }
}
