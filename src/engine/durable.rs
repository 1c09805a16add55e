//! The durable engine: one writer thread owns every change, runs the pure
//! core, and commits whole batches of steps at once (group commit).
//!
//! A caller's request goes over a channel to the writer. The writer takes
//! every request waiting, applies each through [`core`] (later requests in a
//! batch see earlier ones' results), starts spawned children and tells
//! parents about settled children in the same batch, commits the batch as
//! one atomic, synced store write, and only then answers the callers. Reads
//! go straight to the store, which holds only committed data.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock, mpsc};
use std::thread;

use chrono::{DateTime, Utc};
use prost::Message;
use serde_json::{Map as JsonMap, Value as Json};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::core::{self, Input, Rejection, Step};
use super::prefetch::{CacheShadow, Prefetched};
use super::requests::RequestIndex;
use crate::lang::deployed::DeployedSources;
use crate::lang::diag::Diagnostic;
use crate::lang::load::{self, Document};
use crate::lang::validate::{Library, validate};
use crate::store::{
    CaseFilter, CaseWrite, Commit, DueTimer, FeedItem, IndexKey, MAX_RECORD_BYTES, Page, Store,
    StoreError, proto, records,
};

/// Where time comes from: the system clock, or a manual one in tests.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }
}

/// A clock that does not go back over a small step: `inner`'s time, or the
/// last time it gave if `inner` has since been set back by at most
/// [`CLOCK_HOLD`] (an NTP step), so that a case's next step is not recorded
/// before the one it follows. A larger step back is the clock being
/// corrected from a wrong time: holding on to the wrong time would count
/// every deadline from it, so the clock is followed and the step logged.
/// The server and the benchmark run on it over [`SystemClock`].
pub struct Monotonic<C> {
    inner: C,
    last: Mutex<DateTime<Utc>>,
}

/// The largest step back [`Monotonic`] holds over.
pub const CLOCK_HOLD: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

impl<C: Clock> Monotonic<C> {
    pub fn new(inner: C) -> Self {
        Monotonic {
            inner,
            last: Mutex::new(DateTime::<Utc>::MIN_UTC),
        }
    }

    /// Gives no time before `t` (the last step a store holds, so that a
    /// clock set back a little while the server was down is covered too).
    pub fn raise_to(&self, t: DateTime<Utc>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(t);
    }
}

impl<C: Clock> Clock for Monotonic<C> {
    fn now(&self) -> DateTime<Utc> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.inner.now();
        if now >= *last {
            *last = now;
        } else if *last - now > CLOCK_HOLD {
            tracing::error!(
                "the system clock went back from {} to {now}, more than {} minutes: following it (steps from now on are recorded before the last one); check the clock",
                *last,
                CLOCK_HOLD.num_minutes()
            );
            *last = now;
        }
        *last
    }
}

/// A clock that moves only when told to (virtual time).
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The rules refused the input (wrong state, role, guard, payload, …).
    #[error("{0}")]
    Rejected(#[from] Rejection),
    #[error("no case `{0}`")]
    NotFound(String),
    #[error("case `{id}` is at sequence {current}, not the expected {expected}")]
    SequenceMismatch {
        id: String,
        expected: u64,
        current: u64,
    },
    #[error(
        "request id `{0}` was already used for a different request; a changed or corrected request needs a new request id (a refused request keeps its answer too, so that its retries agree)"
    )]
    RequestIdReused(String),
    #[error("case `{0}` already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A request field that can never be right (`field` empty: the request
    /// as a whole), with the machine-readable `reason` clients branch on.
    #[error("{message}")]
    BadField {
        field: &'static str,
        reason: &'static str,
        message: String,
    },
    #[error("the workflow does not validate ({})", crate::lang::validate::count(.0.len(), "problem", "problems"))]
    Invalid(Vec<Diagnostic>),
    /// A deploy that required a migration check: running cases would break.
    #[error("{} running case(s) of `{}` would break under the new version", .0.breaking.len(), .0.workflow)]
    WouldBreak(Box<crate::audit::MigrationReport>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the engine has stopped")]
    Stopped,
    /// The engine failed on this request (a bug); nothing it did is kept,
    /// and the engine goes on with the next.
    #[error("the engine failed on this request: {0}")]
    Internal(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Start a case.
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    /// Makes retries idempotent; required.
    pub request_id: String,
    /// The new case's id; derived from the request id when empty.
    pub case_id: String,
    pub workflow: String,
    /// The agency starting it.
    pub agency: String,
    /// Agencies for the roles the workflow binds `Given`.
    pub bindings: BTreeMap<String, String>,
    pub variables: JsonMap<String, Json>,
}

/// Fire an event on a case.
#[derive(Debug, Clone, Default)]
pub struct FireRequest {
    pub request_id: String,
    pub case_id: String,
    pub event: String,
    pub agency: String,
    pub payload: JsonMap<String, Json>,
    /// Refuse unless the case is at this sequence (optimistic concurrency).
    pub expected_sequence: Option<u64>,
}

/// What a deploy must check first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeployOptions {
    /// Refuse the deploy (`WouldBreak`, nothing changed) when any running
    /// case of the workflow would break under the new version: the
    /// migration check of `audit`, run in the writer, atomically with the
    /// deploy.
    pub require_migration_check: bool,
}

/// A deployed workflow version.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployed {
    pub name: String,
    pub version: u32,
    pub digest: String,
    /// False when the same source was already the current version.
    pub created: bool,
}

enum Command {
    Start(StartRequest, oneshot::Sender<Result<proto::Case>>),
    Fire(
        FireRequest,
        Audience,
        Option<Prefetched>,
        oneshot::Sender<Result<proto::Case>>,
    ),
    Tick(oneshot::Sender<Result<usize>>),
    Deploy(String, DeployOptions, oneshot::Sender<Result<Deployed>>),
}

/// Who may learn that a case exists through a fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    Anyone,
    /// Only agencies holding a role in it.
    Parties,
}

/// The rules in force: the compiled library, version numbers, and the
/// sources needed to validate a new deploy.
struct Rules {
    library: Arc<Library>,
    /// digest → version number.
    versions: HashMap<String, u32>,
    /// workflow name → version number of its current version.
    current: BTreeMap<String, u32>,
    /// What a new version is validated against.
    deployed: DeployedSources,
}

impl Rules {
    /// Validates a workflow source against everything deployed (the other
    /// workflows, the directory, the catalogues): the workflow's name and the
    /// outcome. A source that is not a workflow is `Invalid` at once.
    fn check(&self, source: &str) -> Result<(String, crate::lang::validate::Validated)> {
        let mut diagnostics = Vec::new();
        let path = PathBuf::from("deploy.ron");
        let (_, Some(Document::Workflow(workflow))) =
            load::read_source(&path, source, &mut diagnostics)
        else {
            if diagnostics.is_empty() {
                diagnostics.push(Diagnostic::at(
                    &path,
                    crate::lang::locate::LineCol { line: 1, col: 1 },
                    "unknown-kind",
                    "expected a `Workflow(` file",
                ));
            }
            return Err(EngineError::Invalid(diagnostics));
        };
        let validated = validate(&self.deployed.sources_with(&workflow.name, source));
        Ok((workflow.name, validated))
    }

    /// A new version of a workflow, validated against everything deployed,
    /// with the library it would make current.
    fn candidate(&self, source: &str) -> Result<Candidate> {
        let (name, validated) = self.check(source)?;
        let Some(mut library) = validated.library else {
            return Err(EngineError::Invalid(validated.diagnostics));
        };
        let compiled = Arc::clone(&library.workflows[&name]);
        // Keep every older version so that running cases stay on theirs.
        for (digest, old) in &self.library.versions {
            library
                .versions
                .entry(digest.clone())
                .or_insert_with(|| Arc::clone(old));
        }
        let own = DeployedSources::path_of(&name);
        let warnings = validated
            .diagnostics
            .into_iter()
            .filter(|d| d.file == own && !d.is_error())
            .collect();
        Ok(Candidate {
            name,
            library,
            compiled,
            warnings,
        })
    }

    /// Replays the running cases of the candidate's workflow (those `keep`
    /// accepts) against it.
    fn check_migration(
        &self,
        source: &dyn crate::audit::RecordSource,
        candidate: &Candidate,
        keep: &dyn Fn(&proto::Case) -> bool,
    ) -> Result<crate::audit::MigrationReport> {
        let check = crate::audit::Candidate {
            old: &self.library,
            new: &candidate.library,
            workflow: &candidate.compiled,
            version_of: &|digest| self.versions.get(digest).copied(),
        };
        let (running, breaking) =
            crate::audit::check_running(source, &check, keep).map_err(|e| match e {
                crate::audit::AuditError::Store(e) => EngineError::Store(e),
                other => EngineError::InvalidArgument(other.to_string()),
            })?;
        Ok(crate::audit::MigrationReport {
            workflow: candidate.name.clone(),
            new_digest: candidate.compiled.digest.clone(),
            warnings: candidate.warnings.iter().map(ToString::to_string).collect(),
            running,
            breaking,
        })
    }
}

/// A workflow source validated as the next version of its workflow.
struct Candidate {
    name: String,
    /// The library with it current and every older version kept.
    library: Library,
    compiled: Arc<crate::lang::validate::CompiledWorkflow>,
    /// Its own warnings.
    warnings: Vec<Diagnostic>,
}

/// The durable engine. Cheap to clone; every clone talks to one writer.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    durable: Arc<tokio::sync::watch::Sender<u64>>,
    clock: Arc<dyn Clock>,
    rules: Arc<RwLock<Arc<Rules>>>,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    shadow: Arc<CacheShadow>,
    failure: Failure,
}

impl Inner {
    /// Stops taking requests, lets those on their way finish, and waits
    /// for the threads to end.
    fn stop(&self) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Largest number of requests committed together.
const MAX_BATCH: usize = 1024;

/// How the engine uses memory.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Cases the writer keeps decoded (the hot state); past this it starts
    /// afresh. A step on a case outside it reads the case from the store.
    pub cache_cases: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_cases: 100_000,
        }
    }
}

impl Engine {
    /// Opens the engine on `store` with the workflows, agency directory,
    /// catalogues and calendar of `sources`. Every workflow whose source
    /// differs from its last deployed version becomes a new version; older
    /// versions are compiled too, so that their running cases go on.
    pub fn open(
        store: Arc<dyn Store>,
        sources: &load::Sources,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine> {
        Self::open_with(store, sources, clock, EngineOptions::default())
    }

    /// [`Engine::open`] with other than the default options.
    pub fn open_with(
        store: Arc<dyn Store>,
        sources: &load::Sources,
        clock: Arc<dyn Clock>,
        options: EngineOptions,
    ) -> Result<Engine> {
        Self::open_validated(store, sources, validate(sources), clock, options)
    }

    /// [`Engine::open_with`] on sources the caller has validated already.
    pub fn open_validated(
        store: Arc<dyn Store>,
        sources: &load::Sources,
        validated: crate::lang::validate::Validated,
        clock: Arc<dyn Clock>,
        options: EngineOptions,
    ) -> Result<Engine> {
        let Some(library) = validated.library else {
            return Err(EngineError::Invalid(validated.diagnostics));
        };
        let deployed = DeployedSources::from_sources(sources);
        let stored = store.workflow_versions()?;
        let mut latest: BTreeMap<&str, &proto::WorkflowVersion> = BTreeMap::new();
        for v in &stored {
            let entry = latest.entry(v.name.as_str()).or_insert(v);
            if v.version > entry.version {
                *entry = v;
            }
        }
        let now = clock.now();
        let mut versions = HashMap::new();
        for v in &stored {
            // A store from before one content kept one number may hold the
            // same digest twice: its first version is the one it is known by.
            versions.entry(v.digest.clone()).or_insert(v.version);
        }
        let mut rules = Rules {
            library: Arc::new(Library::default()),
            versions,
            current: BTreeMap::new(),
            deployed,
        };
        let mut new_versions = Vec::new();
        let mut kept_deployed = Vec::new();
        for (name, compiled) in &library.workflows {
            let version = match latest.get(name.as_str()) {
                Some(v) if v.digest == compiled.digest => v.version,
                // The folder holds a version older than one deployed since
                // (DeployWorkflow): a restart must not undo that deploy.
                Some(v) if rules.versions.contains_key(&compiled.digest) => {
                    let folder_version = rules.versions[&compiled.digest];
                    match rules.deployed.compile(name, &v.source) {
                        Some(deployed) => {
                            tracing::warn!(
                                workflow = %name,
                                "the workflows folder holds version {folder_version}, older than version {} deployed since; version {} stays current (put the deployed source in the folder to keep the two alike)",
                                v.version,
                                v.version
                            );
                            kept_deployed.push((name.clone(), v.source.clone(), deployed));
                            v.version
                        }
                        None => {
                            tracing::warn!(
                                workflow = %name,
                                "version {} deployed since no longer validates; the workflows folder's version {folder_version} is current",
                                v.version
                            );
                            folder_version
                        }
                    }
                }
                other => {
                    let version = other.map_or(1, |v| v.version + 1);
                    if let Some(replaced) = other {
                        // It may have been deployed over gRPC: say what
                        // replaces it, so that a deploy is never undone
                        // without a word.
                        tracing::warn!(
                            workflow = %name,
                            "the workflows folder's file differs from version {} (deployed {}): it is version {version} now, and new cases start on it",
                            replaced.version,
                            records::rfc3339(replaced.deploy_time.as_ref())
                        );
                    }
                    new_versions.push(proto::WorkflowVersion {
                        name: name.clone(),
                        version,
                        source: rules.deployed.source(name).unwrap_or_default().to_owned(),
                        digest: compiled.digest.clone(),
                        deploy_time: Some(records::timestamp(now)),
                    });
                    rules.versions.insert(compiled.digest.clone(), version);
                    version
                }
            };
            rules.current.insert(name.clone(), version);
        }
        // A workflow deployed (DeployWorkflow) and not in the folder stays
        // current too: a deploy is for good, not until the next restart.
        for (name, v) in &latest {
            if library.workflows.contains_key(*name) {
                continue;
            }
            match rules.deployed.compile(name, &v.source) {
                Some(deployed) => {
                    tracing::info!(
                        workflow = %name,
                        "version {} stays current: deployed earlier, not in the workflows folder",
                        v.version
                    );
                    rules.current.insert((*name).to_owned(), v.version);
                    kept_deployed.push(((*name).to_owned(), v.source.clone(), deployed));
                }
                None => tracing::warn!(
                    workflow = %name,
                    "version {}, deployed earlier and not in the workflows folder, no longer validates: no new case can start on it (its running cases go on if they can)",
                    v.version
                ),
            }
        }
        let mut library = library;
        for (name, source, deployed) in kept_deployed {
            rules.deployed.set_current(&name, source);
            library
                .versions
                .insert(deployed.digest.clone(), Arc::clone(&deployed));
            library.workflows.insert(name, deployed);
        }
        // Older versions: compiled against today's directory and catalogues.
        for old in &stored {
            if library.versions.contains_key(&old.digest) {
                continue;
            }
            if let Some(compiled) = rules.deployed.compile(&old.name, &old.source) {
                library.versions.insert(compiled.digest.clone(), compiled);
            } else {
                tracing::warn!(workflow = %old.name, version = old.version, "an old workflow version no longer validates; its running cases cannot move");
            }
        }
        rules.library = Arc::new(library);
        store.commit(&Commit {
            workflows: new_versions,
            ..Commit::default()
        })?;
        let (tx, rx) = mpsc::channel();
        let rules = Arc::new(RwLock::new(Arc::new(rules)));
        let last_position = store.last_position()?;
        let durable = Arc::new(tokio::sync::watch::Sender::new(last_position));
        let started = std::time::Instant::now();
        let mut requests = RequestIndex::new();
        let last_commit = store.scan_requests(&mut |id, commit| requests.insert(id, commit))?;
        tracing::info!(
            request_ids = requests.len(),
            ms = started.elapsed().as_millis() as u64,
            "request-id index built"
        );
        // Commit numbers go on from the store's last one.
        let progress = Arc::new(Progress::at(last_commit));
        let failure: Failure = Arc::default();
        let store: Arc<dyn Store> = Arc::new(Guarded {
            inner: store,
            failure: Arc::clone(&failure),
        });
        let shadow = Arc::new(CacheShadow::new());
        let writer = Writer {
            store: Arc::clone(&store),
            clock: Arc::clone(&clock),
            rules: Arc::clone(&rules),
            cache: RefCell::default(),
            cache_cases: options.cache_cases,
            shadow: Arc::clone(&shadow),
            requests: RefCell::new(requests),
            stalled: RefCell::default(),
            sent: Cell::new(last_commit),
            next_position: Cell::new(last_position + 1),
            durable: Arc::clone(&durable),
            progress: Arc::clone(&progress),
        };
        let writer_failure = Arc::clone(&failure);
        let handle = thread::Builder::new()
            .name("govflow-writer".into())
            // It compiles deployed workflows and evaluates their expressions.
            .stack_size(crate::lang::expr::STACK_BYTES)
            .spawn(move || writer.run(rx, writer_failure))
            .map_err(|e| {
                EngineError::InvalidArgument(format!("cannot start the writer thread: {e}"))
            })?;
        Ok(Engine {
            inner: Arc::new(Inner {
                store,
                durable,
                clock,
                rules,
                commands: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                shadow,
                failure,
            }),
        })
    }

    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        {
            let sender = self
                .inner
                .commands
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let sender = sender.as_ref().ok_or(EngineError::Stopped)?;
            sender.send(make(tx)).map_err(|_| EngineError::Stopped)?;
        }
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Starts a case; answers once it is durable.
    pub async fn start(&self, request: StartRequest) -> Result<proto::Case> {
        self.command(|tx| Command::Start(request, tx)).await
    }

    /// Fires an event; answers once the step is durable.
    pub async fn fire(&self, request: FireRequest) -> Result<proto::Case> {
        let prefetched = self.prefetch(&request.case_id);
        self.command(|tx| Command::Fire(request, Audience::Anyone, prefetched, tx))
            .await
    }

    /// Fires an event for an agency that may only know of cases in which it
    /// holds a role: any other case is answered as not found, as a missing
    /// one is, so that its existence does not leak.
    pub async fn fire_as_party(&self, request: FireRequest) -> Result<proto::Case> {
        let prefetched = self.prefetch(&request.case_id);
        self.command(|tx| Command::Fire(request, Audience::Parties, prefetched, tx))
            .await
    }

    /// Reads the case a fire is for on the caller's thread, unless the
    /// writer may hold it (see [`super::prefetch`]). A failed read is left
    /// to the writer, which reads again.
    fn prefetch(&self, id: &str) -> Option<Prefetched> {
        let shadow = &self.inner.shadow;
        if shadow.may_hold(id) {
            return None;
        }
        let generation = shadow.generation();
        let case = Box::new(self.inner.store.case(id).ok().flatten()?);
        Some(Prefetched { case, generation })
    }

    /// Fires every timer due by now, in due order; returns how many fired.
    pub async fn tick(&self) -> Result<usize> {
        self.command(Command::Tick).await
    }

    /// Deploys a workflow source as a new version. A source that does not
    /// validate changes nothing.
    pub async fn deploy(&self, source: String) -> Result<Deployed> {
        self.deploy_with(source, DeployOptions::default()).await
    }

    /// [`Engine::deploy`], with the checks `options` require first.
    pub async fn deploy_with(&self, source: String, options: DeployOptions) -> Result<Deployed> {
        self.command(|tx| Command::Deploy(source, options, tx))
            .await
    }

    /// The migration check a deploy of `source` would run: every running
    /// case of its workflow that `keep` accepts, replayed against the new
    /// version. Read-only, outside the writer (a step taken meanwhile may be
    /// missed; a deploy that requires the check runs it again, atomically).
    pub fn migration_check(
        &self,
        source: &str,
        keep: &dyn Fn(&proto::Case) -> bool,
    ) -> Result<crate::audit::MigrationReport> {
        let rules = Arc::clone(&self.inner.rules.read().unwrap_or_else(|e| e.into_inner()));
        let candidate = rules.candidate(source)?;
        let store = crate::audit::StoreSource(self.inner.store.as_ref());
        rules.check_migration(&store, &candidate, keep)
    }

    /// Stops taking requests, finishes those under way, and waits for the writer.
    pub fn shutdown(&self) {
        self.inner.stop();
    }

    pub fn case(&self, id: &str) -> Result<proto::Case> {
        self.inner
            .store
            .case(id)?
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))
    }

    pub fn history(&self, id: &str) -> Result<Vec<proto::HistoryEntry>> {
        self.case(id)?;
        Ok(self.inner.store.history(id, 0, usize::MAX)?)
    }

    /// Cases matching `filter`, by id; a variable's value is matched as
    /// [`searchable_value`] normalises it.
    pub fn list(&self, filter: &CaseFilter, page_token: &str, page_size: usize) -> Result<Page> {
        let filter = self.normalised(filter)?;
        Ok(self.inner.store.list(&filter, page_token, page_size)?)
    }

    /// Cases matching `filter` whose running deadline (the state's expiry,
    /// not a reminder) comes at or before `before`, soonest first: what is
    /// due or overdue. Read from the store's timers, which are kept in due order.
    pub fn list_due(
        &self,
        filter: &CaseFilter,
        before: DateTime<Utc>,
        page_token: &str,
        page_size: usize,
    ) -> Result<Page> {
        let filter = self.normalised(filter)?;
        let store = &self.inner.store;
        let size = page_size.clamp(1, 1000);
        let mut cursor = due_position(page_token)?;
        let mut page = Page::default();
        // Timers of cases the filter leaves out (other agencies', reminders)
        // are read past; past this many a page ends early, with a token to
        // go on from, so that one call costs the same in any store.
        const MOST_READ: usize = 4096;
        let mut read = 0;
        loop {
            const CHUNK: usize = 256;
            let timers = store.due_timers(before, cursor.as_ref(), CHUNK, &|_| false)?;
            let exhausted = timers.len() < CHUNK;
            for timer in timers {
                if read == MOST_READ {
                    page.next_page_token = cursor.as_ref().map(due_token).unwrap_or_default();
                    return Ok(page);
                }
                read += 1;
                cursor = Some(timer.clone());
                if timer.due > before {
                    return Ok(page);
                }
                let Some(case) = store.case(&timer.case_id)? else {
                    continue;
                };
                let expiry = case
                    .timers
                    .iter()
                    .any(|t| t.id == timer.timer_id && t.kind == proto::TimerKind::Expiry as i32);
                if !expiry || !filter.matches(&case) {
                    continue;
                }
                if page.cases.len() == size {
                    page.next_page_token = page.tokens_after.last().cloned().unwrap_or_default();
                    return Ok(page);
                }
                page.cases.push(case);
                page.tokens_after.push(due_token(&timer));
            }
            if exhausted {
                return Ok(page);
            }
        }
    }

    /// `filter` with its variable's value as the index holds it.
    fn normalised<'f>(&self, filter: &'f CaseFilter) -> Result<std::borrow::Cow<'f, CaseFilter>> {
        if let (Some(workflow), Some((name, raw))) = (&filter.workflow, &filter.variable) {
            let value = searchable_value(&self.library(), workflow, name, raw)?;
            if value != *raw {
                return Ok(std::borrow::Cow::Owned(CaseFilter {
                    variable: Some((name.clone(), value)),
                    ..filter.clone()
                }));
            }
        }
        Ok(std::borrow::Cow::Borrowed(filter))
    }

    /// Cases in which `agency` can act now.
    pub fn inbox(&self, agency: &str, page_token: &str, page_size: usize) -> Result<Page> {
        Ok(self.inner.store.inbox(agency, page_token, page_size)?)
    }

    /// The rules in force now.
    pub fn library(&self) -> Arc<Library> {
        Arc::clone(
            &self
                .inner
                .rules
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .library,
        )
    }

    /// Every problem of a workflow source checked against what is deployed,
    /// without deploying it (only the source's own diagnostics).
    pub fn check_source(&self, source: &str) -> Vec<Diagnostic> {
        let rules = Arc::clone(&self.inner.rules.read().unwrap_or_else(|e| e.into_inner()));
        match rules.check(source) {
            Ok((name, validated)) => {
                let own = DeployedSources::path_of(&name);
                validated
                    .diagnostics
                    .into_iter()
                    .filter(|d| d.file == own)
                    .collect()
            }
            Err(EngineError::Invalid(diagnostics)) => diagnostics,
            Err(other) => vec![Diagnostic::at(
                std::path::Path::new("deploy.ron"),
                crate::lang::locate::LineCol { line: 1, col: 1 },
                "internal",
                other.to_string(),
            )],
        }
    }

    /// Every deployed version of every workflow.
    pub fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>> {
        Ok(self.inner.store.workflow_versions()?)
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Why storage failed, once it has (a panic inside the store counts).
    /// From then on the engine refuses every change until it is opened
    /// again: what sled holds in memory may no longer be what is on disk.
    /// Reads still answer.
    pub fn storage_failure(&self) -> Option<String> {
        failed(&self.inner.failure)
    }

    /// The last event-feed position that is durable, and its changes.
    pub fn durable_position(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.durable.subscribe()
    }

    /// Feed items after `position`, up to the last durable one.
    pub fn feed(&self, after: u64, limit: usize) -> Result<Vec<FeedItem>> {
        let durable = *self.inner.durable.borrow();
        let mut items = self.inner.store.feed(after, limit)?;
        items.retain(|f| f.position <= durable);
        Ok(items)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// When the last durable step happened, if any has.
    pub fn last_step_time(&self) -> Result<Option<DateTime<Utc>>> {
        let last = *self.inner.durable.borrow();
        let Some(item) = self.feed(last.saturating_sub(1), 1)?.pop() else {
            return Ok(None);
        };
        let entry = self.inner.store.history(&item.case_id, item.sequence, 1)?;
        Ok(entry
            .first()
            .map(|e| records::from_timestamp(e.time.as_ref())))
    }
}

/// The id of a case being started may be used in keys and resource names,
/// and holds no `/`: that is kept for the children a case spawns
/// (`{parent}/{n}`), so that no started case can take a child's id.
fn check_case_id(id: &str) -> Result<()> {
    // A first character that is a letter or digit: `-x` would read as an
    // option on a command line, `..` as a folder.
    let ok = id.len() <= 128
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(EngineError::BadField {
            field: "case_id",
            reason: "bad-case-id",
            message: format!(
                "case id `{}` must be 1 to 128 characters of A-Z a-z 0-9 - _ . :, starting with a letter or digit (`/` is kept for the children a case spawns)",
                id.escape_debug()
            ),
        })
    }
}

/// The id of a case started without one: `{workflow}-` and 12 hex digits
/// of the HMAC-SHA-256, under the store's secret, of `seed` (the request's
/// key). The same on a retry; and not an id another agency can work out
/// beforehand and take first, to have the starter's requests land in a case
/// it made (an unkeyed digest of a request id could be).
fn derived_case_id(workflow: &str, secret: &[u8; 32], seed: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, seed.as_bytes());
    format!("{workflow}-{}", &hex::encode(tag.as_ref())[..12])
}

/// The id earlier govflows derived, unkeyed, so that a retry of a start
/// they answered still finds its first answer.
fn unkeyed_case_id(workflow: &str, seed: &str) -> String {
    let digest = hex::encode(Sha256::digest(seed.as_bytes()));
    format!("{workflow}-{}", &digest[..12])
}

/// What a request's outcome is kept under: its id within the agency that
/// sent it. Department systems choose their ids on their own, so one
/// agency's request `1` is not another's, and no agency can reach another's
/// outcomes by sending its ids (a history entry shows the agencies of the
/// case the request id that made it, not what another of their ids did). The agency's length comes first, so that no two
/// pairs share a key.
fn request_key(agency: &str, request_id: &str) -> String {
    format!("{}:{agency}:{request_id}", agency.len())
}

fn check_request_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(EngineError::BadField {
            field: "request_id",
            reason: "missing-field",
            message: "a request id is required, so that retries are safe".into(),
        });
    }
    if id.len() > 256 {
        return Err(EngineError::BadField {
            field: "request_id",
            reason: "bad-request-id",
            message: format!(
                "the request id is {} bytes long: at most 256 bytes (UTF-8) are kept",
                id.len()
            ),
        });
    }
    Ok(())
}

/// Why case `id` would be too large a record, with what takes its room: its
/// largest variables (a ledger that grows each step, documents kept in it).
fn case_too_large(id: &str, case: &proto::Case, size: usize) -> String {
    let mut largest: Vec<(&String, usize)> = case
        .variables
        .iter()
        .flat_map(|v| &v.fields)
        .map(|(name, value)| (name, value.encoded_len()))
        .collect();
    largest.sort_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
    let named: Vec<String> = largest
        .iter()
        .take(3)
        .map(|(name, bytes)| format!("`{name}` {bytes} bytes"))
        .collect();
    format!(
        "case `{id}` has grown too large: this step would make a record of {size} bytes, over the limit of {MAX_RECORD_BYTES}, so it is refused; most of it is the case's variables ({}): keep large documents outside the case and refer to them, and end a case that has grown this large rather than add to it",
        named.join(", ")
    )
}

/// The page token of [`Engine::list_due`]: the last timer of a page.
fn due_token(timer: &DueTimer) -> String {
    serde_json::json!([
        timer
            .due
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        timer.case_id,
        timer.timer_id
    ])
    .to_string()
}

/// Where a [`Engine::list_due`] page goes on from; none for the first page.
fn due_position(token: &str) -> Result<Option<DueTimer>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || EngineError::BadField {
        field: "page_token",
        reason: "bad-page-token",
        message: "the page token is not one this listing gave".into(),
    };
    let (due, case_id, timer_id): (String, String, String) =
        serde_json::from_str(token).map_err(|_| bad())?;
    let due = DateTime::parse_from_rfc3339(&due)
        .map_err(|_| bad())?
        .to_utc();
    Ok(Some(DueTimer {
        due,
        case_id,
        timer_id,
    }))
}

/// Whether two versions of a case have the same index entries: true when
/// everything [`index_keys`] reads is equal.
fn same_index_inputs(library: &Library, a: &proto::Case, b: &proto::Case) -> bool {
    let searchable_equal = || {
        library
            .pinned(&a.workflow, &a.workflow_digest)
            .is_none_or(|wf| {
                wf.def.variables.iter().filter(|v| v.searchable).all(|v| {
                    fn field<'c>(c: &'c proto::Case, name: &str) -> Option<&'c prost_types::Value> {
                        c.variables.as_ref().and_then(|s| s.fields.get(name))
                    }
                    field(a, &v.name) == field(b, &v.name)
                })
            })
    };
    a.workflow == b.workflow
        && a.workflow_digest == b.workflow_digest
        && a.state == b.state
        && a.outcome == b.outcome
        && a.bindings == b.bindings
        && a.signatures
            .iter()
            .map(|s| &s.role)
            .eq(b.signatures.iter().map(|s| &s.role))
        && searchable_equal()
}

/// A list filter's value for the searchable variable `name` of `workflow`,
/// as the index holds it: normalised by the variable's declared type, as a
/// stored value is, so that `12.50` finds an amount given as `12.5` and a
/// time with an offset finds the same instant stored in UTC. The text is
/// tried as it is, then as JSON (`12`, `true`). A variable the workflow
/// does not declare searchable is left to the caller's checks.
pub fn searchable_value(
    library: &Library,
    workflow: &str,
    name: &str,
    raw: &str,
) -> Result<String> {
    let mut types: Vec<&crate::lang::model::Type> = Vec::new();
    for wf in library.versions_of(workflow) {
        for v in wf
            .def
            .variables
            .iter()
            .filter(|v| v.searchable && v.name == name)
        {
            if !types.contains(&&v.ty) {
                types.push(&v.ty);
            }
        }
    }
    let Some(first) = types.first() else {
        return Ok(raw.to_owned());
    };
    let candidates = [
        Some(Json::String(raw.to_owned())),
        serde_json::from_str(raw).ok(),
    ];
    let mut refusal = None;
    for ty in &types {
        for candidate in candidates.iter().flatten() {
            match crate::lang::value::check(candidate, ty, Some(&library.directory)) {
                Ok(normalised) => {
                    if let Some(text) = records::indexed_text(normalised) {
                        return Ok(text);
                    }
                }
                Err(e) => {
                    refusal.get_or_insert(e);
                }
            }
        }
    }
    Err(EngineError::BadField {
        field: "variable_value",
        reason: "bad-variable-value",
        message: format!(
            "`{raw}` can never be the value of `{name}` ({}): {}",
            crate::lang::value::type_name(first),
            refusal.unwrap_or_else(|| "no value".into())
        ),
    })
}

/// Index entries of a case under the rules it runs on.
pub fn index_keys(library: &Library, case: &proto::Case) -> BTreeSet<IndexKey> {
    let mut keys = BTreeSet::new();
    keys.insert(IndexKey::Workflow(case.workflow.clone()));
    keys.insert(IndexKey::State {
        workflow: case.workflow.clone(),
        state: case.state.clone(),
    });
    for agency in case.bindings.values() {
        keys.insert(IndexKey::Agency(agency.clone()));
    }
    let Some(wf) = library.pinned(&case.workflow, &case.workflow_digest) else {
        return keys;
    };
    for var in wf.def.variables.iter().filter(|v| v.searchable) {
        let value = case
            .variables
            .as_ref()
            .and_then(|v| v.fields.get(&var.name))
            .map(records::from_value)
            .unwrap_or(Json::Null);
        let Some(text) = records::indexed_text(value) else {
            continue;
        };
        keys.insert(IndexKey::Variable {
            workflow: case.workflow.clone(),
            name: var.name.clone(),
            value: text,
        });
    }
    if case.outcome.is_empty()
        && let Some(state) = wf.state(&case.state)
    {
        let mut roles: BTreeSet<&str> = state
            .transitions
            .iter()
            .flat_map(|t| t.roles.iter().map(String::as_str))
            .collect();
        if let Some(cs) = &state.countersign {
            let signed: BTreeSet<&str> = case.signatures.iter().map(|s| s.role.as_str()).collect();
            roles.extend(
                cs.roles
                    .iter()
                    .map(String::as_str)
                    .filter(|r| !signed.contains(r)),
            );
        }
        for role in roles {
            if let Some(agency) = case.bindings.get(role) {
                keys.insert(IndexKey::Inbox(agency.clone()));
            }
        }
    }
    keys
}

fn fingerprint(parts: &[&str]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_vec()
}

fn start_fingerprint(r: &StartRequest) -> Vec<u8> {
    let bindings = serde_json::to_string(&r.bindings).unwrap_or_default();
    let variables = serde_json::to_string(&r.variables).unwrap_or_default();
    fingerprint(&[
        "start",
        &r.case_id,
        &r.workflow,
        &r.agency,
        &bindings,
        &variables,
    ])
}

fn fire_fingerprint(r: &FireRequest) -> Vec<u8> {
    let payload = serde_json::to_string(&r.payload).unwrap_or_default();
    let expected = r
        .expected_sequence
        .map(|s| s.to_string())
        .unwrap_or_default();
    fingerprint(&["fire", &r.case_id, &r.event, &r.agency, &payload, &expected])
}

/// A case as it stands within the batch being built.
struct Pending {
    before: Option<Arc<proto::Case>>,
    after: Arc<proto::Case>,
    entries: Vec<proto::HistoryEntry>,
}

/// One batch: the cases it touched and the request outcomes it records.
struct Batch<'w> {
    writer: &'w Writer,
    failure: &'w Failure,
    rules: Arc<Rules>,
    now: DateTime<Utc>,
    cases: BTreeMap<String, Pending>,
    outcomes: BTreeMap<String, proto::RequestOutcome>,
    workflows: Vec<proto::WorkflowVersion>,
    /// Steps in the order they happened, for the event feed.
    feed: Vec<(String, u64)>,
    /// What the request under way changed, newest last.
    undo: Vec<Undo>,
}

/// A case the request under way recorded a step of, and how it stood in the
/// batch before: its record and number of entries, or `None` if it was not
/// in the batch.
type Undo = (String, Option<(Arc<proto::Case>, usize)>);

/// Rejection messages kept and returned at most this long: they can quote
/// the caller's input, and the stored outcome must stay a small record.
const MAX_REJECTION_MESSAGE: usize = 1024;

/// `r` with its message cut to [`MAX_REJECTION_MESSAGE`] bytes.
fn bounded(mut r: Rejection) -> Rejection {
    if r.message.len() > MAX_REJECTION_MESSAGE {
        let mut end = MAX_REJECTION_MESSAGE;
        while !r.message.is_char_boundary(end) {
            end -= 1;
        }
        r.message.truncate(end);
        r.message.push('…');
    }
    r
}

impl Batch<'_> {
    fn case(&self, id: &str) -> Result<Option<Arc<proto::Case>>> {
        self.case_or_prefetched(id, None)
    }

    /// The case as this batch left it, else as the writer knows it.
    fn case_or_prefetched(
        &self,
        id: &str,
        prefetched: Option<Prefetched>,
    ) -> Result<Option<Arc<proto::Case>>> {
        match self.cases.get(id) {
            Some(p) => Ok(Some(Arc::clone(&p.after))),
            None => self.writer.case_or_prefetched(id, prefetched),
        }
    }

    /// The case as it was right after step `sequence`, rebuilt by replaying
    /// its history through the rules it is pinned to.
    fn case_as_of(&self, id: &str, sequence: u64) -> Result<proto::Case> {
        let current = self
            .case(id)?
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))?;
        if current.sequence == sequence {
            return Ok((*current).clone());
        }
        // The history may still be on its way to the store.
        self.writer.settle(self.failure);
        let steps = usize::try_from(sequence).unwrap_or(usize::MAX);
        let mut history = self.writer.store.history(id, 1, steps)?;
        if let Some(pending) = self.cases.get(id) {
            let known = history.len() as u64;
            history.extend(
                pending
                    .entries
                    .iter()
                    .filter(|e| e.sequence > known)
                    .cloned(),
            );
        }
        history.truncate(steps);
        let entries: Vec<core::Entry> = history.iter().map(records::from_entry).collect();
        let parent = (!current.parent.is_empty()).then_some(current.parent.as_str());
        let cases = super::replay::replay(
            &self.rules.library,
            &current.workflow,
            &current.workflow_digest,
            id,
            parent,
            &entries,
        )
        .map_err(|d| {
            EngineError::InvalidArgument(format!("the first answer cannot be rebuilt: {d}"))
        })?;
        let (Some(case), Some(last)) = (cases.last(), history.last()) else {
            return Err(EngineError::NotFound(format!("{id}@{sequence}")));
        };
        Ok(records::case(
            case,
            current.workflow_version,
            last.hash.clone(),
        ))
    }

    /// The first answer to the request `request_id` of `agency`, if it was
    /// answered before (an error if the id was used for another request):
    /// an answer kept under any of `fingerprints` is this request's.
    ///
    /// Stores of format 1 kept outcomes under the bare id, for every agency
    /// at once: such an outcome is this request's only if its fingerprint,
    /// which names the agency, is `format_1_fingerprint` (the request as
    /// format 1 saw it; it differs only for a start whose case id is
    /// derived).
    fn replay(
        &self,
        agency: &str,
        request_id: &str,
        fingerprints: &[&[u8]],
        format_1_fingerprint: &[u8],
    ) -> Result<Option<Result<proto::Case>>> {
        let stored = match self.outcome(&request_key(agency, request_id))? {
            Some(stored) if fingerprints.contains(&stored.fingerprint.as_slice()) => stored,
            Some(_) => return Err(EngineError::RequestIdReused(request_id.to_owned())),
            None => match self.outcome(request_id)? {
                Some(stored) if stored.fingerprint == format_1_fingerprint => stored,
                _ => return Ok(None),
            },
        };
        Ok(Some(match stored.result {
            Some(proto::request_outcome::Result::Case(case)) => Ok(case),
            Some(proto::request_outcome::Result::Step(step)) => {
                self.case_as_of(&step.case_id, step.sequence)
            }
            Some(proto::request_outcome::Result::Rejection(r)) => {
                Err(EngineError::Rejected(Rejection {
                    code: core::RejectCode::parse(&r.code)
                        .unwrap_or(core::RejectCode::InvalidStart),
                    message: r.message,
                }))
            }
            None => Err(EngineError::InvalidArgument("empty stored outcome".into())),
        }))
    }

    /// The outcome kept under `key`, in this batch or before it.
    fn outcome(&self, key: &str) -> Result<Option<proto::RequestOutcome>> {
        match self.outcomes.get(key) {
            Some(outcome) => Ok(Some(outcome.clone())),
            None => self.writer.outcome(key, self.failure),
        }
    }

    fn remember(
        &mut self,
        agency: &str,
        request_id: &str,
        fingerprint: Vec<u8>,
        result: &Result<proto::Case>,
    ) {
        let result = match result {
            // The step, not a copy of the case: the case as of that step is
            // rebuilt from the history if a retry ever needs it.
            Ok(case) => proto::request_outcome::Result::Step(proto::CaseStep {
                case_id: case.id.clone(),
                sequence: case.sequence,
            }),
            Err(EngineError::Rejected(r)) => {
                proto::request_outcome::Result::Rejection(proto::Rejection {
                    code: r.code.as_str().to_owned(),
                    message: r.message.clone(),
                })
            }
            // Transient or caller-side errors are not the request's answer.
            Err(_) => return,
        };
        let outcome = proto::RequestOutcome {
            fingerprint,
            result: Some(result),
        };
        self.outcomes
            .insert(request_key(agency, request_id), outcome);
    }

    /// Records a step of a case, chaining its history entry.
    fn record(&mut self, step: &Step, request_id: &str) -> Arc<proto::Case> {
        let id = step.case.id.clone();
        let version = self
            .rules
            .versions
            .get(&step.case.digest)
            .copied()
            .unwrap_or(0);
        let was = self
            .cases
            .get(&id)
            .map(|p| (Arc::clone(&p.after), p.entries.len()));
        self.undo.push((id.clone(), was));
        let (before, previous_hash, mut entries) = match self.cases.remove(&id) {
            Some(p) => (p.before, p.after.head_hash.clone(), p.entries),
            None => {
                let before = self.writer.case_or_prefetched(&id, None).ok().flatten();
                let head = before
                    .as_ref()
                    .map(|c| c.head_hash.clone())
                    .unwrap_or_default();
                (before, head, Vec::new())
            }
        };
        let entry = records::entry(&id, &step.entry, request_id, previous_hash);
        self.feed.push((id.clone(), entry.sequence));
        let after = Arc::new(records::case(&step.case, version, entry.hash.clone()));
        entries.push(entry);
        self.cases.insert(
            id,
            Pending {
                before,
                after: Arc::clone(&after),
                entries,
            },
        );
        after
    }

    /// Runs one request's steps as a unit within the batch: when it fails, or
    /// would leave a record the store refuses as too large, the batch is left
    /// as it was before it, so one request can never make a commit fail.
    fn atomically<T>(&mut self, run: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        // Empty here: every step is recorded inside this, which empties it.
        let feed_len = self.feed.len();
        // A panic (a bug) is refused like any failure, its steps undone.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(self)))
            .unwrap_or_else(|panic| Err(internal(&*panic)));
        let result = result.and_then(|done| match self.oversized() {
            Some((reason, problem)) => Err(EngineError::BadField {
                field: "",
                reason,
                message: problem,
            }),
            None => Ok(done),
        });
        if result.is_err() {
            self.roll_back(feed_len);
        }
        self.undo.clear();
        result.map_err(|e| match e {
            EngineError::Rejected(r) => EngineError::Rejected(bounded(r)),
            other => other,
        })
    }

    /// Undoes the steps the request under way recorded; `feed_len` is the
    /// feed's length before it.
    fn roll_back(&mut self, feed_len: usize) {
        self.roll_back_to(0, feed_len);
    }

    /// Undoes the steps recorded since the request under way had recorded
    /// `undo_len` of them and the feed was `feed_len` long.
    fn roll_back_to(&mut self, undo_len: usize, feed_len: usize) {
        while self.undo.len() > undo_len
            && let Some((id, was)) = self.undo.pop()
        {
            match was {
                None => {
                    self.cases.remove(&id);
                }
                Some((after, entries)) => {
                    if let Some(p) = self.cases.get_mut(&id) {
                        p.after = after;
                        p.entries.truncate(entries);
                    }
                }
            }
        }
        self.feed.truncate(feed_len);
    }

    /// Runs one request of the batch. A panic in it (a bug) fails that
    /// request alone; unguarded, it would end the writer thread, and every
    /// later request would find the engine stopped. Steps are recorded only
    /// inside [`Batch::atomically`], which undoes its own on a panic, so
    /// what is left to undo here is a deploy's; the steps of timers a tick
    /// fired before the panic are whole, and kept.
    fn guarded<T>(&mut self, run: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let (workflows_len, rules) = (self.workflows.len(), Arc::clone(&self.rules));
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(self))).unwrap_or_else(
            |panic| {
                self.workflows.truncate(workflows_len);
                self.rules = rules;
                Err(internal(&*panic))
            },
        )
    }

    /// What is wrong if a case the request under way changed, or a history
    /// entry it added, is over the store's record limit.
    fn oversized(&self) -> Option<(&'static str, String)> {
        for (id, was) in &self.undo {
            let Some(p) = self.cases.get(id) else {
                continue;
            };
            // An entry too large to record is the request's fault when its
            // own data is (the payload); when only the variables the step
            // rewrites are (their whole new values are recorded), it is
            // the case that has grown.
            let new_entries = &p.entries[was.as_ref().map_or(0, |w| w.1)..];
            for entry in new_entries {
                let size = entry.encoded_len();
                if size <= MAX_RECORD_BYTES {
                    continue;
                }
                let own = proto::HistoryEntry {
                    variables_changed: None,
                    ..entry.clone()
                };
                if own.encoded_len() > MAX_RECORD_BYTES / 2 {
                    return Some((
                        "record-too-large",
                        format!(
                            "the step would add to case `{id}` a history entry of {size} bytes, over the limit of {MAX_RECORD_BYTES}: it is refused (send less data; a payload field copied into a variable counts twice)"
                        ),
                    ));
                }
                return Some(("case-too-large", case_too_large(id, &p.after, size)));
            }
            let size = p.after.encoded_len();
            if size > MAX_RECORD_BYTES {
                return Some(("case-too-large", case_too_large(id, &p.after, size)));
            }
        }
        None
    }

    /// Records a step and everything it sets off: children started, parents
    /// told that a child settled, level by level up a chain of nested cases,
    /// and the running children of a case that settled told so, level by
    /// level down. Each is a notice taken in turn from a queue, not
    /// recursion: a chain may be thousands of cases deep, and recursion
    /// overflowed the writer's stack, taking the process down. A notice is
    /// applied to the case as it is when its turn comes.
    fn cascade(&mut self, step: Step, request_id: &str) -> Result<Arc<proto::Case>, Rejection> {
        let mut notices = std::collections::VecDeque::new();
        let record = self.record_and_spawn(step, request_id, &mut notices)?;
        while let Some(notice) = notices.pop_front() {
            let Some(step) = self.noticed(notice) else {
                continue;
            };
            // A relative's step that cannot be taken whole (a child it would
            // spawn cannot start, the request has made too many steps) is
            // not taken, and logged: the caller's own step stands.
            let (undo_len, feed_len, queued) = (self.undo.len(), self.feed.len(), notices.len());
            let (id, event) = (step.case.id.clone(), step.entry.event.clone());
            if let Err(r) = self.record_and_spawn(step, request_id, &mut notices) {
                tracing::warn!(case = %id, %event, "the engine's step on a related case is not taken: {r}");
                self.roll_back_to(undo_len, feed_len);
                notices.truncate(queued);
            }
        }
        Ok(record)
    }

    /// Records one step and starts the children it spawns (each through
    /// [`Batch::cascade`]: a child that settles at once tells this case);
    /// then, if the case settled, queues the notices to its parent and its
    /// running children. Start steps spawn nothing, so this recurses one
    /// level at most.
    fn record_and_spawn(
        &mut self,
        step: Step,
        request_id: &str,
        notices: &mut std::collections::VecDeque<Notice>,
    ) -> Result<Arc<proto::Case>, Rejection> {
        // A workflow whose children, told their parent settled, spawn and
        // settle again would go on without end inside one commit.
        if self.undo.len() >= MAX_STEPS_PER_REQUEST {
            return Err(Rejection {
                code: core::RejectCode::EffectFailed,
                message: format!(
                    "this request sets off more than {MAX_STEPS_PER_REQUEST} steps (children started, and the cases told that a relative settled, level by level): it is refused, so that no request holds the engine without end"
                ),
            });
        }
        let library = Arc::clone(&self.rules.library);
        let record = self.record(&step, request_id);
        let starter = core::spawn_starter(&step.entry.actor).to_owned();
        if !step.spawn.is_empty() {
            outcomes_fit(&library, &record)?;
        }
        for request in &step.spawn {
            let child = core::start_child(&library, &step.case, request, &starter, self.now)?;
            core::admit_spawn(&library, &child, request)?;
            // Requests name cases by ids of at most this length: a child
            // beyond it could never be read or moved.
            if child.case.id.len() > MAX_CASE_ID_BYTES {
                return Err(Rejection {
                    code: core::RejectCode::EffectFailed,
                    message: format!(
                        "cannot spawn a child here: its id would be over {MAX_CASE_ID_BYTES} bytes (cases nested {} levels deep), and no request could name it",
                        step.case.id.matches('/').count() + 1
                    ),
                });
            }
            // Started cases cannot take a child's id, but a store written
            // before that rule may hold one: never write a child over it.
            let taken = self.case(&child.case.id).map_err(|e| Rejection {
                code: core::RejectCode::EffectFailed,
                message: format!(
                    "cannot tell whether child id `{}` is free: {e}",
                    child.case.id
                ),
            })?;
            if taken.is_some() {
                return Err(Rejection {
                    code: core::RejectCode::EffectFailed,
                    message: format!(
                        "cannot spawn child `{}`: a case of that id already exists",
                        child.case.id
                    ),
                });
            }
            self.cascade(child, request_id)?;
        }
        if let Some(outcome) = &step.settled {
            if let Some(parent_id) = &step.case.parent {
                notices.push_back(Notice::Parent {
                    parent_id: parent_id.clone(),
                    child_id: step.case.id.clone(),
                    outcome: outcome.clone(),
                });
            }
            notices.extend(
                core::running_children(&step.case).map(|child_id| Notice::Child {
                    child_id: child_id.to_owned(),
                    parent_outcome: outcome.clone(),
                }),
            );
        }
        Ok(record)
    }

    /// The step a notice makes, if any. A parent already closed (a child
    /// settling after its parent was withdrawn) is not told; a child takes a
    /// step only if its state reacts to its parent settling. A notice the
    /// rules refuse, or whose step would leave a record over the store's
    /// limit, is logged, and the step that caused it stands: the relative
    /// may belong to another agency, which must not be able to block the
    /// caller's step (by filling its case to the limit), nor be described
    /// to it in a refusal.
    fn noticed(&mut self, notice: Notice) -> Option<Step> {
        let step = self.notice_step(notice)?;
        // The request id and previous hash the step will be recorded with
        // are not known yet: a margin stands for them.
        let entry = records::entry(&step.case.id, &step.entry, "", Vec::new());
        let case = records::case(&step.case, 0, entry.hash.clone());
        let size = entry.encoded_len().max(case.encoded_len());
        if size + NOTICE_MARGIN > MAX_RECORD_BYTES {
            tracing::warn!(
                case = %step.case.id,
                event = %step.entry.event,
                size,
                "the engine's step on a related case is not taken: its record would be over the limit of {MAX_RECORD_BYTES} bytes"
            );
            return None;
        }
        Some(step)
    }

    fn notice_step(&mut self, notice: Notice) -> Option<Step> {
        let library = Arc::clone(&self.rules.library);
        match notice {
            Notice::Parent {
                parent_id,
                child_id,
                outcome,
            } => {
                let parent = records::from_case(&*self.case(&parent_id).ok().flatten()?);
                if parent.outcome.is_some() {
                    return None;
                }
                let input = Input::ChildSettled {
                    child_id: child_id.clone(),
                    outcome,
                };
                core::apply(&library, &parent, &input, self.now)
                    .inspect_err(|r| {
                        tracing::warn!(parent = %parent_id, child = %child_id, "parent not told of settled child: {r}");
                    })
                    .ok()
            }
            Notice::Child {
                child_id,
                parent_outcome,
            } => {
                let child = records::from_case(&*self.case(&child_id).ok().flatten()?);
                let parent = child.parent.clone().unwrap_or_default();
                core::tell_child(&library, &child, &parent_outcome, self.now)?
                    .inspect_err(|r| {
                        tracing::warn!(child = %child_id, %parent, outcome = %parent_outcome, "child not told its parent settled: {r}");
                    })
                    .ok()
            }
        }
    }

    fn start(&mut self, mut r: StartRequest) -> Result<proto::Case> {
        check_request_id(&r.request_id)?;
        // Fingerprints under which earlier govflows may have kept this
        // request's answer: they derived a missing case id unkeyed.
        let mut earlier_fingerprints = Vec::new();
        let mut format_1_fingerprint = None;
        if r.case_id.is_empty() {
            // A derived id is made of the workflow's name: for a workflow
            // that does not exist it could be refused first, as a case id
            // the caller never sent.
            core::compiled(&self.rules.library, &r.workflow)?;
            // Derived from the request's key, so that two agencies' requests
            // of the same id start two cases. Format 1 derived it from the
            // bare id: a retry of such a start is known by that.
            let key = request_key(&r.agency, &r.request_id);
            let with_id = |case_id| StartRequest {
                case_id,
                ..r.clone()
            };
            format_1_fingerprint = Some(start_fingerprint(&with_id(unkeyed_case_id(
                &r.workflow,
                &r.request_id,
            ))));
            earlier_fingerprints.push(start_fingerprint(&with_id(unkeyed_case_id(
                &r.workflow,
                &key,
            ))));
            r.case_id = derived_case_id(&r.workflow, &self.writer.store.secret(), &key);
        }
        check_case_id(&r.case_id)?;
        let fp = start_fingerprint(&r);
        let format_1_fp = format_1_fingerprint.as_deref().unwrap_or(&fp);
        let fingerprints: Vec<&[u8]> = std::iter::once(fp.as_slice())
            .chain(earlier_fingerprints.iter().map(Vec::as_slice))
            .collect();
        if let Some(first) = self.replay(&r.agency, &r.request_id, &fingerprints, format_1_fp)? {
            return first;
        }
        if self.case(&r.case_id)?.is_some() {
            return Err(EngineError::AlreadyExists(r.case_id));
        }
        let library = Arc::clone(&self.rules.library);
        let result = self.atomically(|batch| {
            let step = core::start(
                &library,
                &r.workflow,
                &r.case_id,
                &r.agency,
                &r.bindings,
                &r.variables,
                batch.now,
            )?;
            core::admit_start(&library, &step, &r.agency, &r.variables)?;
            Ok((*batch.cascade(step, &r.request_id)?).clone())
        });
        self.remember(&r.agency, &r.request_id, fp, &result);
        result
    }

    fn fire(
        &mut self,
        r: FireRequest,
        audience: Audience,
        prefetched: Option<Prefetched>,
    ) -> Result<proto::Case> {
        check_request_id(&r.request_id)?;
        let fp = fire_fingerprint(&r);
        if let Some(first) = self.replay(&r.agency, &r.request_id, &[&fp], &fp)? {
            return first;
        }
        let case = self
            .case_or_prefetched(&r.case_id, prefetched)?
            .filter(|c| audience == Audience::Anyone || c.bindings.values().any(|a| *a == r.agency))
            .ok_or_else(|| EngineError::NotFound(r.case_id.clone()))?;
        if let Some(expected) = r.expected_sequence
            && expected != case.sequence
        {
            return Err(EngineError::SequenceMismatch {
                id: r.case_id,
                expected,
                current: case.sequence,
            });
        }
        let library = Arc::clone(&self.rules.library);
        let input = Input::Fire {
            event: r.event.clone(),
            agency: r.agency.clone(),
            payload: r.payload.clone(),
        };
        let result = self.atomically(|batch| {
            let step = core::apply(&library, &records::from_case(&case), &input, batch.now)?;
            Ok((*batch.cascade(step, &r.request_id)?).clone())
        });
        self.remember(&r.agency, &r.request_id, fp, &result);
        result
    }

    /// Fires due timers in due order; a timer that fires sets off its cascade.
    fn tick(&mut self) -> Result<usize> {
        let library = Arc::clone(&self.rules.library);
        let mut fired = 0;
        let mut fired_by_case: HashMap<String, usize> = HashMap::new();
        let mut seen = BTreeSet::new();
        // The store's timers do not change during a tick (only commits
        // change them), so those before the last one taken from it are done.
        let mut cursor: Option<DueTimer> = None;
        // A refused timer waiting long past its retry time is gone from its
        // case (a waiting one is tried at the first tick after that time).
        self.writer
            .stalled
            .borrow_mut()
            .retain(|_, s| s.retry_at > self.now - STALLED_TIMER_MAX_WAIT);
        loop {
            let stalled = self.writer.stalled.borrow();
            let waiting = |t: &DueTimer| stalled.get(t).is_some_and(|s| s.retry_at > self.now);
            // Timers of cases changed in this batch are read from the batch;
            // timers tried in this tick, or refused and waiting, are passed
            // over without counting, so that they never hide later ones.
            let mut candidates =
                self.writer
                    .store
                    .due_timers(self.now, cursor.as_ref(), 256, &|d| {
                        self.cases.contains_key(&d.case_id) || seen.contains(d) || waiting(d)
                    })?;
            let first_stored = candidates.first().cloned();
            for p in self.cases.values() {
                for t in &p.after.timers {
                    let timer = DueTimer {
                        due: records::from_timestamp(t.due_time.as_ref()),
                        case_id: p.after.id.clone(),
                        timer_id: t.id.clone(),
                    };
                    if timer.due <= self.now && !seen.contains(&timer) && !waiting(&timer) {
                        candidates.push(timer);
                    }
                }
            }
            drop(stalled);
            let Some(next) = candidates.into_iter().min() else {
                return Ok(fired);
            };
            seen.insert(next.clone());
            if first_stored.as_ref() == Some(&next) {
                cursor = Some(next.clone());
            }
            let Some(case) = self.case(&next.case_id)? else {
                continue;
            };
            // The store's timer index may lag a batch behind the writer.
            if !case.timers.iter().any(|t| t.id == next.timer_id) {
                continue;
            }
            let input = Input::Timer {
                timer_id: next.timer_id.clone(),
            };
            let by_case = fired_by_case.entry(next.case_id.clone()).or_default();
            let looping = *by_case >= TIMER_STEPS_PER_CASE_PER_TICK;
            let step = if !looping {
                self.atomically(|batch| {
                    let step =
                        core::apply(&library, &records::from_case(&case), &input, batch.now)?;
                    Ok(batch.cascade(step, "")?)
                })
                .map_err(|e| e.to_string())
            } else {
                // Deadlines that expire as soon as they are set, in a loop
                // (zero lengths, days already past): left unchecked, one
                // case would take every tick and write history without end.
                Err(format!(
                    "{TIMER_STEPS_PER_CASE_PER_TICK} of this case's deadlines in a row expired as soon as they were set: its workflow's deadlines loop without time passing (a zero length, or a day already past); give them a length"
                ))
            };
            let mut stalled = self.writer.stalled.borrow_mut();
            match step {
                Ok(_) => {
                    fired += 1;
                    *by_case += 1;
                    stalled.remove(&next);
                }
                // Left due, and tried again after a wait that doubles; a
                // loop after the longest wait at once, as firing it again
                // only starts the loop again.
                Err(e) => {
                    let failures = stalled.get(&next).map_or(1, |s| s.failures + 1);
                    let wait = STALLED_TIMER_FIRST_WAIT
                        .checked_mul(1 << (failures - 1).min(10))
                        .filter(|_| !looping)
                        .unwrap_or(STALLED_TIMER_MAX_WAIT)
                        .min(STALLED_TIMER_MAX_WAIT);
                    let retry_at = self.now + wait;
                    tracing::warn!(case = %next.case_id, timer = %next.timer_id, failures, %retry_at, "timer not fired: {e}");
                    stalled.insert(next, Stalled { retry_at, failures });
                }
            }
            if fired >= MAX_BATCH * 4 {
                return Ok(fired);
            }
        }
    }

    fn deploy(&mut self, source: String, options: DeployOptions) -> Result<Deployed> {
        let candidate = self.rules.candidate(&source)?;
        let name = candidate.name.clone();
        let compiled = Arc::clone(&candidate.compiled);
        if let Some(&version) = self.rules.versions.get(&compiled.digest)
            && self.rules.current.get(&name).is_some_and(|v| *v == version)
        {
            return Ok(Deployed {
                name,
                version,
                digest: compiled.digest.clone(),
                created: false,
            });
        }
        let version = self
            .rules
            .versions
            .iter()
            .filter(|(digest, _)| {
                self.rules
                    .library
                    .versions
                    .get(*digest)
                    .is_some_and(|w| w.def.name == name)
            })
            .map(|(_, v)| *v)
            .chain(
                self.writer
                    .store
                    .workflow_versions()?
                    .iter()
                    .filter(|v| v.name == name)
                    .map(|v| v.version),
            )
            .max()
            .unwrap_or(0)
            + 1;
        if options.require_migration_check {
            // Every step so far: earlier batches once applied, and this
            // batch's own, which are not in the store yet.
            self.writer.settle(self.failure);
            let store = crate::audit::StoreSource(self.writer.store.as_ref());
            let pending = crate::audit::WithPending {
                base: &store,
                pending: self
                    .cases
                    .iter()
                    .map(|(id, p)| (id.as_str(), (&*p.after, p.entries.as_slice())))
                    .collect(),
            };
            let report = self
                .rules
                .check_migration(&pending, &candidate, &|_| true)?;
            if !report.is_compatible() {
                return Err(EngineError::WouldBreak(Box::new(report)));
            }
        }
        let mut rules = Rules {
            library: Arc::new(candidate.library),
            versions: self.rules.versions.clone(),
            current: self.rules.current.clone(),
            deployed: self.rules.deployed.clone(),
        };
        let record = proto::WorkflowVersion {
            name: name.clone(),
            version,
            source: source.clone(),
            digest: compiled.digest.clone(),
            deploy_time: Some(records::timestamp(self.now)),
        };
        let size = record.encoded_len();
        if size > MAX_RECORD_BYTES {
            return Err(EngineError::BadField {
                field: "source",
                reason: "record-too-large",
                message: format!(
                    "workflow `{name}` would be stored as a record of {size} bytes, over the limit of {MAX_RECORD_BYTES}: split it into smaller workflows"
                ),
            });
        }
        rules.versions.insert(compiled.digest.clone(), version);
        rules.current.insert(name.clone(), version);
        rules.deployed.set_current(&name, source);
        self.workflows.push(record);
        self.rules = Arc::new(rules);
        Ok(Deployed {
            name,
            version,
            digest: compiled.digest.clone(),
            created: true,
        })
    }

    fn into_commit(self) -> (Commit, Arc<Rules>) {
        let library = Arc::clone(&self.rules.library);
        let cases = self
            .cases
            .into_values()
            .map(|p| {
                let (index_before, index_after) = match &p.before {
                    // The store writes only the difference, so when nothing
                    // the indexes depend on changed there is none to compute.
                    Some(before) if same_index_inputs(&library, before, &p.after) => {
                        Default::default()
                    }
                    Some(before) => (index_keys(&library, before), index_keys(&library, &p.after)),
                    None => (BTreeSet::new(), index_keys(&library, &p.after)),
                };
                CaseWrite {
                    index_before,
                    index_after,
                    before: p.before,
                    after: p.after,
                    entries: p.entries,
                }
            })
            .collect();
        let first = self.writer.next_position.get();
        let feed: Vec<FeedItem> = self
            .feed
            .into_iter()
            .zip(first..)
            .map(|((case_id, sequence), position)| FeedItem {
                position,
                case_id,
                sequence,
            })
            .collect();
        self.writer.next_position.set(first + feed.len() as u64);
        (
            Commit {
                cases,
                // Numbered when handed over.
                number: 0,
                requests: self
                    .outcomes
                    .into_iter()
                    .map(|(request_id, outcome)| proto::RecordedRequest {
                        request_id,
                        outcome: Some(outcome),
                    })
                    .collect(),
                workflows: self.workflows,
                feed,
            },
            self.rules,
        )
    }
}

enum Reply {
    Case(
        oneshot::Sender<Result<proto::Case>>,
        Box<Result<proto::Case>>,
    ),
    Count(oneshot::Sender<Result<usize>>, Result<usize>),
    Deployed(oneshot::Sender<Result<Deployed>>, Result<Deployed>),
}

/// The most steps one request may make, its children and the relatives told
/// included (a registration spawning 540 permits makes 541).
const MAX_STEPS_PER_REQUEST: usize = 10_000;

/// The longest case id a request may name; a child's id may not be longer.
pub const MAX_CASE_ID_BYTES: usize = 1024;

/// Whether `parent`'s record, listing its children, has room for the
/// outcome of each one still running (each `child-settled` step writes it
/// there): otherwise the last of them could not be recorded, and a wait for
/// all of them would never end.
fn outcomes_fit(lib: &Library, parent: &proto::Case) -> Result<(), Rejection> {
    let longest_outcome = |workflow: &str| {
        lib.workflows.get(workflow).map_or(64, |w| {
            w.def
                .states
                .iter()
                .filter_map(|s| s.outcome.as_ref())
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
    };
    let running: Vec<&proto::ChildCase> = parent
        .children
        .iter()
        .filter(|c| c.outcome.is_empty())
        .collect();
    // An outcome takes its length and a field's tag and length in the record.
    let room: usize = running
        .iter()
        .map(|c| longest_outcome(&c.workflow) + 3)
        .sum();
    let size = parent.encoded_len() + room + NOTICE_MARGIN;
    if size > MAX_RECORD_BYTES {
        return Err(Rejection {
            code: core::RejectCode::EffectFailed,
            message: format!(
                "case `{}` would wait on {} children whose outcomes could not all be recorded in it ({size} bytes, over the limit of {MAX_RECORD_BYTES}): spawn fewer at once",
                parent.id,
                running.len()
            ),
        });
    }
    Ok(())
}

/// Room kept in a notice's records for what is added when they are recorded
/// (a request id of up to 256 bytes, a previous hash).
const NOTICE_MARGIN: usize = 512;

/// What a settled case's relatives are told, in their turn (see
/// [`Batch::cascade`]).
enum Notice {
    /// A child settled with `outcome`.
    Parent {
        parent_id: String,
        child_id: String,
        outcome: String,
    },
    /// The child's parent settled with `parent_outcome`.
    Child {
        child_id: String,
        parent_outcome: String,
    },
}

/// The refusal of a request whose commit, or an earlier one, failed.
fn commit_failed(error: &str) -> EngineError {
    EngineError::Store(StoreError::Io {
        path: "commit".into(),
        source: std::io::Error::other(error.to_owned()),
    })
}

impl Reply {
    /// Answers the caller; when the commit failed, nothing it did is acknowledged.
    fn send(self, commit_error: Option<&str>) {
        let failed = || commit_failed(commit_error.unwrap_or_default());
        match self {
            Reply::Case(tx, r) => {
                let _ = tx.send(if commit_error.is_some() && r.is_ok() {
                    Err(failed())
                } else {
                    *r
                });
            }
            Reply::Count(tx, r) => {
                let _ = tx.send(if commit_error.is_some() {
                    Err(failed())
                } else {
                    r
                });
            }
            Reply::Deployed(tx, r) => {
                let _ = tx.send(if commit_error.is_some() && r.is_ok() {
                    Err(failed())
                } else {
                    r
                });
            }
        }
    }
}

struct Writer {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    rules: Arc<RwLock<Arc<Rules>>>,
    /// Cases as the writer last wrote them. Only the writer changes cases, so
    /// this is never stale; it saves reading and decoding hot cases, and it is
    /// how the writer sees batches the syncer has not applied yet.
    cache: RefCell<HashMap<String, Arc<proto::Case>>>,
    cache_cases: usize,
    /// What callers know of the cache, to read cases before the writer must.
    shadow: Arc<CacheShadow>,
    /// Which commit holds the outcome of each request id answered.
    requests: RefCell<RequestIndex>,
    /// Timers whose step was refused: tried again only from the time given,
    /// so that they neither fill every tick with the same failure nor hold
    /// back the timers due after them.
    stalled: RefCell<HashMap<DueTimer, Stalled>>,
    /// The number of the last batch handed on (batches are the store's
    /// commits, numbered on from the store's last one).
    sent: Cell<u64>,
    /// The event-feed position the next step gets.
    next_position: Cell<u64>,
    /// The last feed position known durable, for watchers.
    durable: Arc<tokio::sync::watch::Sender<u64>>,
    progress: Arc<Progress>,
}

/// A timer whose step was refused, and when it is tried again.
struct Stalled {
    retry_at: DateTime<Utc>,
    failures: u32,
}

/// Timer steps one case may take in one tick. After a long stop a case may
/// have a few overdue (reminders, then its deadline); a case with more is
/// in a loop of deadlines that take no time, and its next timer waits
/// [`STALLED_TIMER_MAX_WAIT`] as if refused, so that the case neither
/// starves other cases' timers nor writes history without end (at most this
/// many steps an hour).
const TIMER_STEPS_PER_CASE_PER_TICK: usize = 16;

/// The first wait before a refused timer is tried again; it doubles with
/// each refusal, up to [`STALLED_TIMER_MAX_WAIT`].
const STALLED_TIMER_FIRST_WAIT: chrono::TimeDelta = chrono::TimeDelta::minutes(1);
const STALLED_TIMER_MAX_WAIT: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// How far the syncer has got; the writer waits on it before it may read
/// from the store something an unapplied batch wrote.
#[derive(Default)]
struct Progress {
    applied: Mutex<u64>,
    changed: Condvar,
}

impl Progress {
    /// Progress with every batch up to `batch` applied.
    fn at(batch: u64) -> Self {
        Progress {
            applied: Mutex::new(batch),
            changed: Condvar::new(),
        }
    }

    fn set(&self, batch: u64) {
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = batch;
        self.changed.notify_all();
    }

    fn applied(&self) -> u64 {
        *self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_for(&self, batch: u64, failure: &Failure) {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        while *applied < batch && failed(failure).is_none() {
            applied = self
                .changed
                .wait_timeout(applied, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A storage failure stops all writing: what sled holds in memory may no
/// longer be what is on disk, so nothing more may be acknowledged.
type Failure = Arc<FailureState>;

/// Whether storage has failed, and why. The flag is what every read and
/// every stage checks, without a lock; the cause is read only once it is set.
#[derive(Default)]
struct FailureState {
    failed: std::sync::atomic::AtomicBool,
    cause: Mutex<Option<String>>,
}

/// The engine's store, which refuses every read once storage has failed:
/// sled then holds in memory the batch that failed to reach the disk, and
/// a read would show steps that never happened (gone after a restart), to
/// every agency and auditor comparing head hashes. Writes go through
/// unchecked: the writer and applier refuse them themselves.
struct Guarded {
    inner: Arc<dyn Store>,
    failure: Failure,
}

impl Guarded {
    fn readable(&self) -> crate::store::Result<()> {
        match failed(&self.failure) {
            Some(cause) => Err(StoreError::Failed(cause)),
            None => Ok(()),
        }
    }
}

impl Store for Guarded {
    fn apply_all(&self, commits: &[&Commit]) -> crate::store::Result<()> {
        self.inner.apply_all(commits)
    }
    fn write_out(&self) -> crate::store::Result<()> {
        self.inner.write_out()
    }
    fn sync(&self) -> crate::store::Result<()> {
        self.inner.sync()
    }
    fn case(&self, id: &str) -> crate::store::Result<Option<proto::Case>> {
        self.readable()?;
        self.inner.case(id)
    }
    fn history(
        &self,
        id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> crate::store::Result<Vec<proto::HistoryEntry>> {
        self.readable()?;
        self.inner.history(id, from_sequence, limit)
    }
    fn scan_requests(&self, each: &mut dyn FnMut(&str, u64)) -> crate::store::Result<u64> {
        self.readable()?;
        self.inner.scan_requests(each)
    }
    fn request_outcome(
        &self,
        number: u64,
        request_id: &str,
    ) -> crate::store::Result<Option<proto::RequestOutcome>> {
        self.readable()?;
        self.inner.request_outcome(number, request_id)
    }
    fn workflow_versions(&self) -> crate::store::Result<Vec<proto::WorkflowVersion>> {
        self.readable()?;
        self.inner.workflow_versions()
    }
    fn due_timers(
        &self,
        until: DateTime<Utc>,
        after: Option<&DueTimer>,
        limit: usize,
        skip: &dyn Fn(&DueTimer) -> bool,
    ) -> crate::store::Result<Vec<DueTimer>> {
        self.readable()?;
        self.inner.due_timers(until, after, limit, skip)
    }
    fn list(
        &self,
        filter: &CaseFilter,
        page_token: &str,
        page_size: usize,
    ) -> crate::store::Result<Page> {
        self.readable()?;
        self.inner.list(filter, page_token, page_size)
    }
    fn inbox(
        &self,
        agency: &str,
        page_token: &str,
        page_size: usize,
    ) -> crate::store::Result<Page> {
        self.readable()?;
        self.inner.inbox(agency, page_token, page_size)
    }
    fn case_ids(&self, after: &str, limit: usize) -> crate::store::Result<Vec<String>> {
        self.readable()?;
        self.inner.case_ids(after, limit)
    }
    fn feed(&self, after: u64, limit: usize) -> crate::store::Result<Vec<FeedItem>> {
        self.readable()?;
        self.inner.feed(after, limit)
    }
    fn last_position(&self) -> crate::store::Result<u64> {
        self.readable()?;
        self.inner.last_position()
    }
    fn secret(&self) -> [u8; 32] {
        self.inner.secret()
    }
}

/// A batch on its way to disk.
struct Outgoing {
    number: u64,
    commit: Commit,
    replies: Vec<Reply>,
}

impl Outgoing {
    fn last_position(&self) -> Option<u64> {
        self.commit.feed.last().map(|f| f.position)
    }
}

impl Writer {
    /// The case, from the cache, else from `prefetched` if that copy is
    /// still the latest, else from the store.
    fn case_or_prefetched(
        &self,
        id: &str,
        prefetched: Option<Prefetched>,
    ) -> Result<Option<Arc<proto::Case>>> {
        if let Some(case) = self.cache.borrow().get(id) {
            return Ok(Some(Arc::clone(case)));
        }
        let case = match prefetched {
            Some(p) if self.shadow.current(&p) => Arc::new(*p.case),
            // What the store holds is the latest: the cache forgets a case
            // only once every batch is applied.
            _ => match self.store.case(id)? {
                Some(case) => Arc::new(case),
                None => return Ok(None),
            },
        };
        // Kept, so a step reads its case once.
        self.cache
            .borrow_mut()
            .insert(id.to_owned(), Arc::clone(&case));
        self.shadow.mark(id);
        Ok(Some(case))
    }

    /// The stored outcome of `request_id`, if it was answered before.
    fn outcome(
        &self,
        request_id: &str,
        failure: &Failure,
    ) -> Result<Option<proto::RequestOutcome>> {
        let commits = self.requests.borrow().commits(request_id);
        for commit in commits {
            // A retry of a request still on its way to the store: rare
            // enough to wait for it rather than keep outcomes in memory.
            if commit > self.progress.applied() {
                self.settle(failure);
            }
            if let Some(outcome) = self.store.request_outcome(commit, request_id)? {
                return Ok(Some(outcome));
            }
        }
        Ok(None)
    }

    /// Waits until every batch handed to the syncer is applied to the store.
    fn settle(&self, failure: &Failure) {
        self.progress.wait_for(self.sent.get(), failure);
    }

    fn hand_over(&self, commit: &mut Commit, failure: &Failure) -> u64 {
        let number = self.sent.get() + 1;
        commit.number = number;
        {
            let mut cache = self.cache.borrow_mut();
            let new = commit
                .cases
                .iter()
                .filter(|w| !cache.contains_key(&w.after.id))
                .count();
            if cache.len() + new > self.cache_cases {
                // Forget only what the store already holds, and only half,
                // so that the cache stays warm.
                self.settle(failure);
                let mut kept = 0;
                cache.retain(|_, _| {
                    kept += 1;
                    kept <= self.cache_cases / 2
                });
                self.shadow.forgot(cache.keys().map(String::as_str));
            }
            for write in &commit.cases {
                // A case already held is already marked in the shadow.
                if cache
                    .insert(write.after.id.clone(), Arc::clone(&write.after))
                    .is_none()
                {
                    self.shadow.mark(&write.after.id);
                }
            }
        }
        let mut requests = self.requests.borrow_mut();
        for recorded in &commit.requests {
            requests.insert(&recorded.request_id, number);
        }
        self.sent.set(number);
        number
    }

    /// Computes batches and hands them on: the applier writes each into the
    /// store, the syncer makes what was applied durable and answers. While
    /// one batch is being synced the next is applied and a third computed.
    fn run(self, rx: mpsc::Receiver<Command>, failure: Failure) {
        let (to_applier, applier_rx) = mpsc::channel::<Outgoing>();
        let (to_syncer, syncer_rx) = mpsc::channel::<Outgoing>();
        let applier = {
            let (store, failure, progress) = (
                Arc::clone(&self.store),
                Arc::clone(&failure),
                Arc::clone(&self.progress),
            );
            thread::Builder::new()
                .name("govflow-applier".into())
                .spawn(move || apply_loop(&*store, &failure, &progress, &applier_rx, &to_syncer))
        };
        let syncer = {
            let (store, failure, durable) = (
                Arc::clone(&self.store),
                Arc::clone(&failure),
                Arc::clone(&self.durable),
            );
            thread::Builder::new()
                .name("govflow-syncer".into())
                .spawn(move || sync_loop(&*store, &failure, &durable, &syncer_rx))
        };
        let (Ok(applier), Ok(syncer)) = (applier, syncer) else {
            tracing::error!("cannot start the applier and syncer threads");
            return;
        };
        while let Some(commands) = next_group(&rx, MAX_BATCH) {
            let failed = failed(&failure);
            if let Some(error) = failed {
                for command in commands {
                    command.refuse(&error);
                }
                continue;
            }
            let started = std::time::Instant::now();
            let rules = Arc::clone(&self.rules.read().unwrap_or_else(|e| e.into_inner()));
            let mut batch = Batch {
                writer: &self,
                failure: &failure,
                rules,
                now: self.clock.now(),
                cases: BTreeMap::new(),
                outcomes: BTreeMap::new(),
                workflows: Vec::new(),
                feed: Vec::new(),
                undo: Vec::new(),
            };
            let mut replies = Vec::with_capacity(commands.len());
            for command in commands {
                replies.push(match command {
                    Command::Start(r, tx) => {
                        Reply::Case(tx, Box::new(batch.guarded(|b| b.start(r))))
                    }
                    Command::Fire(r, audience, prefetched, tx) => Reply::Case(
                        tx,
                        Box::new(batch.guarded(|b| b.fire(r, audience, prefetched))),
                    ),
                    Command::Tick(tx) => Reply::Count(tx, batch.guarded(|b| b.tick())),
                    Command::Deploy(source, options, tx) => {
                        Reply::Deployed(tx, batch.guarded(|b| b.deploy(source, options)))
                    }
                });
            }
            let (mut commit, rules) = batch.into_commit();
            // Later batches build on this one, so they see its rules.
            *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
            let number = self.hand_over(&mut commit, &failure);
            tracing::debug!(
                batch = number,
                requests = replies.len(),
                steps = commit.cases.iter().map(|c| c.entries.len()).sum::<usize>(),
                process_us = started.elapsed().as_micros() as u64,
                "batch computed"
            );
            if to_applier
                .send(Outgoing {
                    number,
                    commit,
                    replies,
                })
                .is_err()
            {
                return;
            }
        }
        drop(to_applier);
        let _ = applier.join();
        let _ = syncer.join();
    }
}

/// Waits for the next item, then takes whatever else is already waiting (up
/// to `most` in all): how each stage groups work. `None` once every sender
/// has gone.
fn next_group<T>(rx: &mpsc::Receiver<T>, most: usize) -> Option<Vec<T>> {
    let mut group = vec![rx.recv().ok()?];
    while group.len() < most
        && let Ok(more) = rx.try_recv()
    {
        group.push(more);
    }
    Some(group)
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// A request refused because the engine panicked on it (a bug).
fn internal(panic: &(dyn std::any::Any + Send)) -> EngineError {
    let message = panic_message(panic);
    tracing::error!("the engine failed on a request, which is refused: {message}");
    EngineError::Internal(message)
}

/// Runs a call into the store on the applier or syncer thread. A panic in it
/// (in sled, or a bug) is a storage failure like any other, so the callers
/// waiting are answered and writing stops, instead of the thread ending
/// with their answers.
fn store_call(what: &str, call: impl FnOnce() -> Result<(), StoreError>) -> Result<(), StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        Err(StoreError::Panicked(format!(
            "{what}: {}",
            panic_message(&*panic)
        )))
    })
}

/// Records a storage failure: from then on nothing more is written or acknowledged.
fn fail(failure: &Failure, e: StoreError) {
    let error = e.to_string();
    tracing::error!("storage failed; writing stops: {error}");
    let mut cause = failure.cause.lock().unwrap_or_else(|e| e.into_inner());
    cause.get_or_insert(error);
    failure
        .failed
        .store(true, std::sync::atomic::Ordering::Release);
}

fn failed(failure: &Failure) -> Option<String> {
    if !failure.failed.load(std::sync::atomic::Ordering::Acquire) {
        return None;
    }
    failure
        .cause
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Writes the batches waiting into the store in order, writes them out to
/// the operating system together, then passes them to the syncer.
fn apply_loop(
    store: &dyn Store,
    failure: &Failure,
    progress: &Progress,
    batches: &mpsc::Receiver<Outgoing>,
    to_syncer: &mpsc::Sender<Outgoing>,
) {
    while let Some(waiting) = next_group(batches, usize::MAX) {
        let started = std::time::Instant::now();
        let commits: Vec<&Commit> = waiting.iter().map(|b| &b.commit).collect();
        if failed(failure).is_none()
            && let Err(e) = store_call("apply", || store.apply_all(&commits))
        {
            fail(failure, e);
        }
        if let Some(last) = waiting.last() {
            progress.set(last.number);
        }
        let applied_us = started.elapsed().as_micros() as u64;
        if failed(failure).is_none()
            && let Err(e) = store_call("write-out", || store.write_out())
        {
            fail(failure, e);
        }
        tracing::debug!(
            batches = waiting.len(),
            applied_us,
            written_us = started.elapsed().as_micros() as u64,
            "applied"
        );
        for batch in waiting {
            if to_syncer.send(batch).is_err() {
                return;
            }
        }
    }
}

/// Makes every batch written out so far durable with one fdatasync, then
/// answers their callers. Only written-out batches reach it, so the sync
/// covers each of them.
fn sync_loop(
    store: &dyn Store,
    failure: &Failure,
    durable: &tokio::sync::watch::Sender<u64>,
    batches: &mpsc::Receiver<Outgoing>,
) {
    while let Some(waiting) = next_group(batches, usize::MAX) {
        let started = std::time::Instant::now();
        if failed(failure).is_none()
            && let Err(e) = store_call("sync", || store.sync())
        {
            fail(failure, e);
        }
        let error = failed(failure);
        if error.is_none()
            && let Some(position) = waiting.iter().filter_map(Outgoing::last_position).max()
        {
            durable.send_replace(position);
        }
        tracing::debug!(
            batches = waiting.len(),
            synced_us = started.elapsed().as_micros() as u64,
            "synced"
        );
        let mut commits = Vec::with_capacity(waiting.len());
        for batch in waiting {
            for reply in batch.replies {
                reply.send(error.as_deref());
            }
            commits.push(batch.commit);
        }
        // Freeing the records is the last thing, after every caller has its answer.
        drop(commits);
    }
}

impl Command {
    /// Refuses a command because storage has failed.
    fn refuse(self, error: &str) {
        let reply = match self {
            Command::Start(_, tx) | Command::Fire(_, _, _, tx) => {
                Reply::Case(tx, Box::new(Ok(proto::Case::default())))
            }
            Command::Tick(tx) => Reply::Count(tx, Ok(0)),
            Command::Deploy(_, _, tx) => Reply::Deployed(tx, Err(commit_failed(error))),
        };
        reply.send(Some(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit;

    #[test]
    fn a_filter_value_is_normalised_as_the_stored_value_is() {
        let mut permit = testkit::PERMIT.to_owned();
        for (plain, searchable) in [
            (
                r#"type: Decimal, default: "0")"#,
                r#"type: Decimal, default: "0", searchable: true)"#,
            ),
            (
                "type: Integer, default: 0)",
                "type: Integer, default: 0, searchable: true)",
            ),
            (
                r#"default: "county")"#,
                r#"default: "county", searchable: true)"#,
            ),
        ] {
            assert!(permit.contains(plain), "{plain}");
            permit = permit.replace(plain, searchable);
        }
        let docs: Vec<(&str, &str)> = testkit::standard_docs()
            .into_iter()
            .map(|(name, text)| (name, if name == "permit.ron" { &permit } else { text }))
            .collect();
        let library = testkit::library_of(&testkit::sources(&docs, None));
        let value = |name: &str, raw: &str| searchable_value(&library, "permit", name, raw);
        // What the index holds for a stored value is what a filter finds.
        for (name, stored) in [("fee", "12.5"), ("amount", "12"), ("level", "city")] {
            let ty = &library.workflows["permit"].variable(name).unwrap().ty;
            let normalised = crate::lang::value::check(&Json::String(stored.into()), ty, None)
                .or_else(|_| {
                    crate::lang::value::check(&serde_json::from_str(stored).unwrap(), ty, None)
                })
                .unwrap();
            assert_eq!(
                records::indexed_text(normalised).as_deref(),
                Some(stored),
                "{name}"
            );
        }
        assert_eq!(value("fee", "12.50").unwrap(), "12.5");
        assert_eq!(value("fee", "012.500").unwrap(), "12.5");
        assert_eq!(value("amount", "12").unwrap(), "12");
        assert_eq!(value("level", "city").unwrap(), "city");
        // A variable not searchable is left to the caller's checks.
        assert_eq!(value("note", "anything").unwrap(), "anything");
        for (name, raw) in [("fee", "twelve"), ("amount", "1.5"), ("level", "planet")] {
            let Err(EngineError::BadField { message, .. }) = value(name, raw) else {
                panic!("`{raw}` for {name} was accepted");
            };
            assert!(message.contains(raw) && message.contains(name), "{message}");
        }
    }

    #[test]
    fn index_inputs_are_the_same_only_when_the_index_entries_are() {
        let permit = testkit::PERMIT.replace(
            r#"Variable(name: "note", given: true, type: String)"#,
            r#"Variable(name: "note", given: true, type: String, searchable: true)"#,
        );
        let docs: Vec<(&str, &str)> = testkit::standard_docs()
            .into_iter()
            .map(|(name, text)| (name, if name == "permit.ron" { &permit } else { text }))
            .collect();
        let library = testkit::library_of(&testkit::sources(&docs, None));
        let wf = &library.workflows["permit"];
        assert!(wf.def.variables.iter().any(|v| v.searchable));
        let vars = |note: &str, amount: i64| {
            let mut map = JsonMap::new();
            map.insert("note".into(), Json::from(note));
            map.insert("amount".into(), Json::from(amount));
            Some(records::to_struct(&map))
        };
        let base = proto::Case {
            id: "a".into(),
            workflow: "permit".into(),
            workflow_digest: wf.digest.clone(),
            state: "review".into(),
            variables: vars("x", 1),
            bindings: [("county", "k"), ("applicant", "ent")]
                .into_iter()
                .map(|(r, a)| (r.to_owned(), a.to_owned()))
                .collect(),
            sequence: 3,
            ..Default::default()
        };
        type Change<'v> = Box<dyn Fn(&mut proto::Case) + 'v>;
        let changes: Vec<(&str, bool, Change)> = vec![
            ("sequence", true, Box::new(|c| c.sequence += 1)),
            (
                "a variable no index reads",
                true,
                Box::new(|c| c.variables = vars("x", 2)),
            ),
            ("head hash", true, Box::new(|c| c.head_hash = vec![1])),
            ("state", false, Box::new(|c| c.state = "joint".into())),
            (
                "outcome",
                false,
                Box::new(|c| c.outcome = "approved".into()),
            ),
            (
                "a searchable variable",
                false,
                Box::new(|c| c.variables = vars("y", 1)),
            ),
            (
                "a binding",
                false,
                Box::new(|c| {
                    c.bindings.insert("county".into(), "k2".into());
                }),
            ),
            (
                "a signature",
                false,
                Box::new(|c| {
                    c.signatures.push(proto::Signature {
                        role: "amr".into(),
                        ..Default::default()
                    });
                }),
            ),
        ];
        for (what, same, change) in changes {
            let mut after = base.clone();
            change(&mut after);
            assert_eq!(same_index_inputs(&library, &base, &after), same, "{what}");
            if same {
                assert_eq!(
                    index_keys(&library, &base),
                    index_keys(&library, &after),
                    "{what}"
                );
            }
        }
    }
}

#[cfg(test)]
mod prefetch_tests {
    use super::*;
    use crate::engine::testkit;
    use crate::store::SledStore;

    /// An engine whose writer keeps at most one case, so that starting
    /// another makes it forget the rest.
    fn forgetful_engine(dir: &std::path::Path) -> Engine {
        let store = Arc::new(SledStore::open(dir).expect("store opens"));
        let sources = testkit::sources(&testkit::standard_docs(), Some(testkit::CALENDAR));
        Engine::open_with(
            store,
            &sources,
            Arc::new(ManualClock::new(testkit::at("2020-06-01T09:00:00Z"))),
            EngineOptions { cache_cases: 1 },
        )
        .expect("engine opens")
    }

    /// `engine` stopped, `commit` written into its store as an earlier
    /// govflow would have written it, and the engine opened again.
    fn reopened_with(engine: Engine, dir: &std::path::Path, commit: &Commit) -> Engine {
        let store = Arc::clone(engine.store());
        engine.shutdown();
        drop(engine);
        store.apply_all(&[commit]).expect("applied");
        store.write_out().expect("written out");
        drop(store);
        forgetful_engine(dir)
    }

    fn permit_start(id: &str) -> StartRequest {
        let mut variables = JsonMap::new();
        variables.insert("county".into(), Json::from("k"));
        StartRequest {
            request_id: format!("start-{id}"),
            case_id: id.into(),
            workflow: "permit".into(),
            agency: "ent".into(),
            bindings: [("tax".to_owned(), "tax".to_owned())].into(),
            variables,
        }
    }

    async fn start_permit(engine: &Engine, id: &str) {
        engine.start(permit_start(id)).await.expect("start");
    }

    fn submit(id: &str, request_id: &str) -> FireRequest {
        let mut payload = JsonMap::new();
        payload.insert("amount".into(), Json::from(5));
        FireRequest {
            request_id: request_id.into(),
            case_id: id.into(),
            event: "submit".into(),
            agency: "ent".into(),
            payload,
            expected_sequence: None,
        }
    }

    async fn fire_with(
        engine: &Engine,
        request: FireRequest,
        copy: Option<Prefetched>,
    ) -> Result<proto::Case> {
        engine
            .command(|tx| Command::Fire(request, Audience::Anyone, copy, tx))
            .await
    }

    /// Stores of format 1 kept request outcomes under the bare request id:
    /// after the upgrade a retry of such a request still gets its first
    /// answer, and another agency's request with that id is its own.
    #[tokio::test]
    async fn an_outcome_kept_under_the_bare_request_id_still_answers_its_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = forgetful_engine(dir.path());
        start_permit(&engine, "x").await;
        let first = engine.fire(submit("x", "submit-1")).await.expect("submit");
        // The outcome of a submit `legacy`, as a format-1 govflow kept it.
        let legacy = proto::RecordedRequest {
            request_id: "legacy".into(),
            outcome: Some(proto::RequestOutcome {
                fingerprint: fire_fingerprint(&submit("x", "legacy")),
                result: Some(proto::request_outcome::Result::Step(proto::CaseStep {
                    case_id: "x".into(),
                    sequence: first.sequence,
                })),
            }),
        };
        // And of a start `legacy-start` without a case id, whose id format 1
        // derived from the bare request id.
        let derived = unkeyed_case_id("permit", "legacy-start");
        start_permit(&engine, &derived).await;
        let mut legacy_start = permit_start("");
        legacy_start.request_id = "legacy-start".into();
        legacy_start.case_id.clone_from(&derived);
        let legacy_started = proto::RecordedRequest {
            request_id: "legacy-start".into(),
            outcome: Some(proto::RequestOutcome {
                fingerprint: start_fingerprint(&legacy_start),
                result: Some(proto::request_outcome::Result::Step(proto::CaseStep {
                    case_id: derived.clone(),
                    sequence: 1,
                })),
            }),
        };
        let commit = Commit {
            number: 1000,
            requests: vec![legacy, legacy_started],
            ..Default::default()
        };
        let engine = reopened_with(engine, dir.path(), &commit);

        legacy_start.case_id.clear();
        let restarted = engine.start(legacy_start).await.expect("retry");
        assert_eq!(restarted.id, derived);
        assert_eq!(
            engine
                .list(&Default::default(), "", 100)
                .expect("list")
                .cases
                .len(),
            2
        );
        let retried = engine.fire(submit("x", "legacy")).await.expect("retry");
        assert_eq!((retried.sequence, retried.state.as_str()), (2, "review"));
        assert_eq!(engine.history("x").expect("history").len(), 2);
        let other = FireRequest {
            agency: "tax".into(),
            ..submit("x", "legacy")
        };
        let answered = engine.fire(other).await;
        assert!(
            !matches!(answered, Err(EngineError::RequestIdReused(_))),
            "{answered:?}"
        );
    }

    /// Regression: the id of a case started without one was an unkeyed
    /// digest of the agency and request id, so another agency could work it
    /// out and start a case of its own under it first, where the starter's
    /// requests would then land. It is now keyed with the store's secret; a
    /// retry of a start an earlier govflow answered still gets its answer.
    #[tokio::test]
    async fn a_derived_case_id_cannot_be_worked_out_and_earlier_ones_still_answer_retries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = forgetful_engine(dir.path());
        let mut fresh = permit_start("");
        fresh.request_id = "fresh".into();
        let started = engine.start(fresh.clone()).await.expect("start");
        let key = request_key("ent", "fresh");
        assert!(started.id.starts_with("permit-"), "{}", started.id);
        assert_ne!(started.id, unkeyed_case_id("permit", &key));
        assert_ne!(started.id, unkeyed_case_id("permit", "fresh"));
        let again = engine.start(fresh.clone()).await.expect("retry");
        assert_eq!(
            (again.id.as_str(), again.sequence),
            (started.id.as_str(), 1)
        );

        // A start answered before this version, its id derived unkeyed from
        // the request's key (kept under that key, as since format 2).
        let earlier = unkeyed_case_id("permit", &request_key("ent", "earlier"));
        start_permit(&engine, &earlier).await;
        let mut earlier_start = permit_start("");
        earlier_start.request_id = "earlier".into();
        earlier_start.case_id.clone_from(&earlier);
        let commit = Commit {
            number: 1000,
            requests: vec![proto::RecordedRequest {
                request_id: request_key("ent", "earlier"),
                outcome: Some(proto::RequestOutcome {
                    fingerprint: start_fingerprint(&earlier_start),
                    result: Some(proto::request_outcome::Result::Step(proto::CaseStep {
                        case_id: earlier.clone(),
                        sequence: 1,
                    })),
                }),
            }],
            ..Default::default()
        };
        let engine = reopened_with(engine, dir.path(), &commit);
        earlier_start.case_id.clear();
        let retried = engine.start(earlier_start).await.expect("retry");
        assert_eq!(
            (retried.id.as_str(), retried.sequence),
            (earlier.as_str(), 1)
        );
        // And the keyed id is the same after reopening.
        let again = engine.start(fresh).await.expect("retry after reopening");
        assert_eq!(again.id, started.id);
    }

    #[tokio::test]
    async fn a_copy_read_before_the_case_last_changed_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = forgetful_engine(dir.path());
        start_permit(&engine, "x").await;
        start_permit(&engine, "y").await; // the writer forgets x
        let stale = engine.prefetch("x").expect("x is read ahead");
        assert_eq!(stale.case.state, "draft");
        engine.fire(submit("x", "submit-1")).await.expect("submit");
        start_permit(&engine, "z").await; // and forgets x again
        // Were the copy taken for the case, a second submit would be
        // accepted from `draft` and overwrite the first step.
        let again = fire_with(&engine, submit("x", "submit-2"), Some(stale)).await;
        assert!(
            matches!(again, Err(EngineError::Rejected(_))),
            "a stale copy was used: {again:?}"
        );
        let history = engine.history("x").expect("history");
        assert_eq!(history.len(), 2, "start and one submit");
        assert_eq!(engine.case("x").expect("x").state, "review");
    }

    #[tokio::test]
    async fn a_current_copy_is_used_instead_of_reading_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = forgetful_engine(dir.path());
        start_permit(&engine, "x").await;
        start_permit(&engine, "y").await;
        let mut copy = engine.prefetch("x").expect("x is read ahead");
        // Marked, so that the step shows which record it started from.
        copy.case.bindings.insert("tax".into(), "amr".into());
        let fired = fire_with(&engine, submit("x", "submit-1"), Some(copy))
            .await
            .expect("submit");
        assert_eq!(fired.bindings["tax"], "amr");
        // A case the writer holds is not read ahead.
        assert!(engine.prefetch("x").is_none());
    }
}
