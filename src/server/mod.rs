//! `govflow serve`: the engine behind gRPC, on an embedded default.
//!
//! With no configuration it keeps its data in `govflow-data/`, loads and
//! validates `workflows/`, listens on localhost, and makes sure every agency
//! of the directory (and the admin) has a bearer token, generated on first
//! start into `govflow-data/credentials.toml`, readable by its owner only.

pub mod api;
pub mod auth;
pub mod request_log;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use self::api::Api;
use self::auth::{ADMIN, Credentials};
use crate::calendar::Calendar;
use crate::engine::durable::{Engine, EngineError, EngineOptions, Monotonic, SystemClock};
use crate::lang::load::{self, LoadError};
use crate::store::proto::{
    audit_service_server::AuditServiceServer, cases_service_server::CasesServiceServer,
    definitions_service_server::DefinitionsServiceServer,
};
use crate::store::{SledStore, Store, StoreError};

/// The encoded descriptors of `proto/`, for server reflection.
pub const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/govflow_descriptor.bin"));

/// How often an idle connection is pinged, and how long the answer may take
/// before the connection is closed.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest request accepted; larger ones get RESOURCE_EXHAUSTED naming the limit.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// tonic refuses some requests itself, before govflow sees them, with
/// statuses that carry no `ErrorInfo`. Every status govflow makes carries
/// one, so these are recognised and answered as govflow would:
/// - a request over the decoding limit is OUT_OF_RANGE, where gRPC's own
///   servers answer RESOURCE_EXHAUSTED (department systems look for the
///   latter), and a compressed one that inflates past it is
///   RESOURCE_EXHAUSTED without a reason: both get reason
///   `message-too-large`, with the limit;
/// - a request that does not decode as its protobuf message, or whose
///   gRPC framing is broken (a message cut short, a compressed flag without
///   an encoding, gzip that does not inflate), is INTERNAL, which must never answer bad input:
///   INVALID_ARGUMENT, reason `malformed-message` (`too-deep` past prost's
///   100 levels of nesting). (gRPC's compression document asks for
///   INTERNAL for the compressed flag; a department system reading it would
///   look for a fault in the server, not in its own request.)
fn tonic_refusals_rewritten(
    mut response: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    if headers.contains_key("grpc-status-details-bin") {
        return response;
    }
    let replacement = match headers.get("grpc-status").map(|v| v.as_bytes()) {
        Some(b"11" | b"8") => Some(api::status(
            tonic::Code::ResourceExhausted,
            "message-too-large",
            format!("the request is over the limit of {MAX_MESSAGE_BYTES} bytes (1 MiB)"),
            &[("limit_bytes", MAX_MESSAGE_BYTES.to_string())],
        )),
        Some(b"13") => tonic::Status::from_header_map(headers)
            .map(|refusal| refusal.message().to_owned())
            .filter(|message| {
                message.starts_with("failed to decode")
                    || message.starts_with("Unexpected EOF decoding stream")
                    || message.starts_with("protocol error: received message with")
                    // A compressed request whose gzip is cut short or damaged.
                    || message.starts_with("Error decompressing")
            })
            .map(|message| {
                // prost stops at 100 levels of nested messages: a valid
                // request, only too deep (a `Struct` inside a `Struct` …).
                if message.contains("recursion limit reached") {
                    api::status(
                        tonic::Code::InvalidArgument,
                        "too-deep",
                        "the request nests messages more than 100 levels deep (a payload's objects and lists inside one another count): flatten it".to_owned(),
                        &[("limit_levels", "100".to_owned())],
                    )
                } else {
                    api::status(
                        tonic::Code::InvalidArgument,
                        "malformed-message",
                        format!(
                            "the request is not a well-formed protobuf message of its method: {message}"
                        ),
                        &[],
                    )
                }
            }),
        _ => None,
    };
    if let Some(status) = replacement
        && let Err(e) = status.add_header(headers)
    {
        tracing::warn!("cannot rewrite tonic's refusal of a request: {e}");
    }
    response
}

/// `govflow.toml`: every key optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub workflows: PathBuf,
    /// Agencies that read every case and move none.
    pub auditors: Vec<String>,
    /// Principal (agency id or `admin`) → `sha256:<hex>` of its token. When
    /// empty, tokens are generated into the data folder.
    pub credentials: BTreeMap<String, String>,
    /// Serve over TLS (and, with a client CA, mutual TLS).
    pub tls: Option<TlsConfig>,
    /// `sha256:<hex of a client certificate's DER>` → principal: with mutual
    /// TLS, a caller presenting that certificate is that agency.
    pub client_certificates: BTreeMap<String, String>,
    /// Milliseconds a watcher (WatchEvents) may leave a step unread before it
    /// is cut off with RESOURCE_EXHAUSTED (`slow-watcher`, resumable from the
    /// `cursor` it is given); also how long stopping waits for streams whose
    /// client does not read. At least 1.
    pub watch_cutoff_ms: u64,
    /// Cases the engine keeps decoded in memory (its hot state).
    pub cache_cases: usize,
    /// sled's page cache, in MiB. At least 1.
    pub store_cache_mib: u64,
}

/// [`Config::watch_cutoff_ms`] when the configuration does not set it.
pub const DEFAULT_WATCH_CUTOFF: Duration = Duration::from_secs(10);

/// TLS files, PEM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data: PathBuf::from("govflow-data"),
            workflows: PathBuf::from("workflows"),
            auditors: vec!["hebei.sjz.audit".into()],
            credentials: BTreeMap::new(),
            tls: None,
            client_certificates: BTreeMap::new(),
            watch_cutoff_ms: DEFAULT_WATCH_CUTOFF.as_millis() as u64,
            cache_cases: EngineOptions::default().cache_cases,
            store_cache_mib: crate::store::DEFAULT_CACHE_BYTES >> 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the configuration {path}: {message}")]
    Config { path: String, message: String },
    #[error("reading the TLS {what} {path} (`tls` in the configuration): {message}")]
    TlsFile {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("the data folder {path}: {message}")]
    DataFolder { path: String, message: String },
    #[error(
        "cannot listen on {address}: {message} (is another server there? give another address with --listen, or `listen` in the configuration)"
    )]
    Listen { address: String, message: String },
    #[error("the TLS certificate and key (`tls` in the configuration) cannot be used")]
    TlsInvalid(#[source] tonic::transport::Error),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(
        "the workflows folder: {0}; run govflow from the folder that holds it, or name it with --workflows (or `workflows` in the configuration)"
    )]
    NoWorkflows(#[source] LoadError),
    #[error("the workflows do not validate:\n{0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store at {path} cannot be opened: {source}")]
    StoreOpen {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Credentials(#[from] auth::CredentialError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("the workflows define no agency directory (agencies.ron)")]
    NoDirectory,
    #[error(
        "`auditors` names `{0}`, which is not an agency of the directory (agencies.ron): an auditor is an agency that reads every case"
    )]
    UnknownAuditor(String),
}

/// An address to listen on, `IP:PORT`. A host name is not looked up: which
/// of its addresses would be meant is the operator's to say.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "`{text}` is not an IP address and port: give one such as 127.0.0.1:50051 or 0.0.0.0:50051 (host names such as localhost are not looked up)"
        )
    })
}

fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ServeError> {
        let err = |message: String| ServeError::Config {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        config.check().map_err(err)?;
        // Paths the file sets are read from the file's folder, not from
        // wherever the server happens to be started (a service manager
        // starts it in `/`); those it leaves out keep their defaults.
        let table: toml::Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let folder = path.parent().unwrap_or(Path::new(""));
        let near = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = folder.join(&*p);
            }
        };
        if table.contains_key("data") {
            near(&mut config.data);
        }
        if table.contains_key("workflows") {
            near(&mut config.workflows);
        }
        if let Some(tls) = &mut config.tls {
            near(&mut tls.cert);
            near(&mut tls.key);
            if let Some(ca) = &mut tls.client_ca {
                near(ca);
            }
        }
        Ok(config)
    }

    /// What the types alone do not say.
    fn check(&self) -> Result<(), String> {
        if self.watch_cutoff_ms == 0 {
            return Err("watch_cutoff_ms must be at least 1 (milliseconds)".into());
        }
        if self.store_cache_mib == 0 {
            return Err("store_cache_mib must be at least 1 (MiB)".into());
        }
        if !self.client_certificates.is_empty()
            && self.tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        {
            return Err("client_certificates map client certificates to agencies, but without `[tls]` and its `client_ca` no client is asked for one: add `client_ca` (the authority that signs the clients' certificates), or remove client_certificates".into());
        }
        Ok(())
    }

    /// How long a watcher may leave a step unread.
    pub fn watch_cutoff(&self) -> Duration {
        Duration::from_millis(self.watch_cutoff_ms.max(1))
    }
}

/// A running server's parts, for `serve` and for tests.
pub struct Prepared {
    pub engine: Engine,
    pub credentials: Credentials,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Where generated tokens are, when they were generated.
    pub token_file: Option<PathBuf>,
    /// How long a watcher may leave a step unread ([`Config::watch_cutoff_ms`]).
    pub watch_cutoff: Duration,
    /// Watch streams whose task is running (for monitoring and tests).
    pub watchers: api::Watchers,
    /// The working-day calendar and its file, whose end is announced ahead.
    pub calendar: Option<(PathBuf, Calendar)>,
}

fn invalid_workflows(diagnostics: &[crate::lang::diag::Diagnostic]) -> ServeError {
    ServeError::Invalid(
        diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Opens the engine and the credentials the configuration describes.
pub fn prepare(config: &Config) -> Result<Prepared, ServeError> {
    let clock = Arc::new(Monotonic::new(SystemClock));
    let prepared = prepare_with_clock(config, clock.clone())?;
    if let Some(last) = prepared
        .engine
        .last_step_time()
        .map_err(ServeError::Engine)?
    {
        clock.raise_to(last);
    }
    Ok(prepared)
}

/// [`prepare`] with a given clock (virtual time in tests).
pub fn prepare_with_clock(
    config: &Config,
    clock: Arc<dyn crate::engine::durable::Clock>,
) -> Result<Prepared, ServeError> {
    let sources = load::load(std::slice::from_ref(&config.workflows)).map_err(|e| match e {
        LoadError::Missing { .. } => ServeError::NoWorkflows(e),
        e => ServeError::Load(e),
    })?;
    // Validated first, so that a directory that does not load is told with
    // its located diagnostics, not as if there were none.
    let validated = crate::lang::validate::validate(&sources);
    if validated.library.is_none() {
        return Err(invalid_workflows(&validated.diagnostics));
    }
    let agencies: BTreeSet<String> = sources
        .agencies()
        .ok_or(ServeError::NoDirectory)?
        .1
        .agencies
        .iter()
        .map(|a| a.id.clone())
        .collect();
    let auditors: BTreeSet<String> = config.auditors.iter().cloned().collect();
    if let Some(unknown) = auditors.iter().find(|a| !agencies.contains(*a)) {
        return Err(ServeError::UnknownAuditor(unknown.clone()));
    }
    // Checked before anything is created: a start refused for its
    // workflows or its TLS files leaves no data folder behind.
    let tls = config.tls.as_ref().map(tls_config).transpose()?;
    if let Some(tls) = &tls {
        // Parsed now, so that a bad file stops the start before it serves.
        Server::builder()
            .tls_config(tls.clone())
            .map_err(ServeError::TlsInvalid)?;
    }
    make_data_folder(&config.data)?;
    let token_path = config.data.join("credentials.toml");
    let had_tokens = token_path.exists();
    let store_dir = config.data.join("store");
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open_with_cache(&store_dir, config.store_cache_mib.saturating_mul(1 << 20))
            .map_err(|source| match source {
                // Already says which store, and what to do.
                StoreError::InUse { .. } | StoreError::NewerFormat { .. } => {
                    ServeError::Store(source)
                }
                source => ServeError::StoreOpen {
                    path: store_dir.display().to_string(),
                    source,
                },
            })?,
    );
    // Whether this store was in use before this start.
    let store_used = !store.workflow_versions()?.is_empty();
    if !store_used && had_tokens && config.credentials.is_empty() {
        tracing::error!(
            "the store at {} is empty, but this data folder was in use before ({} is there): if the store was lost or damaged, stop the server now and restore the data folder from a backup; otherwise every case it held is gone",
            store_dir.display(),
            token_path.display()
        );
    }
    let options = EngineOptions {
        cache_cases: config.cache_cases,
    };
    let engine = Engine::open_validated(store, &sources, validated, clock, options).map_err(
        |e| match e {
            EngineError::Invalid(diagnostics) => invalid_workflows(&diagnostics),
            other => ServeError::Engine(other),
        },
    )?;
    let (credentials, token_file) = if config.credentials.is_empty() {
        let path = token_path;
        let mut names = agencies.clone();
        names.insert(ADMIN.to_owned());
        let (mut tokens, added) = auth::ensure_token_file(&path, &names)?;
        // On a first start every name is new; later, a new token is news to
        // whoever held the old one (a line removed, a file partly restored,
        // the whole file lost from a store in use).
        if !added.is_empty() && (added.len() < names.len() || store_used) {
            tracing::warn!(
                "new tokens generated in {} for: {} (any token they held before no longer works)",
                path.display(),
                added.join(", ")
            );
        }
        // An agency taken out of the directory (merged, renamed, a mistake)
        // keeps its generated token in the file, unused: refusing to start
        // over it left the operator to edit a file govflow writes, and
        // generating a new one should the agency come back would break the
        // department system that holds the old one.
        tokens.retain(|name, _| {
            let current = names.contains(name);
            if !current {
                tracing::warn!(
                    "the token of `{name}` in {} is not accepted: no such agency in the directory (it works again if the agency returns)",
                    path.display()
                );
            }
            current
        });
        (
            Credentials::from_tokens(&tokens, &agencies, &auditors).map_err(|e| {
                auth::CredentialError::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }
            })?,
            Some(path),
        )
    } else {
        (
            Credentials::from_hashes(&config.credentials, &agencies, &auditors)?,
            None,
        )
    };
    let credentials =
        credentials.with_certificates(&config.client_certificates, &agencies, &auditors)?;
    Ok(Prepared {
        engine,
        credentials,
        tls,
        token_file,
        watch_cutoff: config.watch_cutoff(),
        watchers: api::Watchers::default(),
        calendar: sources.calendar.clone(),
    })
}

/// What to tell the operator of a server that listens beyond this machine
/// without TLS: every bearer token and every case would cross the network
/// in clear.
pub fn plaintext_warning(listen: SocketAddr, tls: bool) -> Option<String> {
    (!tls && !listen.ip().is_loopback()).then(|| {
        format!(
            "listening on {listen} without TLS: bearer tokens and case data cross the network in clear; set `tls` (and `client_certificates` for mutual TLS) in the configuration, or listen on 127.0.0.1 behind a TLS proxy"
        )
    })
}

/// How many days ahead `serve` says that the working-day calendar ends.
const CALENDAR_NOTICE_DAYS: i64 = 60;

/// What to tell the operator when the years the working-day calendar covers
/// end within [`CALENDAR_NOTICE_DAYS`] of `now`: from then on every step
/// whose deadline needs a later day is refused, until the file is extended.
fn calendar_ending(calendar: &(PathBuf, Calendar), now: DateTime<Utc>) -> Option<String> {
    let (path, cal) = calendar;
    let left = cal.ends_within(now, CALENDAR_NOTICE_DAYS)?;
    let (last, next) = (cal.last_year(), cal.last_year() + 1);
    let when = match left {
        0 => "today".to_owned(),
        1 => "tomorrow".to_owned(),
        n if n < 0 => format!("{} days ago", -n),
        n => format!("in {n} days"),
    };
    Some(format!(
        "the working-day calendar {} ({}) ends with {last}-12-31, {when}: a step whose deadline or reminder needs a day of {next} is refused (reason `calendar`) until the State Council's public holidays for {next} are added to that file and the server is restarted",
        cal.version(),
        path.display(),
    ))
}

/// Creates the data folder readable by its owner only: it holds every case
/// and the agencies' tokens. A folder that exists is left as the operator
/// made it, with a warning when other users can read it.
fn make_data_folder(path: &Path) -> Result<(), ServeError> {
    let error = |e: std::io::Error| ServeError::DataFolder {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_dir() => Err(ServeError::DataFolder {
                path: path.display().to_string(),
                message: "it is a file, not a folder".into(),
            }),
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        "the data folder {} can be read by other users (mode {mode:o}): `chmod 700 {}` keeps its cases and tokens private",
                        path.display(),
                        path.display()
                    );
                }
                Ok(())
            }
            // A link whose target is gone (a backup disk not mounted) is
            // not made into a new, empty folder somewhere else.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) =>
            {
                Err(ServeError::DataFolder {
                    path: path.display().to_string(),
                    message: format!(
                        "it is a symbolic link to {}, which does not exist (a disk not mounted?)",
                        std::fs::read_link(path)
                            .map(|t| t.display().to_string())
                            .unwrap_or_else(|_| "a missing target".into())
                    ),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(error),
            Err(e) => Err(error(e)),
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(path).map_err(error)
}

fn tls_config(tls: &TlsConfig) -> Result<tonic::transport::ServerTlsConfig, ServeError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| ServeError::TlsFile {
            what,
            path: path.display().to_string(),
            message: e.to_string(),
        })
    };
    let identity = tonic::transport::Identity::from_pem(
        read("certificate (cert)", &tls.cert)?,
        read("private key (key)", &tls.key)?,
    );
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(
            "client-certificate authority (client_ca)",
            ca,
        )?));
    }
    Ok(config)
}

/// Lets a service take gzip-compressed requests and, to a client that asks
/// for it, send gzip-compressed answers: some clients and gateways compress
/// by default, and without this get UNIMPLEMENTED.
macro_rules! compressed {
    ($service:expr) => {
        $service
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
    };
}

/// Sets the health status of the server as a whole (the service named "")
/// and of each of its services.
async fn report_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <CasesServiceServer<Api> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <DefinitionsServiceServer<Api> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <AuditServiceServer<Api> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// The socket the server listens on, bound before it says it serves.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServeError::Listen {
            address: listen.to_string(),
            message: e.to_string(),
        })
}

/// Serves on `listener` (see [`bind`]; tests bind port 0) until `shutdown`
/// completes, then drains calls under way and stops the engine (which
/// finishes and syncs its last batch).
pub async fn serve_on(
    prepared: Prepared,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Prepared {
        engine,
        credentials,
        tls,
        watch_cutoff,
        watchers,
        calendar,
        ..
    } = prepared;
    let (stop_watchers, stopping) = tokio::sync::watch::channel(false);
    let api = Api {
        engine: engine.clone(),
        stopping,
        watch_cutoff,
        watchers: watchers.clone(),
        page_tokens: api::PageTokens::new(&engine.store().secret()),
    };
    // Streams never end by themselves: tell them to, or draining waits forever.
    let (draining, drain_begun) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_watchers.send(true);
        let _ = draining.send(());
    };
    let interceptor = credentials.interceptor();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    report_health(&health_reporter, ServingStatus::Serving).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // Fires due timers, tells health checks once storage has failed, and
    // says each day (from the start) when the working-day calendar ends soon.
    let timers = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut serving = true;
            let mut last_timer_error = String::new();
            let mut calendar_check = tokio::time::Instant::now();
            loop {
                if let Some(calendar) = &calendar
                    && tokio::time::Instant::now() >= calendar_check
                {
                    if let Some(notice) = calendar_ending(calendar, engine.now()) {
                        tracing::warn!("{notice}");
                    }
                    calendar_check += Duration::from_secs(24 * 3600);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Err(e) = engine.tick().await {
                    if matches!(e, EngineError::Stopped) {
                        // Stopped for good (the server stopping, or its writer
                        // gone after a bug): health must not go on saying SERVING.
                        tracing::error!(
                            "the engine has stopped: every change is refused, and health checks answer NOT_SERVING"
                        );
                        report_health(&health_reporter, ServingStatus::NotServing).await;
                        return;
                    }
                    // Said once, not twice a second while it lasts (a
                    // failed store refuses every tick the same way).
                    let error = e.to_string();
                    if error != last_timer_error {
                        tracing::warn!("timers: {error}");
                        last_timer_error = error;
                    }
                } else {
                    last_timer_error.clear();
                }
                if serving && let Some(reason) = engine.storage_failure() {
                    tracing::error!(
                        "storage failed: every change is refused until the server is restarted, and health checks answer NOT_SERVING: {reason}"
                    );
                    report_health(&health_reporter, ServingStatus::NotServing).await;
                    serving = false;
                }
            }
        })
    };
    // A client that vanished without closing its connection (no FIN) is
    // found by unanswered pings, so its streams and buffers are freed.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let serving = builder
        .trace_fn(|request| tracing::info_span!("grpc", method = %request.uri().path()))
        // Outermost, so that it logs the status the caller gets.
        .layer(request_log::RequestLogLayer)
        .layer(tower::util::MapResponseLayer::new(tonic_refusals_rewritten))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            compressed!(
                CasesServiceServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
            ),
            interceptor.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            compressed!(
                DefinitionsServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
            ),
            interceptor.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            compressed!(AuditServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES)),
            interceptor,
        ))
        .serve_with_incoming_shutdown(
            // Small request-response messages must not wait for Nagle.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    // Draining waits for every connection to close, at most the watch
    // cut-off. Watch tasks end when stopping begins, but a connection whose
    // client does not read its stream never closes by itself (the stream's
    // last messages cannot be sent), nor one whose client stopped reading
    // after them (a frozen process, a lost network: it is held until HTTP/2
    // keep-alive gives up, 50 s later). Such a client is treated like any
    // watcher that leaves a step unread. Nothing durable depends on it:
    // acknowledged changes are synced, a change under way is finished by the
    // engine, and its caller retries with its request id.
    let drain_limit = async move {
        if drain_begun.await.is_err() {
            std::future::pending::<()>().await
        }
        tokio::time::sleep(watch_cutoff).await;
        format!(
            "connections still open ({} with a watch stream unread) {} ms after stopping began",
            watchers.open(),
            watch_cutoff.as_millis()
        )
    };
    let result = tokio::select! {
        result = serving => result,
        why = drain_limit => {
            tracing::warn!("{why}; no longer waiting for their clients");
            Ok(())
        }
    };
    timers.abort();
    engine.shutdown();
    Ok(result?)
}

#[cfg(test)]
mod tests {
    /// Regression: a request whose gRPC framing is broken (cut short, or
    /// flagged compressed without an encoding) was answered INTERNAL with
    /// no reason, which reads as a fault of the server.
    #[test]
    fn broken_framing_is_answered_as_a_malformed_message() {
        use tonic_types::StatusExt;
        for refusal in [
            "Unexpected EOF decoding stream.",
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            "failed to decode Protobuf message: invalid wire type",
            // Regression: a damaged gzip body was INTERNAL without a reason.
            "Error decompressing: corrupt deflate stream, while sending request",
        ] {
            let mut response = tonic::codegen::http::Response::new(tonic::body::Body::empty());
            tonic::Status::internal(refusal)
                .add_header(response.headers_mut())
                .expect("headers");
            let rewritten = super::tonic_refusals_rewritten(response);
            let status = tonic::Status::from_header_map(rewritten.headers()).expect("a status");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{refusal}");
            assert_eq!(
                status
                    .get_error_details()
                    .error_info()
                    .map(|i| i.reason.as_str()),
                Some("malformed-message"),
                "{refusal}"
            );
        }
        // A fault of the server stays one.
        let mut response = tonic::codegen::http::Response::new(tonic::body::Body::empty());
        tonic::Status::internal("storage failed")
            .add_header(response.headers_mut())
            .expect("headers");
        let kept = super::tonic_refusals_rewritten(response);
        let status = tonic::Status::from_header_map(kept.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::Internal);
    }

    use super::*;

    #[test]
    fn a_server_reachable_from_the_network_without_tls_is_warned_about() {
        let at = |a: &str| a.parse::<SocketAddr>().expect("address");
        let warning = plaintext_warning(at("0.0.0.0:50051"), false).expect("warned");
        assert!(
            warning.starts_with("listening on 0.0.0.0:50051 without TLS: bearer tokens"),
            "{warning}"
        );
        assert!(plaintext_warning(at("10.1.2.3:50051"), false).is_some());
        assert_eq!(plaintext_warning(at("0.0.0.0:50051"), true), None);
        assert_eq!(plaintext_warning(at("127.0.0.1:50051"), false), None);
        assert_eq!(plaintext_warning(at("[::1]:50051"), false), None);
    }

    /// The working-day calendar ends with 2026, and the server runs in late
    /// 2026: without a word ahead, steps with a deadline in 2027 would start
    /// being refused one day. The operator is told from 60 days before.
    #[test]
    fn the_operator_is_told_ahead_that_the_working_day_calendar_ends() {
        let path = PathBuf::from("workflows/calendar/cn_holidays.csv");
        let calendar = (
            path,
            Calendar::parse("cn_holidays.csv", "2026-10-01,holiday\n").expect("parses"),
        );
        let at = |t: &str| t.parse::<DateTime<Utc>>().expect("time");
        assert_eq!(calendar_ending(&calendar, at("2026-10-01T00:00:00Z")), None);
        let notice = calendar_ending(&calendar, at("2026-11-27T04:00:00Z")).expect("told");
        assert!(
            notice.starts_with(&format!(
                "the working-day calendar {} (workflows/calendar/cn_holidays.csv) ends with 2026-12-31, in 34 days: ",
                calendar.1.version()
            )),
            "{notice}"
        );
        assert!(
            notice.contains("public holidays for 2027 are added to that file"),
            "{notice}"
        );
        let late = calendar_ending(&calendar, at("2027-01-05T04:00:00Z")).expect("told");
        assert!(late.contains("ends with 2026-12-31, 5 days ago"), "{late}");
    }

    #[test]
    fn a_listen_address_is_an_ip_and_port_and_a_host_name_is_told_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("govflow.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:50052\"\n").expect("write");
        let config = Config::load(&path).expect("loads");
        assert_eq!(config.listen, "0.0.0.0:50052".parse().expect("address"));
        std::fs::write(&path, "listen = \"localhost:50052\"\n").expect("write");
        let refused = Config::load(&path).expect_err("a host name");
        assert!(
            refused
                .to_string()
                .contains("host names such as localhost are not looked up"),
            "{refused}"
        );
    }

    #[test]
    fn the_watch_cutoff_is_ten_seconds_unless_configured_and_never_zero() {
        assert_eq!(Config::default().watch_cutoff(), Duration::from_secs(10));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("govflow.toml");
        std::fs::write(&path, "watch_cutoff_ms = 250\n").expect("write");
        let config = Config::load(&path).expect("loads");
        assert_eq!(config.watch_cutoff(), Duration::from_millis(250));
        std::fs::write(&path, "watch_cutoff_ms = 0\n").expect("write");
        let refused = Config::load(&path).expect_err("zero refused");
        assert!(refused.to_string().contains("watch_cutoff_ms"), "{refused}");
    }

    #[test]
    fn the_engines_memory_is_configurable_and_a_server_prepares_with_it() {
        let defaults = Config::default();
        assert_eq!(defaults.cache_cases, EngineOptions::default().cache_cases);
        assert_eq!(defaults.store_cache_mib, 1024);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("govflow.toml");
        std::fs::write(&path, "cache_cases = 2\nstore_cache_mib = 64\n").expect("write");
        let mut config = Config::load(&path).expect("loads");
        assert_eq!((config.cache_cases, config.store_cache_mib), (2, 64));
        config.data = dir.path().join("data");
        config.workflows = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
        prepare(&config).expect("a server with a two-case cache prepares");
        std::fs::write(&path, "store_cache_mib = 0\n").expect("write");
        let refused = Config::load(&path).expect_err("zero refused");
        assert!(refused.to_string().contains("store_cache_mib"), "{refused}");
    }

    /// The data folder holds every case and the agencies' tokens: it was
    /// made with the process's umask (usually readable by every user).
    #[cfg(unix)]
    #[test]
    fn a_new_data_folder_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data: dir.path().join("new/data"),
            workflows: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows"),
            ..Config::default()
        };
        prepare(&config).expect("prepares");
        let mode = std::fs::metadata(&config.data)
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
