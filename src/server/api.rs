//! The gRPC services: each call authorised against the caller's principal
//! and the case's role bindings, each failure a standard code with a
//! machine-readable reason (`google.rpc.ErrorInfo`, domain `govflow`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, FieldViolation, PreconditionViolation, StatusExt};

use super::auth::Principal;
use crate::engine::RejectCode;
use crate::engine::durable::{DeployOptions, Engine, EngineError, FireRequest, StartRequest};
use crate::lang::diag::Diagnostic;
use crate::render;
use crate::store::proto::{
    self, audit_service_server::AuditService, cases_service_server::CasesService,
    definitions_service_server::DefinitionsService,
};
use crate::store::{CaseFilter, records};

const DOMAIN: &str = "govflow";

/// The machine-readable reason of a status (its `ErrorInfo`), or "" when it
/// carries none: what [`status`] puts in, read back.
pub fn reason(status: &Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// A status's message and details travel in its trailers, which clients cap
/// (grpc-core at 8 KiB; the message goes percent-encoded, three times the
/// size of Chinese text, and again inside the details). A status would
/// repeat whatever a request sent (a 6 KB case name) and then reach the
/// client as a bare RESOURCE_EXHAUSTED, so what it says is cut to fit.
const MESSAGE_BYTES: usize = 1_000;
/// Room for the violations a status lists, all together.
const VIOLATIONS_BYTES: usize = 2_000;
/// Room for one value: an `ErrorInfo` metadata entry or one violation.
const VALUE_BYTES: usize = 300;

/// `text` cut to at most about `bytes`, keeping its start and its end (where
/// a message says what to do) with `…` between them.
fn shortened(text: &str, bytes: usize) -> String {
    if text.len() <= bytes {
        return text.to_owned();
    }
    let floor = |mut at: usize| {
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    let ceil = |mut at: usize| {
        while !text.is_char_boundary(at) {
            at += 1;
        }
        at
    };
    let head = floor(bytes * 2 / 3);
    let tail = ceil(text.len() - bytes / 3);
    format!("{}…{}", &text[..head], &text[tail..])
}

/// The first of `violations` that fit together in [`VIOLATIONS_BYTES`],
/// `size` telling each one's.
fn fitting_violations<V>(
    violations: impl IntoIterator<Item = V>,
    size: impl Fn(&V) -> usize,
) -> Vec<V> {
    let mut used = 0;
    violations
        .into_iter()
        .take_while(|v| {
            used += size(v);
            used <= VIOLATIONS_BYTES
        })
        .collect()
}

/// A status with its machine-readable reason.
pub fn status(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: &[(&str, String)],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), shortened(v, VALUE_BYTES)))
        .collect();
    error_status(
        code,
        &message.into(),
        ErrorDetails::with_error_info(reason, DOMAIN, metadata),
    )
}

/// A status with the given details, its message shortened to fit.
fn error_status(code: Code, message: &str, details: ErrorDetails) -> Status {
    Status::with_error_details(code, shortened(message, MESSAGE_BYTES), details)
}

fn invalid(reason: &str, field: &str, message: impl Into<String>) -> Status {
    let message = shortened(&message.into(), MESSAGE_BYTES);
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new());
    details.set_bad_request(vec![FieldViolation::new(
        shortened(field, VALUE_BYTES),
        shortened(&message, VALUE_BYTES),
    )]);
    error_status(Code::InvalidArgument, &message, details)
}

fn diagnostics_status(diagnostics: &[Diagnostic]) -> Status {
    let errors: Vec<&Diagnostic> = diagnostics.iter().filter(|d| d.is_error()).collect();
    let message = match errors.first() {
        Some(d) => format!(
            "the workflow does not validate ({}); first: {}:{}: {}",
            crate::lang::validate::count(errors.len(), "problem", "problems"),
            d.line,
            d.col,
            d.message
        ),
        None => "the workflow does not validate".to_owned(),
    };
    let mut details = ErrorDetails::with_error_info("workflow-invalid", DOMAIN, HashMap::new());
    details.set_bad_request(fitting_violations(
        errors.iter().map(|d| {
            FieldViolation::new(
                format!("source:{}:{}", d.line, d.col),
                shortened(&format!("[{}] {}", d.code, d.message), VALUE_BYTES),
            )
        }),
        |v| v.field.len() + v.description.len(),
    ));
    error_status(Code::InvalidArgument, &message, details)
}

/// The payload field an `invalid-payload` refusal names: the engine says
/// "unknown field `x`", "missing required field `x`" or "field `x`: …".
fn payload_field(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once("field `")?;
    let (name, _) = rest.split_once('`')?;
    (!name.is_empty()).then_some(name)
}

/// How an engine error reaches a client.
pub fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Rejected(r) => {
            let code = match r.code {
                RejectCode::RoleNotAllowed => Code::PermissionDenied,
                RejectCode::InvalidPayload
                | RejectCode::InvalidStart
                | RejectCode::UnknownEvent => Code::InvalidArgument,
                RejectCode::UnknownWorkflow => Code::NotFound,
                RejectCode::WrongState
                | RejectCode::GuardFalse
                | RejectCode::CaseClosed
                | RejectCode::EffectFailed
                | RejectCode::Calendar
                | RejectCode::UnknownTimer
                | RejectCode::UnknownChild
                | RejectCode::TimerNotDue
                | RejectCode::VersionUnavailable => Code::FailedPrecondition,
            };
            // A payload's refusal names its field (`… field `x`: …`): as a
            // BadRequest violation too, for clients that read details.
            if r.code == RejectCode::InvalidPayload
                && let Some(field) = payload_field(&r.message)
            {
                return invalid(r.code.as_str(), &format!("payload.{field}"), r.message);
            }
            status(code, r.code.as_str(), r.message, &[])
        }
        EngineError::NotFound(id) => status(
            Code::NotFound,
            "case-not-found",
            format!("no case `{id}`"),
            &[],
        ),
        EngineError::SequenceMismatch {
            id,
            expected,
            current,
        } => status(
            Code::Aborted,
            "sequence-mismatch",
            format!("case `{id}` is at sequence {current}, not the expected {expected}"),
            &[("current_sequence", current.to_string())],
        ),
        e @ EngineError::RequestIdReused(_) => {
            invalid("request-id-reused", "request_id", e.to_string())
        }
        EngineError::AlreadyExists(id) => status(
            Code::AlreadyExists,
            "case-exists",
            format!("case `{id}` already exists"),
            &[],
        ),
        EngineError::InvalidArgument(message) => {
            status(Code::InvalidArgument, "invalid-argument", message, &[])
        }
        // The request is sound; the case it would change has no room left.
        EngineError::BadField {
            field: "",
            reason: reason @ "case-too-large",
            message,
        } => status(
            Code::FailedPrecondition,
            reason,
            message,
            &[("limit_bytes", crate::store::MAX_RECORD_BYTES.to_string())],
        ),
        EngineError::BadField {
            field: "",
            reason,
            message,
        } => status(
            Code::InvalidArgument,
            reason,
            message,
            &[("limit_bytes", crate::store::MAX_RECORD_BYTES.to_string())],
        ),
        EngineError::BadField {
            field,
            reason,
            message,
        } => invalid(reason, field, message),
        EngineError::Invalid(diagnostics) => diagnostics_status(&diagnostics),
        EngineError::WouldBreak(report) => migration_status(&report),
        EngineError::Stopped => status(Code::Unavailable, "stopped", "the engine is stopping", &[]),
        EngineError::Store(e) => {
            // The operator must hear of it even with the call log off.
            if e.is_corruption() {
                tracing::error!(
                    "a request failed on the store: {e}: keep a copy of the data folder, and run `govflow audit verify --data` on the copy to see what is damaged"
                );
            } else {
                tracing::error!("a request failed on the store: {e}");
            }
            status(Code::Internal, "storage", e.to_string(), &[])
        }
        EngineError::Internal(message) => {
            tracing::error!("a request failed inside the engine: {message}");
            status(Code::Internal, "internal", message, &[])
        }
    }
}

fn break_kind(kind: crate::audit::BreakKind) -> &'static str {
    match kind {
        crate::audit::BreakKind::History => "history",
        crate::audit::BreakKind::Ahead => "ahead",
        crate::audit::BreakKind::Unreadable => "unreadable",
    }
}

/// A deploy refused by its migration check: the cases, in the message and
/// as a `PreconditionFailure` (one violation per case, `cases/{id}`).
fn migration_status(report: &crate::audit::MigrationReport) -> Status {
    let named: Vec<String> = report
        .breaking
        .iter()
        .take(5)
        .map(|b| {
            format!(
                "case `{}` at sequence {}: {}",
                b.case_id,
                b.sequence,
                shortened(&b.reason, VALUE_BYTES / 2)
            )
        })
        .collect();
    let more = report.breaking.len().saturating_sub(named.len());
    let message = format!(
        "the migration check failed: {} of {} running case(s) of `{}` would break under the new version, so nothing was deployed: {}{}",
        report.breaking.len(),
        report.running,
        report.workflow,
        named.join("; "),
        if more > 0 {
            format!("; and {more} more (CheckMigration lists them all)")
        } else {
            String::new()
        }
    );
    let metadata: HashMap<String, String> = [
        ("workflow".to_owned(), report.workflow.clone()),
        ("running_cases".to_owned(), report.running.to_string()),
        (
            "breaking_cases".to_owned(),
            report.breaking.len().to_string(),
        ),
    ]
    .into();
    let mut details = ErrorDetails::with_error_info("migration-check-failed", DOMAIN, metadata);
    details.set_precondition_failure(fitting_violations(
        report.breaking.iter().map(|b| {
            PreconditionViolation::new(
                "MIGRATION",
                format!("cases/{}", b.case_id),
                shortened(
                    &format!(
                        "sequence {} ({}): {}",
                        b.sequence,
                        break_kind(b.kind),
                        b.reason
                    ),
                    VALUE_BYTES,
                ),
            )
        }),
        |v| v.subject.len() + v.description.len(),
    ));
    error_status(Code::FailedPrecondition, &message, details)
}

fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credential"))
}

fn writer_agency(principal: &Principal) -> Result<String, Status> {
    match principal {
        Principal::Agency(a) => Ok(a.clone()),
        Principal::Auditor(a) => Err(status(
            Code::PermissionDenied,
            "read-only",
            format!("`{a}` audits: it reads cases and moves none"),
            &[],
        )),
        Principal::Admin => Err(status(
            Code::PermissionDenied,
            "read-only",
            "the admin deploys workflows and moves no case",
            &[],
        )),
    }
}

/// `cases/{id}` → id.
fn case_id(name: &str, field: &str) -> Result<String, Status> {
    let id = name
        .strip_prefix("cases/")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            invalid(
                "bad-resource-name",
                field,
                format!("`{name}` is not a case name: expected `cases/{{case}}`"),
            )
        })?;
    // No case has a longer id (128 characters, and a few for each level of
    // children); ids are otherwise not judged here, as a store may hold ids
    // from before today's rules, which must stay readable.
    if id.len() > MAX_CASE_NAME_BYTES {
        return Err(invalid(
            "bad-case-id",
            field,
            format!(
                "a case id of {} bytes: no case has an id over {MAX_CASE_NAME_BYTES} bytes",
                id.len()
            ),
        ));
    }
    Ok(id.to_owned())
}

/// The longest case id a request may name (see [`case_id`]).
const MAX_CASE_NAME_BYTES: usize = crate::engine::durable::MAX_CASE_ID_BYTES;

/// A filter naming a workflow, state or variable that no version of the
/// library knows can never match: it is refused, naming the field, so that
/// a client can tell "no cases" from a question asked wrong (a misspelt
/// state, a variable that is not searchable).
fn check_filter(
    library: &crate::lang::validate::Library,
    workflow: Option<&str>,
    state: Option<&str>,
    variable: Option<&str>,
) -> Result<(), Status> {
    let Some(workflow) = workflow else {
        return Ok(());
    };
    let versions: Vec<&crate::lang::validate::CompiledWorkflow> =
        library.versions_of(workflow).collect();
    if versions.is_empty() {
        let known: Vec<&str> = library.workflows.keys().map(String::as_str).collect();
        return Err(invalid(
            "unknown-workflow",
            "workflow",
            format!(
                "no workflow `{workflow}` is deployed{}",
                crate::lang::diag::did_you_mean(workflow, known.iter().copied())
                    .map(|hint| format!(" ({hint})"))
                    .unwrap_or_default()
            ),
        ));
    }
    if let Some(state) = state {
        let states: BTreeSet<&str> = versions
            .iter()
            .flat_map(|w| w.def.states.iter().map(|s| s.name.as_str()))
            .collect();
        if !states.contains(state) {
            return Err(invalid(
                "unknown-state",
                "state",
                format!(
                    "workflow `{workflow}` has no state `{state}`; its states: {}",
                    states.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    if let Some(variable) = variable {
        let searchable: BTreeSet<&str> = versions
            .iter()
            .flat_map(|w| w.def.variables.iter())
            .filter(|v| v.searchable)
            .map(|v| v.name.as_str())
            .collect();
        if !searchable.contains(variable) {
            return Err(invalid(
                "not-searchable",
                "variable_name",
                format!(
                    "`{variable}` is not a searchable variable of workflow `{workflow}` (only searchable variables are indexed); searchable: {}",
                    if searchable.is_empty() {
                        "none".to_owned()
                    } else {
                        searchable.into_iter().collect::<Vec<_>>().join(", ")
                    }
                ),
            ));
        }
    }
    // A value the variable can never have is the engine's to refuse, where
    // it normalises the value (`Engine::list`, `bad-variable-value`).
    Ok(())
}

/// Whether the caller may see a case: auditors and the admin see every
/// case, an agency those in which it holds a role.
fn sees(principal: &Principal, case: &proto::Case) -> bool {
    principal.reads_all()
        || principal
            .agency()
            .is_some_and(|a| case.bindings.values().any(|b| b == a))
}

/// A case the caller may see; otherwise NOT_FOUND, so existence does not leak.
fn visible(engine: &Engine, principal: &Principal, id: &str) -> Result<proto::Case, Status> {
    let case = engine.case(id).map_err(engine_status)?;
    if sees(principal, &case) {
        Ok(case)
    } else {
        Err(status(
            Code::NotFound,
            "case-not-found",
            format!("no case `{id}`"),
            &[],
        ))
    }
}

/// At most about this many bytes of records go in one page: gRPC clients
/// refuse larger answers by default (4 MiB in grpc-go, grpc-java and
/// Python's grpcio), and a page of 1,000 cases of up to 64 KiB each would
/// be far over. A page that reaches it ends early, with a page token.
const PAGE_BYTES: usize = 3 * 1024 * 1024;

/// How many of `records`, from the first, fit in one page (at least one).
fn fitting<T: prost::Message>(records: &[T]) -> usize {
    let mut bytes = 0;
    records
        .iter()
        .position(|r| {
            bytes += r.encoded_len();
            bytes > PAGE_BYTES
        })
        .map_or(records.len(), |n| n.max(1))
}

/// Seals page tokens. A token is the position the next page goes on from,
/// encrypted and authenticated (ChaCha20-Poly1305) under a key made from the
/// store's secret, and bound to the listing that gave it (method, caller and
/// filter). A caller can neither read a position, which may name a case of
/// another agency (a listing by deadline that stops after reading many
/// others' timers stops on one of theirs), nor make one up, nor take one to
/// another listing: each is refused instead of silently skipping what lies
/// before it. Tokens outlive a restart, as the store's secret does.
#[derive(Clone)]
pub struct PageTokens(Arc<ring::aead::LessSafeKey>);

impl PageTokens {
    pub fn new(store_secret: &[u8; 32]) -> Self {
        use sha2::Digest;
        let key = sha2::Sha256::new()
            .chain_update(b"govflow page tokens\0")
            .chain_update(store_secret)
            .finalize();
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key)
            .expect("a ChaCha20-Poly1305 key is 32 bytes, as a SHA-256 digest is");
        PageTokens(Arc::new(ring::aead::LessSafeKey::new(key)))
    }

    /// The token of `position` for `listing` (empty when there is no next page).
    fn seal(&self, listing: &[&str], position: &str) -> Result<String, Status> {
        if position.is_empty() {
            return Ok(String::new());
        }
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| {
            tracing::error!("no randomness for a page token: {e}");
            Status::unavailable(
                "the server cannot make a page token now (no randomness): try again",
            )
        })?;
        // Padded to a multiple of PAD_TO bytes, so that a token's length
        // does not tell the length of the case id it may hold (another
        // agency's, when a scan stopped on one of its timers).
        let mut sealed = position.as_bytes().to_vec();
        sealed.resize(sealed.len().div_ceil(PAD_TO) * PAD_TO, 0);
        self.0
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(listing_print(listing)),
                &mut sealed,
            )
            .map_err(|_| Status::internal("a page token could not be sealed"))?;
        Ok(hex::encode([&nonce[..], &sealed].concat()))
    }

    /// The position a page token goes on from, if this server gave it for this listing.
    fn open(&self, listing: &[&str], token: &str) -> Result<String, Status> {
        if token.is_empty() {
            return Ok(String::new());
        }
        let refused = || {
            invalid(
                "bad-page-token",
                "page_token",
                "page_token was not issued by this server for this listing: a token goes on only with the caller and filter of the page that gave it, and not across an upgrade of govflow; start the listing again without a token",
            )
        };
        let mut bytes = hex::decode(token).map_err(|_| refused())?;
        if bytes.len() <= ring::aead::NONCE_LEN {
            return Err(refused());
        }
        let mut sealed = bytes.split_off(ring::aead::NONCE_LEN);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&bytes).map_err(|_| refused())?;
        let position = self
            .0
            .open_in_place(
                nonce,
                ring::aead::Aad::from(listing_print(listing)),
                &mut sealed,
            )
            .map_err(|_| refused())?;
        // A position holds no NUL: what follows the first is padding.
        let end = position
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(position.len());
        String::from_utf8(position[..end].to_vec())
            .ok()
            .filter(|position| !position.is_empty())
            .ok_or_else(refused)
    }
}

/// Sealed positions are padded to a multiple of this many bytes.
const PAD_TO: usize = 256;

/// What a token is bound to: a digest of the listing's parts.
fn listing_print(listing: &[&str]) -> [u8; 32] {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for part in listing {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// Ends a page of cases early when it would be too large to send (see
/// [`PAGE_BYTES`]); the next page starts after its last case.
fn fit_page(page: &mut crate::store::Page) {
    page.truncate(fitting(&page.cases));
}

/// `items` as records, as many as fit in one answer (see [`fitting`]), and
/// how many there were in all.
fn fitted<U, T: prost::Message>(items: Vec<U>, record: impl FnMut(U) -> T) -> (Vec<T>, u64) {
    let total = items.len() as u64;
    let mut records: Vec<T> = items.into_iter().map(record).collect();
    records.truncate(fitting(&records));
    (records, total)
}

fn page_size(requested: i32, default: usize) -> Result<usize, Status> {
    match requested {
        0 => Ok(default),
        n if n < 0 => Err(invalid(
            "bad-page-size",
            "page_size",
            format!("page_size must not be negative, got {n}"),
        )),
        n => Ok((n as usize).min(1000)),
    }
}

/// The gRPC services over one engine.
#[derive(Clone)]
pub struct Api {
    pub engine: Engine,
    /// Turns true when the server starts stopping: watch streams end then,
    /// so that shutting down does not wait on them forever.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// How long a watcher may leave a step unread before it is cut off.
    pub watch_cutoff: std::time::Duration,
    /// Watch tasks running.
    pub watchers: Watchers,
    pub page_tokens: PageTokens,
}

/// Gauges of the watch streams: tasks running, and streams not yet done
/// with (a stream outlives its task while its client has steps to read).
#[derive(Debug, Clone, Default)]
pub struct Watchers {
    tasks: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    /// Streams open per caller, for [`MAX_WATCHES_PER_CALLER`].
    per_caller: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

/// Watch streams one caller (an agency, an auditor, the admin) may hold open
/// at once. Each holds a task and up to [`WATCH_QUEUE`] steps in memory, so
/// without a bound one department system that opens watches and never
/// closes them could exhaust the server for every other.
pub const MAX_WATCHES_PER_CALLER: usize = 32;

/// One of a caller's open watch streams, given back when it is dropped.
struct CallerWatch {
    per_caller: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl Drop for CallerWatch {
    fn drop(&mut self) {
        let mut open = self.per_caller.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

impl Watchers {
    /// A stream for `caller`, unless it holds [`MAX_WATCHES_PER_CALLER`].
    fn admit(&self, caller: &str) -> Option<CallerWatch> {
        let mut open = self.per_caller.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(caller.to_owned()).or_default();
        if *n >= MAX_WATCHES_PER_CALLER {
            return None;
        }
        *n += 1;
        Some(CallerWatch {
            per_caller: Arc::clone(&self.per_caller),
            caller: caller.to_owned(),
        })
    }

    /// Watch tasks running.
    pub fn running(&self) -> usize {
        self.tasks.load(Ordering::SeqCst)
    }

    /// Watch streams the server still holds (their client has not taken
    /// everything, or has not gone away).
    pub fn open(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }
}

/// Counts one task or stream while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(gauge: &Arc<AtomicUsize>) -> Counted {
        gauge.fetch_add(1, Ordering::SeqCst);
        Counted(Arc::clone(gauge))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A WatchEvents stream: the steps its task queued (at most [`WATCH_QUEUE`]),
/// then the status the task ended with, if it ended with one. The status
/// takes no room in the queue, so a task never waits on its client to say
/// why it stopped: it ends at once, and a client that never reads holds only
/// the queue and its connection's buffers.
pub struct WatchStream {
    steps: tokio::sync::mpsc::Receiver<proto::WatchEventsResponse>,
    end: Option<tokio::sync::oneshot::Receiver<Status>>,
    _open: Counted,
    _caller: CallerWatch,
}

impl tokio_stream::Stream for WatchStream {
    type Item = Result<proto::WatchEventsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(step) = ready!(this.steps.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(step)));
        }
        // The task has ended and every step it queued has been taken.
        let Some(end) = this.end.as_mut() else {
            return Poll::Ready(None);
        };
        let status = ready!(Pin::new(end).poll(cx));
        this.end = None;
        Poll::Ready(status.ok().map(Err))
    }
}

/// One watcher's task: reads the feed after `position` and queues the steps
/// the principal may see.
struct Watch {
    engine: Engine,
    principal: Principal,
    /// Every feed item up to here is queued or not the principal's.
    position: u64,
    durable: tokio::sync::watch::Receiver<u64>,
    stopping: tokio::sync::watch::Receiver<bool>,
    cutoff: std::time::Duration,
    /// For an agency: each case's bindings after the last step of it read,
    /// so that each step is read once.
    bindings: HashMap<String, KeptBindings>,
    /// Counts uses of `bindings`, to forget the one used least lately.
    used: u64,
}

/// A case's bindings as a watch last folded them.
struct KeptBindings {
    /// The sequence of the last step folded.
    through: u64,
    bindings: HashMap<String, String>,
    /// When it was last used ([`Watch::used`]).
    used: u64,
}

/// History entries a watch reads at once.
const WATCH_READ_CHUNK: usize = 64;

/// How many cases' bindings a watch keeps; past it the one used least lately
/// is forgotten, and read again from its start when it next moves.
const WATCH_BINDINGS_KEPT: usize = 4096;

impl Watch {
    /// Queues steps until the client goes away (`None`), or until it must
    /// stop: the status to end the stream with, which carries the cursor to
    /// resume from. The engine never waits on a watcher: the feed is read
    /// from the store, and the durable position is a `watch` value.
    async fn run(
        mut self,
        tx: &tokio::sync::mpsc::Sender<proto::WatchEventsResponse>,
    ) -> Option<Status> {
        loop {
            if *self.stopping.borrow() {
                return Some(self.stopping_status());
            }
            let items = match self.engine.feed(self.position, FEED_BATCH) {
                Ok(items) => items,
                Err(e) => return Some(self.failed(e)),
            };
            if items.is_empty() {
                tokio::select! {
                    changed = self.durable.changed() => {
                        if changed.is_err() {
                            return Some(self.stopping_status());
                        }
                    }
                    () = stopped(&mut self.stopping) => return Some(self.stopping_status()),
                    () = tx.closed() => return None,
                }
                continue;
            }
            let mut entries = match self.entries(&items) {
                Ok(entries) => entries,
                Err(e) => return Some(self.failed(e)),
            };
            for item in items {
                let Some(entry) = entries.remove(&(item.case_id, item.sequence)) else {
                    // Not a case the principal holds a role in.
                    self.position = item.position;
                    continue;
                };
                let message = proto::WatchEventsResponse {
                    history_entry: Some(entry),
                    cursor: item.position.to_string(),
                };
                tokio::select! {
                    biased;
                    sent = tx.send_timeout(message, self.cutoff) => match sent {
                        Ok(()) => self.position = item.position,
                        Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                            // The steps queued before this one are still
                            // delivered, then this status: its cursor is
                            // where they end.
                            return Some(status(
                                Code::ResourceExhausted,
                                "slow-watcher",
                                format!(
                                    "the watcher left a step unread for {} ms; resume from cursor {}",
                                    self.cutoff.as_millis(),
                                    self.position
                                ),
                                &[("cursor", self.position.to_string())],
                            ));
                        }
                        Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return None,
                    },
                    () = stopped(&mut self.stopping) => return Some(self.stopping_status()),
                }
            }
        }
    }

    /// The history entries of `items` the principal may see, by (case,
    /// sequence): each case read once for the batch, not once per step.
    ///
    /// An agency sees a step if it held a role in the case just before it or
    /// just after it: the step that binds it, the steps while it holds a
    /// role, and the step that takes its last role away. That depends on the
    /// history alone, not on who holds the roles when the watch is read, so
    /// a watch resumed from a cursor delivers exactly the steps an unbroken
    /// one would have (with the bindings of the time of reading, an agency
    /// bound away lost the step that did it, and one bound later got steps
    /// from before it held any role, depending on when it reconnected).
    fn entries(
        &mut self,
        items: &[crate::store::FeedItem],
    ) -> Result<HashMap<(String, u64), proto::HistoryEntry>, EngineError> {
        let mut wanted: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
        for item in items {
            wanted
                .entry(item.case_id.as_str())
                .or_default()
                .insert(item.sequence);
        }
        let mut entries = HashMap::new();
        // An agency's view needs the bindings before each step: they are
        // folded from the case's first step, and kept for its next ones.
        let principal = self.principal.clone();
        let agency = principal.agency().filter(|_| !principal.reads_all());
        for (id, sequences) in wanted {
            let (Some(&first), Some(&last)) = (sequences.first(), sequences.last()) else {
                continue;
            };
            let (folded, mut bindings) = match agency {
                Some(_) => self
                    .bindings
                    .remove(id)
                    .map(|kept| (kept.through, kept.bindings))
                    .filter(|(through, _)| *through < first)
                    .unwrap_or_default(),
                None => (first - 1, HashMap::new()),
            };
            let mut found = BTreeSet::new();
            // Read a chunk at a time: a long history of large steps is never
            // held whole.
            let mut from = folded + 1;
            while from <= last {
                let chunk = usize::try_from(last - from + 1)
                    .unwrap_or(usize::MAX)
                    .min(WATCH_READ_CHUNK);
                let read = self.engine.store().history(id, from, chunk)?;
                let Some(end) = read.last().map(|e| e.sequence) else {
                    break;
                };
                for entry in read {
                    if entry.sequence > last {
                        break;
                    }
                    let seen = agency.is_none_or(|agency| {
                        let held_before = bindings.values().any(|b| b == agency);
                        bindings.extend(entry.bindings_changed.clone());
                        held_before || bindings.values().any(|b| b == agency)
                    });
                    if sequences.contains(&entry.sequence) {
                        found.insert(entry.sequence);
                        if seen {
                            entries.insert((id.to_owned(), entry.sequence), entry);
                        }
                    }
                }
                from = end + 1;
            }
            if agency.is_some() {
                self.keep_bindings(id, last, bindings);
            }
            if let Some(missing) = sequences.iter().find(|s| !found.contains(*s)) {
                return Err(EngineError::Store(crate::store::StoreError::Corrupt(
                    format!(
                        "the event feed names step {missing} of case `{id}`, which has no such history entry"
                    ),
                )));
            }
        }
        Ok(entries)
    }

    /// Keeps a case's folded bindings for its next steps. Past
    /// [`WATCH_BINDINGS_KEPT`] cases the one used least lately is forgotten:
    /// a burst of steps on many small cases (one agency's own) must not make
    /// every watch fold a long case again.
    fn keep_bindings(&mut self, id: &str, through: u64, bindings: HashMap<String, String>) {
        self.used += 1;
        if self.bindings.len() >= WATCH_BINDINGS_KEPT
            && let Some(oldest) = self
                .bindings
                .iter()
                .min_by_key(|(_, kept)| kept.used)
                .map(|(id, _)| id.clone())
        {
            self.bindings.remove(&oldest);
        }
        self.bindings.insert(
            id.to_owned(),
            KeptBindings {
                through,
                bindings,
                used: self.used,
            },
        );
    }

    fn stopping_status(&self) -> Status {
        status(
            Code::Unavailable,
            "server-stopping",
            format!(
                "the server is stopping; resume from cursor {}",
                self.position
            ),
            &[("cursor", self.position.to_string())],
        )
    }

    /// A storage failure ends the stream rather than skip a step.
    fn failed(&self, e: EngineError) -> Status {
        match e {
            EngineError::Stopped => self.stopping_status(),
            e => status(
                Code::Internal,
                "storage",
                format!("{e}; resume from cursor {}", self.position),
                &[("cursor", self.position.to_string())],
            ),
        }
    }
}

/// Completes when the server starts stopping (or can no longer say).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Validations of submitted sources running at once (one).
static VALIDATIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// At most this many diagnostics go in a ValidateWorkflow answer: a source
/// of a megabyte can make tens of thousands, more than clients take in one
/// message (4 MiB by default).
const MAX_DIAGNOSTICS: usize = 1000;

#[tonic::async_trait]
impl DefinitionsService for Api {
    async fn deploy_workflow(
        &self,
        request: Request<proto::DeployWorkflowRequest>,
    ) -> Result<Response<proto::DeployWorkflowResponse>, Status> {
        if principal(&request)? != Principal::Admin {
            return Err(status(
                Code::PermissionDenied,
                "admin-only",
                "only the admin deploys workflows",
                &[],
            ));
        }
        let r = request.into_inner();
        let options = DeployOptions {
            require_migration_check: r.require_migration_check,
        };
        let deployed = self
            .engine
            .deploy_with(r.source, options)
            .await
            .map_err(engine_status)?;
        let version = self
            .engine
            .workflow_versions()
            .map_err(engine_status)?
            .into_iter()
            .find(|v| v.name == deployed.name && v.version == deployed.version);
        Ok(Response::new(proto::DeployWorkflowResponse {
            workflow_version: version,
            created: deployed.created,
        }))
    }

    async fn validate_workflow(
        &self,
        request: Request<proto::ValidateWorkflowRequest>,
    ) -> Result<Response<proto::ValidateWorkflowResponse>, Status> {
        principal(&request)?;
        // A source of a megabyte can take seconds to check: checks run one
        // at a time, off the threads that answer other calls, so that a few
        // at once cannot hold up every agency's calls.
        let turn = turn(&VALIDATIONS).await?;
        let engine = self.engine.clone();
        let source = request.into_inner().source;
        // The turn goes with the check, not with the call: a client that
        // cancels does not end the check, and must not free its turn.
        let diagnostics = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            engine.check_source(&source)
        })
        .await
        .map_err(|e| status(Code::Internal, "validate-panicked", e.to_string(), &[]))?;
        let valid = !diagnostics.iter().any(Diagnostic::is_error);
        let total = diagnostics.len();
        let mut diagnostics: Vec<proto::Diagnostic> = diagnostics
            .into_iter()
            .take(MAX_DIAGNOSTICS)
            .map(|d| proto::Diagnostic {
                line: d.line as u32,
                column: d.col as u32,
                severity: if d.is_error() {
                    "error".into()
                } else {
                    "warning".into()
                },
                code: d.code.to_owned(),
                message: d.message,
                hint: d.hint.unwrap_or_default(),
                path: d.path,
            })
            .collect();
        if total > MAX_DIAGNOSTICS {
            diagnostics.push(proto::Diagnostic {
                line: 0,
                column: 0,
                severity: "warning".into(),
                code: "too-many-problems".into(),
                message: format!(
                    "{} more problems are not listed: the first {MAX_DIAGNOSTICS} are",
                    total - MAX_DIAGNOSTICS
                ),
                hint: "fix these and validate again".into(),
                path: String::new(),
            });
        }
        Ok(Response::new(proto::ValidateWorkflowResponse {
            valid,
            diagnostics,
        }))
    }

    async fn list_workflows(
        &self,
        request: Request<proto::ListWorkflowsRequest>,
    ) -> Result<Response<proto::ListWorkflowsResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let size = page_size(r.page_size, 50)?;
        let listing = ["ListWorkflows", principal.name()];
        let after = self.page_tokens.open(&listing, &r.page_token)?;
        let mut current: std::collections::BTreeMap<String, proto::WorkflowVersion> =
            std::collections::BTreeMap::new();
        for v in self.engine.workflow_versions().map_err(engine_status)? {
            if current.get(&v.name).is_none_or(|c| c.version < v.version) {
                current.insert(v.name.clone(), v);
            }
        }
        let library = self.engine.library();
        let rest: Vec<proto::WorkflowSummary> = current
            .into_values()
            .filter(|v| v.name > after)
            .map(|v| proto::WorkflowSummary {
                // By digest: a version deployed earlier, no longer in the
                // workflows folder, has its title too.
                title: library
                    .pinned(&v.name, &v.digest)
                    .map(|w| w.def.title.clone())
                    .unwrap_or_default(),
                name: format!("workflows/{}", v.name),
                version: v.version,
                digest: v.digest,
                deploy_time: v.deploy_time,
            })
            .collect();
        let more = rest.len() > size;
        let workflows: Vec<_> = rest.into_iter().take(size).collect();
        let next_page_token = match workflows.last() {
            Some(last) if more => self
                .page_tokens
                .seal(&listing, last.name.trim_start_matches("workflows/"))?,
            _ => String::new(),
        };
        Ok(Response::new(proto::ListWorkflowsResponse {
            workflows,
            next_page_token,
        }))
    }

    async fn get_workflow(
        &self,
        request: Request<proto::GetWorkflowRequest>,
    ) -> Result<Response<proto::GetWorkflowResponse>, Status> {
        principal(&request)?;
        let version = self.workflow_version(&request.into_inner().name)?;
        Ok(Response::new(proto::GetWorkflowResponse {
            workflow_version: Some(version),
        }))
    }

    async fn render_workflow(
        &self,
        request: Request<proto::RenderWorkflowRequest>,
    ) -> Result<Response<proto::RenderWorkflowResponse>, Status> {
        principal(&request)?;
        let r = request.into_inner();
        let version = self.workflow_version(&r.name)?;
        let library = self.engine.library();
        let compiled = library.versions.get(&version.digest).ok_or_else(|| {
            status(
                Code::FailedPrecondition,
                "version-not-compiled",
                format!(
                    "version {} of `{}` no longer validates",
                    version.version, version.name
                ),
                &[],
            )
        })?;
        let format = proto::RenderFormat::try_from(r.format).map_err(|_| {
            invalid(
                "bad-format",
                "format",
                format!(
                    "format {} is not a RenderFormat (1 DOT, 2 MERMAID, 3 SVG)",
                    r.format
                ),
            )
        })?;
        let (format, content_type) = match format {
            proto::RenderFormat::Mermaid => (render::Format::Mermaid, "text/vnd.mermaid"),
            proto::RenderFormat::Svg => (render::Format::Svg, "image/svg+xml"),
            proto::RenderFormat::Dot | proto::RenderFormat::Unspecified => {
                (render::Format::Dot, "text/vnd.graphviz")
            }
        };
        // Laying out a picture takes up to a second or two: not on one of the
        // threads that serve every call.
        let compiled = Arc::clone(compiled);
        let content = tokio::task::spawn_blocking(move || render::render(&compiled.def, format))
            .await
            .map_err(|e| status(Code::Internal, "render-panicked", e.to_string(), &[]))?;
        Ok(Response::new(proto::RenderWorkflowResponse {
            content,
            content_type: content_type.into(),
        }))
    }
}

impl Api {
    /// `workflows/{w}` (current) or `workflows/{w}/versions/{n}`.
    fn workflow_version(&self, name: &str) -> Result<proto::WorkflowVersion, Status> {
        let bad = || {
            invalid(
                "bad-resource-name",
                "name",
                format!(
                    "`{name}` is not a workflow name: expected `workflows/{{workflow}}` or `workflows/{{workflow}}/versions/{{version}}`"
                ),
            )
        };
        let rest = name.strip_prefix("workflows/").ok_or_else(bad)?;
        let (workflow, version) = match rest.split_once("/versions/") {
            // A number past any version is no version, not a malformed name.
            Some((w, v)) => (w, Some(v.parse::<u64>().map_err(|_| bad())?)),
            None => (rest, None),
        };
        if workflow.is_empty() || workflow.contains('/') {
            return Err(bad());
        }
        self.engine
            .workflow_versions()
            .map_err(engine_status)?
            .into_iter()
            .filter(|v| v.name == workflow && version.is_none_or(|n| u64::from(v.version) == n))
            .max_by_key(|v| v.version)
            .ok_or_else(|| {
                status(
                    Code::NotFound,
                    "workflow-not-found",
                    format!("no workflow `{name}`"),
                    &[],
                )
            })
    }
}

/// A workflow named bare (`gaozhi_chengnuo`) or as the resource name
/// `ListWorkflows` shows (`workflows/gaozhi_chengnuo`), by its bare name.
pub fn bare_workflow_name(given: &str) -> String {
    given.strip_prefix("workflows/").unwrap_or(given).to_owned()
}

/// A request's `field` (variables, payload) as JSON. NaN and the
/// infinities have no JSON form (they would be stored as null), so they are
/// refused, naming where they are.
fn struct_to_map(
    s: Option<prost_types::Struct>,
    field: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, Status> {
    fn non_finite(v: &prost_types::Value, path: String) -> Option<String> {
        use prost_types::value::Kind;
        match &v.kind {
            Some(Kind::NumberValue(n)) if !n.is_finite() => Some(path),
            Some(Kind::ListValue(l)) => l
                .values
                .iter()
                .enumerate()
                .find_map(|(i, v)| non_finite(v, format!("{path}[{i}]"))),
            Some(Kind::StructValue(s)) => in_struct(s, &path),
            _ => None,
        }
    }
    fn in_struct(s: &prost_types::Struct, path: &str) -> Option<String> {
        s.fields
            .iter()
            .find_map(|(k, v)| non_finite(v, format!("{path}.{k}")))
    }
    if let Some(path) = s.as_ref().and_then(|s| in_struct(s, field)) {
        return Err(invalid(
            "non-finite-number",
            &path,
            format!("`{path}` is not a finite number (NaN and infinities have no JSON form)"),
        ));
    }
    Ok(records::from_struct(s.as_ref()))
}

/// Steps a watch stream holds for a client that has not taken them yet.
const WATCH_QUEUE: usize = 64;
/// Feed items a watch reads at a time (their entries are held, decoded, while
/// it waits to queue them, so this bounds a watcher's memory with the queue).
const FEED_BATCH: usize = 64;

#[tonic::async_trait]
impl CasesService for Api {
    type WatchEventsStream = WatchStream;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let principal = principal(&request)?;
        let cursor = request.into_inner().cursor;
        let durable = self.engine.durable_position();
        let now = *durable.borrow();
        let position: u64 = if cursor.is_empty() {
            now
        } else {
            // Positions only grow and a cursor is issued only for a durable
            // step, so one ahead of the feed is not this server's (resuming
            // from it would silently skip the steps up to it).
            cursor.parse().ok().filter(|&c| c <= now).ok_or_else(|| {
                invalid(
                    "bad-cursor",
                    "cursor",
                    format!("`{cursor}` is not a cursor this server issued"),
                )
            })?
        };
        let caller_watch = self.watchers.admit(principal.name()).ok_or_else(|| {
            status(
                Code::ResourceExhausted,
                "too-many-watches",
                format!(
                    "`{}` already has {MAX_WATCHES_PER_CALLER} watches open, the most one caller may; close one (a watch resumes from its cursor)",
                    principal.name()
                ),
                &[],
            )
        })?;
        let (tx, steps) = tokio::sync::mpsc::channel(WATCH_QUEUE);
        let (end_tx, end) = tokio::sync::oneshot::channel();
        let watch = Watch {
            engine: self.engine.clone(),
            principal,
            position,
            durable,
            stopping: self.stopping.clone(),
            cutoff: self.watch_cutoff,
            bindings: HashMap::new(),
            used: 0,
        };
        let running = Counted::new(&self.watchers.tasks);
        let (caller, started) = (watch.principal.name().to_owned(), std::time::Instant::now());
        tokio::spawn(async move {
            let _running = running;
            if let Some(status) = watch.run(&tx).await {
                super::request_log::stream_ended(
                    "/govflow.v1.CasesService/WatchEvents",
                    &caller,
                    &status,
                    started,
                );
                let _ = end_tx.send(status);
            }
            // Dropping `tx` ends the stream after the steps it holds and the status.
        });
        let mut response = Response::new(WatchStream {
            steps,
            end: Some(end),
            _open: Counted::new(&self.watchers.streams),
            _caller: caller_watch,
        });
        // Where the stream starts, in its headers: a watch opened "from now"
        // that is cut before its first step can resume from there, without
        // missing the steps made in between.
        if let Ok(start) = position.to_string().parse() {
            response.metadata_mut().insert("cursor", start);
        }
        Ok(response)
    }

    async fn create_case(
        &self,
        request: Request<proto::CreateCaseRequest>,
    ) -> Result<Response<proto::CreateCaseResponse>, Status> {
        let agency = writer_agency(&principal(&request)?)?;
        let mut r = request.into_inner();
        r.workflow = bare_workflow_name(&r.workflow);
        if r.workflow.is_empty() {
            return Err(invalid("missing-field", "workflow", "workflow is required"));
        }
        let case = self
            .engine
            .start(StartRequest {
                request_id: r.request_id,
                case_id: r.case_id,
                workflow: r.workflow,
                agency,
                bindings: r.bindings.into_iter().collect(),
                variables: struct_to_map(r.variables, "variables")?,
            })
            .await
            .map_err(engine_status)?;
        Ok(Response::new(proto::CreateCaseResponse {
            case: Some(case),
        }))
    }

    async fn fire_event(
        &self,
        request: Request<proto::FireEventRequest>,
    ) -> Result<Response<proto::FireEventResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let id = case_id(&r.case, "case")?;
        // Existence is checked before the caller's right to write, so a case
        // it cannot see stays NOT_FOUND. For an agency the engine checks it,
        // from the case it holds in memory.
        if !matches!(principal, Principal::Agency(_)) {
            visible(&self.engine, &principal, &id)?;
        }
        let agency = writer_agency(&principal)?;
        if r.event.is_empty() {
            return Err(invalid("missing-field", "event", "event is required"));
        }
        let case = self
            .engine
            .fire_as_party(FireRequest {
                request_id: r.request_id,
                case_id: id,
                event: r.event,
                agency,
                payload: struct_to_map(r.payload, "payload")?,
                expected_sequence: r.expected_sequence,
            })
            .await
            .map_err(engine_status)?;
        Ok(Response::new(proto::FireEventResponse { case: Some(case) }))
    }

    async fn get_case(
        &self,
        request: Request<proto::GetCaseRequest>,
    ) -> Result<Response<proto::GetCaseResponse>, Status> {
        let principal = principal(&request)?;
        let id = case_id(&request.get_ref().name, "name")?;
        let case = visible(&self.engine, &principal, &id)?;
        Ok(Response::new(proto::GetCaseResponse { case: Some(case) }))
    }

    async fn list_cases(
        &self,
        request: Request<proto::ListCasesRequest>,
    ) -> Result<Response<proto::ListCasesResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let size = page_size(r.page_size, 50)?;
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let workflow = bare_workflow_name(&r.workflow);
        if (!r.state.is_empty() || !r.variable_name.is_empty()) && workflow.is_empty() {
            return Err(invalid(
                "missing-field",
                "workflow",
                "filtering by state or variable needs a workflow",
            ));
        }
        if r.variable_name.is_empty() != r.variable_value.is_empty() {
            return Err(invalid(
                "missing-field",
                "variable_value",
                "variable_name and variable_value go together",
            ));
        }
        let filter = CaseFilter {
            workflow: non_empty(workflow),
            state: non_empty(r.state),
            agency: principal.agency().map(str::to_owned),
            variable: non_empty(r.variable_name).map(|n| (n, r.variable_value)),
        };
        check_filter(
            &self.engine.library(),
            filter.workflow.as_deref(),
            filter.state.as_deref(),
            filter.variable.as_ref().map(|(name, _)| name.as_str()),
        )?;
        let (variable_name, variable_value) = filter
            .variable
            .as_ref()
            .map_or(("", ""), |(n, v)| (n.as_str(), v.as_str()));
        let due_before = r
            .due_before
            .as_ref()
            .map(|t| request_time(t, "due_before"))
            .transpose()?;
        let due = due_before.map(|t| t.to_rfc3339()).unwrap_or_default();
        let listing = [
            "ListCases",
            principal.name(),
            filter.workflow.as_deref().unwrap_or(""),
            filter.state.as_deref().unwrap_or(""),
            variable_name,
            variable_value,
            &due,
        ];
        let position = self.page_tokens.open(&listing, &r.page_token)?;
        let mut page = match due_before {
            Some(before) => self.engine.list_due(&filter, before, &position, size),
            None => self.engine.list(&filter, &position, size),
        }
        .map_err(engine_status)?;
        fit_page(&mut page);
        Ok(Response::new(proto::ListCasesResponse {
            cases: page.cases,
            next_page_token: self.page_tokens.seal(&listing, &page.next_page_token)?,
        }))
    }

    async fn list_inbox(
        &self,
        request: Request<proto::ListInboxRequest>,
    ) -> Result<Response<proto::ListInboxResponse>, Status> {
        let principal = principal(&request)?;
        let Some(agency) = principal.agency().map(str::to_owned) else {
            return Ok(Response::new(proto::ListInboxResponse::default()));
        };
        let r = request.into_inner();
        let size = page_size(r.page_size, 50)?;
        let listing = ["ListInbox", agency.as_str()];
        let mut page = self
            .engine
            .inbox(
                &agency,
                &self.page_tokens.open(&listing, &r.page_token)?,
                size,
            )
            .map_err(engine_status)?;
        fit_page(&mut page);
        let library = self.engine.library();
        let items = page
            .cases
            .into_iter()
            .map(|case| {
                let roles: Vec<&String> = case
                    .bindings
                    .iter()
                    .filter(|(_, a)| **a == agency)
                    .map(|(r, _)| r)
                    .collect();
                let mut events: Vec<String> = Vec::new();
                if let Some(state) = library
                    .pinned(&case.workflow, &case.workflow_digest)
                    .and_then(|w| w.state(&case.state))
                {
                    for t in &state.transitions {
                        if t.roles.iter().any(|r| roles.contains(&r)) && !events.contains(&t.event)
                        {
                            events.push(t.event.clone());
                        }
                    }
                    if let Some(cs) = &state.countersign
                        && cs.roles.iter().any(|r| roles.contains(&r))
                    {
                        events.extend([cs.sign_event.clone(), cs.reject_event.clone()]);
                    }
                }
                let deadline = records::running_deadline(&case).copied();
                proto::InboxItem {
                    case: Some(case),
                    events,
                    deadline,
                }
            })
            .collect();
        Ok(Response::new(proto::ListInboxResponse {
            items,
            next_page_token: self.page_tokens.seal(&listing, &page.next_page_token)?,
        }))
    }
}

fn audit_status(e: crate::audit::AuditError) -> Status {
    use crate::audit::AuditError as A;
    match e {
        A::NotFound(id) => status(
            Code::NotFound,
            "case-not-found",
            format!("no case `{id}`"),
            &[],
        ),
        e @ A::OutOfRange { .. } => status(Code::OutOfRange, "out-of-range", e.to_string(), &[]),
        e @ A::UnknownWorkflow { .. } => invalid("unknown-workflow", "workflow", e.to_string()),
        e @ A::UnknownState { .. } => invalid("unknown-state", "state", e.to_string()),
        // INTERNAL is kept for storage failures.
        e @ (A::Store(_) | A::Sled(_)) => status(Code::Internal, "storage", e.to_string(), &[]),
        other => status(
            Code::FailedPrecondition,
            "audit-failed",
            other.to_string(),
            &[],
        ),
    }
}

/// Audits (verify, replay, time travel, export, migration check) running at
/// once. Each may read whole histories, which any agency can make large: a
/// bound on how many run together bounds the memory they take.
static AUDITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// A turn of `limit` (validations, audits), to be held by the blocking task
/// that does the work: a client that cancels does not end that task.
async fn turn(
    limit: &'static tokio::sync::Semaphore,
) -> Result<tokio::sync::SemaphorePermit<'static>, Status> {
    limit
        .acquire()
        .await
        .map_err(|e| status(Code::Unavailable, "stopped", e.to_string(), &[]))
}

/// Runs an audit over the engine's store off the async threads.
async fn audit_blocking<T: Send + 'static>(
    engine: &Engine,
    work: impl FnOnce(
        &crate::audit::StoreSource<'_>,
        &crate::lang::validate::Library,
    ) -> Result<T, crate::audit::AuditError>
    + Send
    + 'static,
) -> Result<T, Status> {
    let engine = engine.clone();
    let turn = turn(&AUDITS).await?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let library = engine.library();
        work(
            &crate::audit::StoreSource(engine.store().as_ref()),
            &library,
        )
    })
    .await
    .map_err(|e| status(Code::Internal, "audit-panicked", e.to_string(), &[]))?
    .map_err(audit_status)
}

/// A timestamp from a request, checked.
fn request_time(
    t: &prost_types::Timestamp,
    field: &str,
) -> Result<chrono::DateTime<chrono::Utc>, Status> {
    u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|n| chrono::DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| {
            invalid(
                "bad-time",
                field,
                format!("{field} is not a valid timestamp"),
            )
        })
}

/// Export lines in messages of about this many bytes.
const EXPORT_CHUNK_BYTES: usize = 256 * 1024;

/// Where `audit::export` writes when it serves ExportHistory: complete
/// lines are gathered into messages and sent down the stream. A client that
/// goes away, or the server stopping, ends the export (as a write error).
/// How long an export waits for its client to read before it gives up (the
/// stream then ends without the export's end line, which shows it cut short).
const EXPORT_UNREAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

struct ExportStream {
    tx: tokio::sync::mpsc::Sender<Result<proto::ExportHistoryResponse, Status>>,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Bytes of a line not yet complete.
    partial: Vec<u8>,
    lines: Vec<String>,
    bytes: usize,
}

impl ExportStream {
    /// Queues a message for the client, waiting at most
    /// [`EXPORT_UNREAD_WAIT`] for room: an export holds one of the few audit
    /// turns, and a client that stops reading must not keep it.
    fn send(
        &mut self,
        message: Result<proto::ExportHistoryResponse, Status>,
    ) -> std::io::Result<()> {
        let give_up = std::time::Instant::now() + EXPORT_UNREAD_WAIT;
        let mut message = message;
        loop {
            match self.tx.try_send(message) {
                Ok(()) => return Ok(()),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "the client went away",
                    ));
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(unsent)) => {
                    if std::time::Instant::now() > give_up {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the client left the export unread",
                        ));
                    }
                    message = unsent;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }

    fn send_lines(&mut self, skipped_records: Vec<proto::SkippedRecord>) -> std::io::Result<()> {
        if *self.stopping.borrow() {
            let bye = status(
                Code::Unavailable,
                "server-stopping",
                "the server is stopping; export again",
                &[],
            );
            let _ = self.send(Err(bye));
            return Err(std::io::Error::other("the server is stopping"));
        }
        let json_lines = std::mem::take(&mut self.lines);
        self.bytes = 0;
        self.send(Ok(proto::ExportHistoryResponse {
            json_lines,
            skipped_records,
        }))
    }

    /// Sends what is left, with the records the export left out.
    fn finish(mut self, skipped: Vec<crate::audit::SkippedRecord>) {
        let skipped: Vec<proto::SkippedRecord> = skipped
            .into_iter()
            .map(|s| proto::SkippedRecord {
                case_id: s.case_id,
                sequence: s.sequence,
                reason: s.reason,
            })
            .collect();
        if !self.lines.is_empty() || !skipped.is_empty() {
            let _ = self.send_lines(skipped);
        }
    }
}

impl std::io::Write for ExportStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let line = String::from_utf8(std::mem::take(&mut self.partial))
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            self.bytes += line.len();
            self.lines.push(line);
            if self.bytes >= EXPORT_CHUNK_BYTES {
                self.send_lines(Vec::new())?;
            }
        }
        self.partial.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tonic::async_trait]
impl AuditService for Api {
    type ExportHistoryStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::ExportHistoryResponse, Status>>;

    async fn export_history(
        &self,
        request: Request<proto::ExportHistoryRequest>,
    ) -> Result<Response<Self::ExportHistoryStream>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let case = if r.case.is_empty() {
            None
        } else {
            let id = case_id(&r.case, "case")?;
            visible(&self.engine, &principal, &id)?;
            Some(id)
        };
        let since = r
            .start_time
            .as_ref()
            .map(|t| request_time(t, "start_time"))
            .transpose()?;
        let until = r
            .end_time
            .as_ref()
            .map(|t| request_time(t, "end_time"))
            .transpose()?;
        if let (Some(since), Some(until)) = (since, until)
            && until <= since
        {
            return Err(invalid(
                "bad-time-range",
                "end_time",
                "end_time must come after start_time",
            ));
        }
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let workflow = bare_workflow_name(&r.workflow);
        let library = self.engine.library();
        check_filter(
            &library,
            non_empty(workflow.clone()).as_deref(),
            non_empty(r.state.clone()).as_deref(),
            None,
        )?;
        let filter = crate::audit::ExportFilter {
            case,
            workflow: non_empty(workflow),
            agency: non_empty(r.agency),
            state: non_empty(r.state),
            since,
            until,
            visible_to: (!principal.reads_all()).then(|| principal.name().to_owned()),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut out = ExportStream {
            tx,
            stopping: self.stopping.clone(),
            partial: Vec::new(),
            lines: Vec::new(),
            bytes: 0,
        };
        let engine = self.engine.clone();
        let turn = turn(&AUDITS).await?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let source = crate::audit::StoreSource(engine.store().as_ref());
            match crate::audit::export(&source, &filter, &mut out) {
                Ok(summary) => out.finish(summary.skipped),
                // The client went away, or the server is stopping (said).
                Err(crate::audit::AuditError::Write(_)) => {}
                Err(e) => {
                    let _ = out.send(Err(audit_status(e)));
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn check_migration(
        &self,
        request: Request<proto::CheckMigrationRequest>,
    ) -> Result<Response<proto::CheckMigrationResponse>, Status> {
        let principal = principal(&request)?;
        // A check runs the expressions of the source it is given over the
        // stored cases, and expressions have no evaluation budget (cel has no
        // hook for one): a source written to explode would take the server's
        // memory. So it is for those trusted with sources: the admin, who
        // deploys them, and auditors.
        if !principal.reads_all() {
            return Err(status(
                Code::PermissionDenied,
                "auditors-only",
                "a migration check runs the new version's expressions over stored cases: it is for auditors and the admin",
                &[],
            ));
        }
        let source = request.into_inner().source;
        if source.trim().is_empty() {
            return Err(invalid("missing-field", "source", "source is required"));
        }
        let engine = self.engine.clone();
        let turn = turn(&AUDITS).await?;
        let report = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            engine.migration_check(&source, &|case: &proto::Case| sees(&principal, case))
        })
        .await
        .map_err(|e| status(Code::Internal, "audit-panicked", e.to_string(), &[]))?
        .map_err(engine_status)?;
        let (breaking_cases, breaking_cases_total) =
            fitted(report.breaking, |b| proto::MigrationBreak {
                case_id: b.case_id,
                workflow_version: b.version,
                state: b.state,
                sequence: b.sequence,
                kind: break_kind(b.kind).to_owned(),
                reason: b.reason,
            });
        Ok(Response::new(proto::CheckMigrationResponse {
            workflow: report.workflow,
            digest: report.new_digest,
            running_cases: report.running,
            breaking_cases,
            warnings: report.warnings,
            breaking_cases_total,
        }))
    }

    async fn verify_history(
        &self,
        request: Request<proto::VerifyHistoryRequest>,
    ) -> Result<Response<proto::VerifyHistoryResponse>, Status> {
        use crate::audit::VerifyScope;
        let principal = principal(&request)?;
        let r = request.into_inner();
        let scope = if !r.case.is_empty() {
            let id = case_id(&r.case, "case")?;
            visible(&self.engine, &principal, &id)?;
            VerifyScope::Case(id)
        } else if !principal.reads_all() {
            return Err(status(
                Code::PermissionDenied,
                "auditors-only",
                "verifying every case is for auditors and the admin; name a case",
                &[],
            ));
        } else if r.workflow.is_empty() {
            VerifyScope::All
        } else {
            VerifyScope::Workflow(bare_workflow_name(&r.workflow))
        };
        let report = audit_blocking(&self.engine, move |source, _| {
            crate::audit::verify(source, &scope, None)
        })
        .await?;
        let (findings, findings_total) = fitted(report.findings, |f| proto::Finding {
            case_id: f.case_id,
            sequence: f.sequence,
            kind: f.kind.as_str().to_owned(),
            detail: f.detail,
        });
        Ok(Response::new(proto::VerifyHistoryResponse {
            cases: report.cases,
            entries: report.entries,
            findings,
            findings_total,
        }))
    }

    async fn replay_case(
        &self,
        request: Request<proto::ReplayCaseRequest>,
    ) -> Result<Response<proto::ReplayCaseResponse>, Status> {
        let principal = principal(&request)?;
        let id = case_id(&request.get_ref().name, "name")?;
        visible(&self.engine, &principal, &id)?;
        let report = audit_blocking(&self.engine, move |source, library| {
            crate::audit::replay_case(source, library, &id)
        })
        .await?;
        let (divergence_sequence, divergence_reason) = report
            .divergence
            .as_ref()
            .map_or((0, String::new()), |d| (d.sequence, d.reason.clone()));
        let matches = report.matches();
        let (steps, steps_total) = fitted(report.steps, |step| proto::ReplayStep {
            sequence: step.sequence,
            time: Some(records::timestamp(step.time)),
            actor: if step.actor.is_empty() {
                step.actor_kind.to_owned()
            } else {
                format!("{}:{}", step.actor_kind, step.actor)
            },
            event: step.event,
            from_state: step.from_state,
            to_state: step.to_state,
            variables_changed: Some(prost_types::Struct {
                fields: step
                    .variables_changed
                    .iter()
                    .map(|(k, v)| (k.clone(), records::to_value(v)))
                    .collect(),
            }),
            calendar_version: step.calendar_version.unwrap_or_default(),
        });
        Ok(Response::new(proto::ReplayCaseResponse {
            matches,
            steps,
            divergence_sequence,
            divergence_reason,
            steps_total,
        }))
    }

    async fn get_case_at(
        &self,
        request: Request<proto::GetCaseAtRequest>,
    ) -> Result<Response<proto::GetCaseAtResponse>, Status> {
        use crate::audit::At;
        let principal = principal(&request)?;
        let r = request.into_inner();
        let id = case_id(&r.name, "name")?;
        let current = visible(&self.engine, &principal, &id)?;
        let at = match r.at {
            Some(proto::get_case_at_request::At::Sequence(n)) => At::Sequence(n),
            Some(proto::get_case_at_request::At::Time(t)) => At::Time(request_time(&t, "time")?),
            None => return Err(invalid("missing-field", "at", "give a sequence or a time")),
        };
        let found = audit_blocking(&self.engine, move |source, library| {
            crate::audit::case_at(source, library, &id, at)
        })
        .await?;
        Ok(Response::new(proto::GetCaseAtResponse {
            case: Some(records::case(
                &found.case,
                current.workflow_version,
                found.head_hash,
            )),
        }))
    }

    async fn list_history_entries(
        &self,
        request: Request<proto::ListHistoryEntriesRequest>,
    ) -> Result<Response<proto::ListHistoryEntriesResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let id = case_id(&r.parent, "parent")?;
        visible(&self.engine, &principal, &id)?;
        let size = page_size(r.page_size, 100)?;
        let listing = ["ListHistoryEntries", principal.name(), id.as_str()];
        let position = self.page_tokens.open(&listing, &r.page_token)?;
        let from: u64 = if position.is_empty() {
            1
        } else {
            position.parse().map_err(|_| {
                invalid(
                    "bad-page-token",
                    "page_token",
                    "page_token was not issued by this server",
                )
            })?
        };
        let mut entries = self
            .engine
            .store()
            .history(&id, from, size + 1)
            .map_err(|e| engine_status(e.into()))?;
        let kept = size.min(fitting(&entries));
        let next_page_token = if entries.len() > kept {
            self.page_tokens
                .seal(&listing, &(from + kept as u64).to_string())?
        } else {
            String::new()
        };
        entries.truncate(kept);
        Ok(Response::new(proto::ListHistoryEntriesResponse {
            history_entries: entries,
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Regression: a deploy refused for one problem said "(1 problems)".
    #[test]
    fn a_refused_deploy_counts_its_problems_in_words() {
        let problem = |message: &str| {
            Diagnostic::at(
                std::path::Path::new("w.ron"),
                crate::lang::locate::LineCol { line: 3, col: 5 },
                "unknown-state",
                message.to_owned(),
            )
        };
        let one = diagnostics_status(&[problem("no state `x`")]);
        assert!(
            one.message().starts_with(
                "the workflow does not validate (1 problem); first: 3:5: no state `x`"
            ),
            "{}",
            one.message()
        );
        let two = diagnostics_status(&[problem("a"), problem("b")]);
        assert!(two.message().contains("(2 problems)"), "{}", two.message());
    }

    /// Regression: a page token was the position in hex behind an unkeyed
    /// digest of the listing, so a caller could read it (a listing by
    /// deadline cut short on another agency's timer showed that case's id
    /// and deadline) and make up its own.
    #[test]
    fn a_page_token_hides_its_position_and_opens_only_for_its_listing() {
        let tokens = PageTokens::new(&[7; 32]);
        let listing = ["ListCases", "hebei.sjz.tax", "", "", "", "", "2026"];
        let position = r#"["2026-11-28T19:58:31Z","secret-housing-01995","1:expiry"]"#;
        let token = tokens.seal(&listing, position).expect("sealed");
        assert_eq!(tokens.open(&listing, &token).expect("opens"), position);
        let bytes = hex::decode(&token).expect("hex");
        for clear in [
            position.as_bytes(),
            b"secret-housing",
            hex::encode(position).as_bytes(),
        ] {
            assert!(!bytes.windows(clear.len()).any(|w| w == clear));
            assert!(!token.as_bytes().windows(clear.len()).any(|w| w == clear));
        }
        let refused = |token: &str, listing: &[&str], tokens: &PageTokens| {
            let status = tokens.open(listing, token).expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains("not issued by this server"));
        };
        // Another caller's listing, another store's key, a digit changed,
        // cut short, and the earlier, unsealed form.
        let mut theirs = listing;
        theirs[1] = "hebei.sjz.water";
        refused(&token, &theirs, &tokens);
        refused(&token, &listing, &PageTokens::new(&[8; 32]));
        let last = if token.ends_with('0') { "1" } else { "0" };
        refused(
            &format!("{}{last}", &token[..token.len() - 1]),
            &listing,
            &tokens,
        );
        refused(&token[..20], &listing, &tokens);
        refused(&hex::encode(position), &listing, &tokens);
        // Regression: a token's length told the length of the position,
        // and so of another agency's case id.
        let short = tokens.seal(&listing, r#"["2026-11-28T19:58:31Z","a","1:expiry"]"#);
        assert_eq!(short.expect("sealed").len(), token.len());
        // Nothing to go on from is no token at all.
        assert_eq!(tokens.seal(&listing, "").expect("sealed"), "");
        assert_eq!(tokens.open(&listing, "").expect("opens"), "");
    }

    /// What a status repeats of a request is cut to fit a client's trailer
    /// limit, keeping the start and the end, and never inside a character.
    #[test]
    fn a_status_repeating_a_long_request_value_stays_small() {
        let name = format!("cases/{}", "案".repeat(20_000));
        let refused =
            case_id(&name.replacen("cases/", "case/", 1), "name").expect_err("not a case name");
        assert!(
            refused.message().len() <= MESSAGE_BYTES + 3,
            "{}",
            refused.message().len()
        );
        assert!(refused.message().starts_with("`case/案"));
        assert!(refused.message().ends_with("expected `cases/{case}`"));
        assert!(
            refused.details().len() < 2 * (MESSAGE_BYTES + VALUE_BYTES),
            "{}",
            refused.details().len()
        );
        assert_eq!(reason(&refused), "bad-resource-name");
        let long = status(
            Code::NotFound,
            "case-not-found",
            "甲".repeat(5_000),
            &[("case", "乙".repeat(5_000))],
        );
        assert!(long.message().len() <= MESSAGE_BYTES + 3);
        assert!(long.details().len() < 2 * (MESSAGE_BYTES + VALUE_BYTES));
        let diagnostics: Vec<Diagnostic> = (1..=500)
            .map(|line| {
                Diagnostic::at(
                    std::path::Path::new("x.ron"),
                    crate::lang::locate::LineCol { line, col: 1 },
                    "unknown-state",
                    "状".repeat(400),
                )
            })
            .collect();
        let refused = diagnostics_status(&diagnostics);
        assert!(
            refused.details().len() < MESSAGE_BYTES + VIOLATIONS_BYTES + 500,
            "{}",
            refused.details().len()
        );
        assert!(refused.message().contains("500 problems"));
        assert_eq!(shortened("short", 10), "short");
    }

    /// A list is cut where its records pass [`PAGE_BYTES`]: never to
    /// nothing while there is something, and not at all when all fit.
    #[test]
    fn a_list_is_cut_where_its_records_pass_the_page_size() {
        let finding = |n: usize| proto::Finding {
            case_id: format!("case-{n}"),
            sequence: Some(1),
            kind: "altered".into(),
            detail: "x".repeat(1000),
        };
        let many: Vec<_> = (0..2 * PAGE_BYTES / 1000).map(finding).collect();
        let fit = fitting(&many);
        let bytes = |n: usize| many[..n].iter().map(Message::encoded_len).sum::<usize>();
        assert!(fit < many.len(), "{fit}");
        assert!(
            bytes(fit) <= PAGE_BYTES && bytes(fit + 1) > PAGE_BYTES,
            "{fit}"
        );
        assert_eq!(fitting(&many[..10]), 10);
        assert_eq!(fitting::<proto::Finding>(&[]), 0);
        let huge = proto::Finding {
            detail: "x".repeat(PAGE_BYTES + 1),
            ..finding(0)
        };
        assert_eq!(fitting(&[huge.clone(), huge]), 1);
    }
}
