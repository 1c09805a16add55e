//! The CLI client: `govflow case …` and `govflow workflow …` against a
//! running server. Human tables by default, `--json` for scripts.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value as Json, json};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Request, Status};

use govflow::lang::validate::count;
use govflow::server::api::bare_workflow_name;
use govflow::store::proto::{
    self, audit_service_client::AuditServiceClient, cases_service_client::CasesServiceClient,
    definitions_service_client::DefinitionsServiceClient,
};
use govflow::store::records;

/// Prints a line; a reader that went away (`| head`) ends the program
/// quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// How to reach the server.
#[derive(Args, Clone)]
pub struct Connection {
    /// The server's address: `http://HOST:PORT`, or `HOST:PORT` as the
    /// server prints it; `https://HOST:PORT` for a server with TLS (with
    /// `--ca-cert`).
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:50051",
        env = "GOVFLOW_SERVER"
    )]
    server: String,
    /// Your agency's bearer token (see `govflow-data/credentials.toml`).
    #[arg(long, global = true, env = "GOVFLOW_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The certificate authority (PEM) that signed the server's TLS
    /// certificate, for an `https://` server.
    #[arg(long, global = true, env = "GOVFLOW_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Your agency's client certificate (PEM), for a server with mutual TLS:
    /// the certificate is then your credential. With `--client-key`.
    #[arg(
        long,
        global = true,
        env = "GOVFLOW_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of `--client-cert`.
    #[arg(
        long,
        global = true,
        env = "GOVFLOW_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum CaseCommand {
    /// Start a case as your agency.
    Start {
        /// The workflow.
        #[arg(long)]
        workflow: String,
        /// The case id (derived from the request id when left out).
        #[arg(long)]
        id: Option<String>,
        /// A role bound at start: ROLE=AGENCY (repeatable).
        #[arg(long = "bind", value_name = "ROLE=AGENCY")]
        bindings: Vec<String>,
        /// A variable: NAME=VALUE, the value as JSON or else a string (repeatable).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        variables: Vec<String>,
        /// Makes retries safe; a new one is made when left out.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Fire an event on a case as your agency.
    Fire {
        /// The case id (or `cases/{id}`).
        case: String,
        /// The event to fire (`govflow case inbox` lists those you may fire
        /// now; `govflow workflow events WORKFLOW --state STATE` the payload
        /// fields each takes).
        event: String,
        /// A payload field: NAME=VALUE, the value as JSON or else a string (repeatable).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        fields: Vec<String>,
        /// Refuse unless the case is at this sequence.
        #[arg(long)]
        expect_sequence: Option<u64>,
        /// Makes retries safe: the same id gets the first answer, never a
        /// second step; a new one is made when left out.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Show a case (and its history).
    Show {
        /// The case id (or `cases/{id}`).
        case: String,
        /// Also list every step of its history.
        #[arg(long)]
        history: bool,
    },
    /// List the cases you hold a role in.
    List {
        /// Only cases of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only cases in this state (needs --workflow).
        #[arg(long)]
        state: Option<String>,
        /// A searchable variable: NAME=VALUE (needs --workflow).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        variable: Option<String>,
        /// Only cases whose deadline comes at or before this time (RFC 3339,
        /// a date — the start of that day in Beijing — or `now` for those
        /// overdue), soonest first, with their deadlines.
        #[arg(long, value_name = "TIME")]
        due_before: Option<String>,
    },
    /// The cases awaiting you, with their deadlines.
    Inbox,
    /// Follow the steps of your cases as they happen (resume with --cursor).
    Watch {
        /// Resume after this cursor ("0" from the beginning; default: from now).
        #[arg(long, default_value = "")]
        cursor: String,
    },
}

#[derive(Subcommand)]
pub enum WorkflowCommand {
    /// Deploy a workflow file (admin).
    Deploy {
        /// The workflow's RON file.
        file: PathBuf,
        /// Refuse the deploy, changing nothing, if any running case of the
        /// workflow would break under the new version (the server runs the
        /// migration check first, atomically with the deploy).
        #[arg(long)]
        require_migration_check: bool,
    },
    /// Check which running cases a new version of a workflow would break,
    /// without deploying it (auditors and the admin).
    /// Exits 1 when some would.
    CheckMigration {
        /// The new version's RON file.
        file: PathBuf,
    },
    /// List the deployed workflows.
    List,
    /// Show a deployed workflow's source.
    Show {
        /// The workflow's name (or `workflows/{name}`).
        name: String,
        /// That version instead of the current one.
        #[arg(long)]
        version: Option<u32>,
    },
    /// The events of a deployed workflow, state by state: who may fire
    /// each, where it leads, the payload fields it takes (name, type,
    /// whether required, title) and its guard — what `case fire` needs.
    Events {
        /// The workflow's name (or `workflows/{name}`).
        name: String,
        /// Only the events of this state.
        #[arg(long)]
        state: Option<String>,
        /// That version instead of the current one (a case's version is in
        /// `case show`).
        #[arg(long)]
        version: Option<u32>,
    },
    /// Draw a deployed workflow.
    Graph {
        name: String,
        #[arg(long, value_enum, default_value_t = govflow::render::Format::Dot)]
        format: govflow::render::Format,
    },
}

/// The server's address as a URI: `HOST:PORT`, as `govflow serve` prints
/// it, means plain HTTP/2 on that port.
fn server_uri(server: &str) -> String {
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

/// The TLS settings for `server` (`None` for plain `http://`).
fn client_tls(c: &Connection, server: &str) -> Result<Option<ClientTlsConfig>> {
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
    };
    if !server.starts_with("https://") {
        if c.ca_cert.is_some() || c.client_cert.is_some() {
            anyhow::bail!(
                "TLS options were given for {server}: use `https://` for a server with TLS"
            );
        }
        return Ok(None);
    }
    let Some(ca) = &c.ca_cert else {
        anyhow::bail!(
            "{server} needs `--ca-cert FILE`: the certificate authority (PEM) that signed the server's certificate"
        );
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
        "certificate authority (--ca-cert)",
        ca,
    )?));
    if let (Some(cert), Some(key)) = (&c.client_cert, &c.client_key) {
        tls = tls.identity(Identity::from_pem(
            read("client certificate (--client-cert)", cert)?,
            read("client key (--client-key)", key)?,
        ));
    }
    Ok(Some(tls))
}

struct Client {
    channel: Channel,
    token: Option<String>,
}

impl Client {
    async fn connect(c: &Connection) -> Result<Client> {
        // An empty token is a lookup that found nothing (`$(grep …)`), not a
        // credential: said here rather than sent.
        if c.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            anyhow::bail!(
                "the token is empty (--token or GOVFLOW_TOKEN): give the agency's token from the server's credentials.toml"
            );
        }
        let server = server_uri(&c.server);
        let mut endpoint = Channel::from_shared(server.clone())
            .with_context(|| format!("`{}` is not a server address", c.server))?;
        if let Some(tls) = client_tls(c, &server)? {
            endpoint = endpoint
                .tls_config(tls)
                .context("the TLS settings cannot be used")?;
        }
        let channel = endpoint.connect().await.map_err(|e| Refusal {
            code: "Unavailable".into(),
            reason: "unreachable".into(),
            message: format!("cannot reach the server at {server}: {}", causes(&e)),
            hint:
                "is `govflow serve` running there? give its address with --server or GOVFLOW_SERVER"
                    .into(),
        })?;
        Ok(Client {
            channel,
            token: c.token.clone(),
        })
    }

    fn request<T>(&self, message: T) -> Result<Request<T>> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            let value: MetadataValue<_> = format!("Bearer {token}")
                .parse()
                .context("the token has characters a header cannot carry")?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

fn request_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        format!(
            "cli-{}",
            govflow::server::auth::new_token()
                .unwrap_or_default()
                .trim_start_matches("gf_")
        )
    })
}

/// `NAME=VALUE`. VALUE is a string, except JSON lists, objects, quoted
/// strings, `true`, `false` and `null`: numbers stay text (a credit code is
/// not a number), and the server reads numeric text for integer and decimal
/// fields.
fn assignment(text: &str) -> Result<(String, Json)> {
    let (name, value) = pair(text, "NAME=VALUE")?;
    let value = value.as_str();
    let json_like =
        value.starts_with(['[', '{', '"']) || matches!(value, "true" | "false" | "null");
    let value = if json_like {
        serde_json::from_str(value)
            .with_context(|| format!("`{name}`: `{value}` is not valid JSON"))?
    } else {
        Json::String(value.to_owned())
    };
    Ok((name, value))
}

/// `NAME=VALUE` of `case list --var`: read as `case start --var` reads it,
/// then written as the index keeps it (a string as itself, anything else as
/// JSON text), so that what a case was started with finds it.
fn variable_filter(text: &str) -> Result<(String, String)> {
    Ok(match assignment(text)? {
        (name, Json::String(value)) => (name, value),
        (name, other) => (name, other.to_string()),
    })
}

/// An error and its causes, each said once (transport errors repeat
/// their source in their own text).
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    for cause in std::iter::successors(Some(e), |e| e.source()) {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

/// A time on the command line: as the audit commands read one, or `now`.
/// An event as `workflow events` lists it.
struct EventShown<'w> {
    event: &'w str,
    roles: &'w [String],
    to: &'w str,
    title: &'w str,
    fields: &'w [govflow::lang::model::Field],
    guard: Option<&'w str>,
}

/// `workflow events`: for each state (or only `only`), each event that can
/// be fired in it, with its roles, target, payload fields and guard; one
/// JSON object per event with `json`.
fn event_lines(
    workflow: &govflow::lang::model::Workflow,
    only: Option<&str>,
    json: bool,
) -> Vec<String> {
    use govflow::lang::value::type_name;
    let signing = govflow::engine::core::countersign_fields();
    let mut lines = Vec::new();
    for state in workflow
        .states
        .iter()
        .filter(|s| only.is_none_or(|o| o == s.name))
    {
        let expiry = state.deadline.as_ref().and_then(|d| d.on_expiry.as_deref());
        // What the deadline alone fires is no agency's to fire.
        let mut events: Vec<EventShown> = state
            .transitions
            .iter()
            .filter(|t| !t.roles.is_empty() || expiry != Some(t.event.as_str()))
            .map(|t| EventShown {
                event: &t.event,
                roles: &t.roles,
                to: &t.to,
                title: &t.title,
                fields: &t.payload,
                guard: t.guard.as_deref(),
            })
            .collect();
        if let Some(cs) = &state.countersign {
            for (event, title, to) in [
                (&cs.sign_event, "会签同意", &cs.approved),
                (&cs.reject_event, "会签不同意", &cs.rejected),
            ] {
                events.push(EventShown {
                    event,
                    roles: &cs.roles,
                    to,
                    title,
                    fields: &signing,
                    guard: None,
                });
            }
        }
        if json {
            for e in &events {
                let fields: Vec<Json> = e
                    .fields
                    .iter()
                    .map(|f| json!({"name": f.name, "type": type_json(&f.ty), "description": type_name(&f.ty), "required": f.required, "title": f.title}))
                    .collect();
                lines.push(
                    json!({"state": state.name, "event": e.event, "roles": e.roles, "to": e.to, "title": e.title, "payload": fields, "guard": e.guard})
                        .to_string(),
                );
            }
            continue;
        }
        let deadline = state
            .deadline
            .as_ref()
            .map(|d| {
                let fires = expiry.map(|e| format!(" → {e}")).unwrap_or_default();
                format!("  (deadline {}{fires})", d.within)
            })
            .unwrap_or_default();
        let closed = state
            .outcome
            .as_ref()
            .map(|o| format!("  (ends the case: {o})"))
            .unwrap_or_default();
        lines.push(format!(
            "state {} {}{deadline}{closed}",
            state.name, state.title
        ));
        if events.is_empty() && state.outcome.is_none() {
            lines.push("  (no event an agency fires here)".into());
        }
        for e in events {
            lines.push(format!(
                "  {} → {}  [{}]  {}",
                e.event,
                e.to,
                e.roles.join(", "),
                e.title
            ));
            for f in e.fields {
                let optional = if f.required { "" } else { " (optional)" };
                let title = if f.title.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", f.title)
                };
                lines.push(format!(
                    "      {}: {}{optional}{title}",
                    f.name,
                    type_name(&f.ty)
                ));
            }
            if let Some(guard) = e.guard {
                lines.push(format!("      only if: {guard}"));
            }
        }
    }
    lines
}

/// A payload field's type for scripts: its kind, with an enum's values and
/// a list's item type (`{"kind": "enum", "values": [...]}`).
fn type_json(ty: &govflow::lang::model::Type) -> Json {
    use govflow::lang::model::Type;
    match ty {
        Type::String => json!({"kind": "string"}),
        Type::Integer => json!({"kind": "integer"}),
        Type::Decimal => json!({"kind": "decimal"}),
        Type::Boolean => json!({"kind": "boolean"}),
        Type::Date => json!({"kind": "date"}),
        Type::Time => json!({"kind": "time"}),
        Type::Agency => json!({"kind": "agency"}),
        Type::Enum(values) => json!({"kind": "enum", "values": values}),
        Type::List(item) => json!({"kind": "list", "items": type_json(item)}),
    }
}

/// A time as the tables show it: in Beijing time (the time the policies'
/// deadlines are set in, and that clerks read), to the second. A deadline
/// at the end of a day shows as `24:00` of that day, as 截止…24时 is said,
/// rather than as midnight of the next. `--json` keeps RFC 3339 in UTC.
fn shown_time(t: Option<&prost_types::Timestamp>) -> String {
    let beijing = chrono::FixedOffset::east_opt(8 * 3600).expect("a valid offset");
    let local = records::from_timestamp(t).with_timezone(&beijing);
    let end_of_day = local.time() == chrono::NaiveTime::MIN;
    match local.date_naive().pred_opt() {
        Some(day) if end_of_day => format!("{day} 24:00:00 +08:00"),
        _ => local.format("%Y-%m-%d %H:%M:%S %:z").to_string(),
    }
}

fn time_argument(text: &str) -> Result<prost_types::Timestamp> {
    let time = if text == "now" {
        chrono::Utc::now()
    } else {
        crate::audit_cmd::parse_time(text)?
    };
    Ok(records::timestamp(time))
}

/// `LEFT=RIGHT`, split at the first `=`.
fn pair(text: &str, shape: &str) -> Result<(String, String)> {
    text.split_once('=')
        .map(|(l, r)| (l.to_owned(), r.to_owned()))
        .with_context(|| format!("`{text}` is not {shape}"))
}

fn to_struct(pairs: &[String]) -> Result<prost_types::Struct> {
    let map: serde_json::Map<String, Json> =
        pairs.iter().map(|p| assignment(p)).collect::<Result<_>>()?;
    Ok(records::to_struct(&map))
}

fn case_name(case: &str) -> String {
    if case.starts_with("cases/") {
        case.to_owned()
    } else {
        format!("cases/{case}")
    }
}

fn case_json(c: &proto::Case) -> Json {
    json!({
        "id": c.id,
        "workflow": c.workflow,
        "workflow_version": c.workflow_version,
        "workflow_digest": c.workflow_digest,
        "state": c.state,
        "outcome": c.outcome,
        "sequence": c.sequence,
        "variables": Json::Object(records::from_struct(c.variables.as_ref())),
        "bindings": c.bindings,
        "parent": c.parent,
        "children": c.children.iter().map(|ch| json!({"case_id": ch.case_id, "workflow": ch.workflow, "outcome": ch.outcome})).collect::<Vec<_>>(),
        "timers": c.timers.iter().map(|t| json!({"id": t.id, "event": t.event, "due_time": records::rfc3339(t.due_time.as_ref())})).collect::<Vec<_>>(),
        "signatures": c.signatures.iter().map(|s| json!({"role": s.role, "agency": s.agency, "approved": s.approved, "sign_time": records::rfc3339(s.sign_time.as_ref())})).collect::<Vec<_>>(),
        "create_time": records::rfc3339(c.create_time.as_ref()),
        "update_time": records::rfc3339(c.update_time.as_ref()),
        "head_hash": hex::encode(&c.head_hash),
    })
}

fn print_case(c: &proto::Case, as_json: bool) {
    if as_json {
        out!("{}", case_json(c));
        return;
    }
    for line in case_lines(c) {
        out!("{line}");
    }
}

/// A case as `govflow case show` prints it: one labelled line per fact.
fn case_lines(c: &proto::Case) -> Vec<String> {
    let mut lines = vec![
        format!("case       {}", c.id),
        format!("workflow   {} (version {})", c.workflow, c.workflow_version),
        format!(
            "state      {}{}",
            c.state,
            if c.outcome.is_empty() {
                String::new()
            } else {
                format!(" — outcome {}", c.outcome)
            }
        ),
        format!("sequence   {}", c.sequence),
    ];
    for (role, agency) in &c.bindings {
        lines.push(format!("role       {role:<18} {agency}"));
    }
    for (name, value) in records::from_struct(c.variables.as_ref()) {
        if !value.is_null() {
            lines.push(format!("variable   {name:<18} {value}"));
        }
    }
    // A reminder fires the deadline's own event name ahead of it: the kind
    // tells them apart.
    for t in &c.timers {
        let kind = match t.kind() {
            proto::TimerKind::Expiry => "deadline",
            proto::TimerKind::Reminder => "reminder",
            proto::TimerKind::Unspecified => "timer",
        };
        lines.push(format!(
            "{kind:<10} {:<18} {}",
            t.event,
            shown_time(t.due_time.as_ref())
        ));
    }
    for ch in &c.children {
        lines.push(format!(
            "child      {:<18} {} {}",
            ch.case_id, ch.workflow, ch.outcome
        ));
    }
    lines
}

/// The width of a column: its longest value, and at least `min`.
fn width<'a>(values: impl IntoIterator<Item = &'a str>, min: usize) -> usize {
    values
        .into_iter()
        .map(|v| v.chars().count())
        .fold(min, usize::max)
}

/// The deployed workflows as `govflow workflow list` prints them: the name
/// column as wide as the longest name.
fn workflow_lines(workflows: &[proto::WorkflowSummary]) -> Vec<String> {
    let name = width(workflows.iter().map(|w| w.name.as_str()), 0);
    workflows
        .iter()
        .map(|w| format!("{:<name$} v{:<4} {}", w.name, w.version, w.title))
        .collect()
}

/// A change the server refused or whose answer was lost: as [`failure`],
/// and for a lost answer, how to find out whether it was made.
fn change_failure(status: &Status, request_id: &str) -> anyhow::Error {
    change_refusal(status, request_id).into()
}

/// [`change_failure`]'s refusal, for a caller that adds its own hint.
fn change_refusal(status: &Status, request_id: &str) -> Refusal {
    lost_change(
        status,
        &format!(
            "run the same command with --request-id {request_id} to find out (a retry gets the first answer, never a second step)"
        ),
    )
}

/// A refusal of a change; when the answer was lost on the way (the change
/// may or may not have been made), with how to find out safely.
fn lost_change(status: &Status, find_out: &str) -> Refusal {
    use tonic::Code;
    let mut refusal = Refusal::of(status);
    if matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    ) {
        refusal.hint = format!("the change may or may not have been made; {find_out}");
    }
    refusal
}

/// A watch that ended (the server stopping, a slow reader cut off, the
/// connection lost): as [`failure`], and how to go on without a gap or a
/// repeat, from the last cursor shown.
fn watch_failure(status: &Status, last_cursor: &str) -> anyhow::Error {
    let mut refusal = Refusal::of(status);
    if !last_cursor.is_empty() {
        refusal.hint =
            format!("go on from where it stopped with `govflow case watch --cursor {last_cursor}`");
    }
    refusal.into()
}

/// A server error, said plainly: code, message and machine-readable reason.
fn failure(status: &Status) -> anyhow::Error {
    Refusal::of(status).into()
}

/// What the server answered instead of a result: said as a line (and a
/// hint), or with `--json` as `{"error": {code, reason, message, hint}}`
/// on standard output, for scripts.
#[derive(Debug, serde::Serialize)]
pub struct Refusal {
    pub code: String,
    pub reason: String,
    pub message: String,
    /// What to do about it; empty when there is nothing to add.
    pub hint: String,
}

impl Refusal {
    fn of(status: &Status) -> Refusal {
        let reason = govflow::server::api::reason(status);
        // The server speaks gRPC; what to do about a credential is the CLI's.
        let hint = match reason.as_str() {
            "no-credential" => "give the agency's token with --token or GOVFLOW_TOKEN",
            "unknown-credential" => {
                "the token is not one the server knows: take it from the server's credentials.toml (tokens generated there change only when a line is removed)"
            }
            _ => "",
        };
        Refusal {
            code: format!("{:?}", status.code()),
            reason,
            message: status.message().to_owned(),
            hint: hint.to_owned(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if !self.reason.is_empty() {
            write!(f, " [{}]", self.reason)?;
        }
        if !self.hint.is_empty() {
            write!(f, "\nhint: {}", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

pub async fn case(connection: Connection, command: CaseCommand) -> Result<ExitCode> {
    let client = Client::connect(&connection).await?;
    let mut cases = CasesServiceClient::new(client.channel.clone());
    let as_json = connection.json;
    match command {
        CaseCommand::Start {
            workflow,
            id,
            bindings,
            variables,
            request_id: rid,
        } => {
            let bindings = bindings
                .iter()
                .map(|b| pair(b, "ROLE=AGENCY"))
                .collect::<Result<_>>()?;
            let rid = request_id(rid);
            let request = proto::CreateCaseRequest {
                request_id: rid.clone(),
                case_id: id.unwrap_or_default(),
                workflow: bare_workflow_name(&workflow),
                bindings,
                variables: Some(to_struct(&variables)?),
            };
            let response = cases
                .create_case(client.request(request)?)
                .await
                .map_err(|s| change_failure(&s, &rid))?;
            if let Some(case) = response.into_inner().case {
                print_case(&case, as_json);
            }
        }
        CaseCommand::Fire {
            case,
            event,
            fields,
            expect_sequence,
            request_id: rid,
        } => {
            let rid = request_id(rid);
            let request = proto::FireEventRequest {
                request_id: rid.clone(),
                case: case_name(&case),
                event,
                payload: Some(to_struct(&fields)?),
                expected_sequence: expect_sequence,
            };
            let name = request.case.clone();
            let refused = match cases.fire_event(client.request(request)?).await {
                Ok(response) => {
                    if let Some(case) = response.into_inner().case {
                        print_case(&case, as_json);
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                Err(status) => status,
            };
            let mut refusal = change_refusal(&refused, &rid);
            // A guard or a payload is the workflow's rule: say where the
            // rules of the case's state are listed, field by field.
            if refusal.hint.is_empty()
                && matches!(refusal.reason.as_str(), "guard-false" | "invalid-payload")
                && let Ok(found) = cases
                    .get_case(client.request(proto::GetCaseRequest { name })?)
                    .await
                && let Some(case) = found.into_inner().case
            {
                refusal.hint = format!(
                    "what each event of state `{}` needs: govflow workflow events {} --version {} --state {}",
                    case.state, case.workflow, case.workflow_version, case.state
                );
            }
            return Err(refusal.into());
        }
        CaseCommand::Show { case, history } => {
            let name = case_name(&case);
            let response = cases
                .get_case(client.request(proto::GetCaseRequest { name: name.clone() })?)
                .await
                .map_err(|s| failure(&s))?;
            if let Some(case) = response.into_inner().case {
                print_case(&case, as_json);
            }
            if history {
                let mut audit = AuditServiceClient::new(client.channel.clone());
                let mut token = String::new();
                loop {
                    let page = audit
                        .list_history_entries(client.request(proto::ListHistoryEntriesRequest {
                            parent: name.clone(),
                            page_size: 500,
                            page_token: token,
                        })?)
                        .await
                        .map_err(|s| failure(&s))?
                        .into_inner();
                    for e in &page.history_entries {
                        if as_json {
                            out!("{}", records::entry_json(e));
                        } else {
                            let actor = match records::from_actor(e.actor.as_ref()) {
                                govflow::engine::Actor::Agency(a) => a,
                                govflow::engine::Actor::Timer(t) => format!("timer {t}"),
                                govflow::engine::Actor::Engine => "engine".into(),
                            };
                            out!(
                                "{:>4}  {}  {:<28} {:<24} {} → {}",
                                e.sequence,
                                shown_time(e.time.as_ref()),
                                actor,
                                e.event,
                                e.from_state,
                                e.to_state
                            );
                        }
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
            }
        }
        CaseCommand::List {
            workflow,
            state,
            variable,
            due_before,
        } => {
            let (variable_name, variable_value) = match variable {
                Some(v) => variable_filter(&v)?,
                None => Default::default(),
            };
            let due_before = due_before.as_deref().map(time_argument).transpose()?;
            let mut token = String::new();
            let mut listed = 0;
            loop {
                let page = cases
                    .list_cases(
                        client.request(proto::ListCasesRequest {
                            page_size: 200,
                            page_token: token,
                            workflow: workflow
                                .as_deref()
                                .map(bare_workflow_name)
                                .unwrap_or_default(),
                            state: state.clone().unwrap_or_default(),
                            variable_name: variable_name.clone(),
                            variable_value: variable_value.clone(),
                            due_before,
                        })?,
                    )
                    .await
                    .map_err(|s| failure(&s))?
                    .into_inner();
                // Each page is sized to its own longest values (a list can be long).
                let wf = width(page.cases.iter().map(|c| c.workflow.as_str()), 24);
                let st = width(page.cases.iter().map(|c| c.state.as_str()), 24);
                for c in &page.cases {
                    if as_json {
                        out!("{}", case_json(c));
                    } else if due_before.is_some() {
                        // Listed by deadline: the deadline is what to show.
                        let deadline = records::running_deadline(c);
                        out!(
                            "{:<36} {:<wf$} {:<st$} due {}",
                            c.id,
                            c.workflow,
                            c.state,
                            shown_time(deadline)
                        );
                    } else {
                        out!(
                            "{:<36} {:<wf$} {:<st$} seq {}",
                            c.id,
                            c.workflow,
                            c.state,
                            c.sequence
                        );
                    }
                }
                listed += page.cases.len();
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if listed == 0 && !as_json {
                out!("no cases");
            }
        }
        CaseCommand::Watch { cursor } => {
            let mut stream = cases
                .watch_events(client.request(proto::WatchEventsRequest {
                    cursor: cursor.clone(),
                })?)
                .await
                .map_err(|s| failure(&s))?
                .into_inner();
            let mut last = cursor;
            while let Some(message) = stream
                .message()
                .await
                .map_err(|s| watch_failure(&s, &last))?
            {
                last.clone_from(&message.cursor);
                let Some(e) = message.history_entry else {
                    continue;
                };
                if as_json {
                    out!(
                        "{}",
                        json!({"cursor": message.cursor, "entry": records::entry_json(&e)})
                    );
                } else {
                    out!(
                        "{:>8}  {}  {:<28} {:>4}  {:<24} {} → {}",
                        message.cursor,
                        shown_time(e.time.as_ref()),
                        e.case_id,
                        e.sequence,
                        e.event,
                        e.from_state,
                        e.to_state
                    );
                }
            }
        }
        CaseCommand::Inbox => {
            let mut token = String::new();
            let mut listed = 0;
            loop {
                let page = cases
                    .list_inbox(client.request(proto::ListInboxRequest {
                        page_size: 200,
                        page_token: token,
                    })?)
                    .await
                    .map_err(|s| failure(&s))?
                    .into_inner();
                let cases = || page.items.iter().filter_map(|i| i.case.as_ref());
                // Each page is sized to its own longest values (an inbox can be long).
                let wf = width(cases().map(|c| c.workflow.as_str()), 24);
                let st = width(cases().map(|c| c.state.as_str()), 22);
                for item in &page.items {
                    let Some(c) = &item.case else { continue };
                    let deadline = item.deadline.as_ref().map(|d| records::rfc3339(Some(d)));
                    if as_json {
                        // No deadline is null, not the table's dash.
                        out!(
                            "{}",
                            json!({"case": case_json(c), "events": item.events, "deadline": deadline})
                        );
                    } else {
                        let deadline = item
                            .deadline
                            .as_ref()
                            .map_or_else(|| "—".into(), |d| shown_time(Some(d)));
                        out!(
                            "{:<36} {:<wf$} {:<st$} due {}  can: {}",
                            c.id,
                            c.workflow,
                            c.state,
                            deadline,
                            item.events.join(", ")
                        );
                    }
                }
                listed += page.items.len();
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if listed == 0 && !as_json {
                out!("nothing to act on");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A deployed workflow version (the current one, unless `version`), with its source.
async fn deployed_version(
    client: &Client,
    definitions: &mut DefinitionsServiceClient<tonic::transport::Channel>,
    name: &str,
    version: Option<u32>,
) -> Result<proto::WorkflowVersion> {
    let name = workflow_name(name, version);
    Ok(definitions
        .get_workflow(client.request(proto::GetWorkflowRequest { name })?)
        .await
        .map_err(|s| failure(&s))?
        .into_inner()
        .workflow_version
        .unwrap_or_default())
}

/// A workflow file's source as a deploy or a migration check sends it: one
/// that is no UTF-8 text is refused here, located, as `govflow validate`
/// refuses it.
fn source_of(file: &std::path::Path) -> Result<String> {
    match govflow::lang::load::read_text(file)? {
        Ok(text) => Ok(text),
        Err(diagnostic) => anyhow::bail!("{diagnostic}"),
    }
}

pub async fn workflow(connection: Connection, command: WorkflowCommand) -> Result<ExitCode> {
    let client = Client::connect(&connection).await?;
    let mut definitions = DefinitionsServiceClient::new(client.channel.clone());
    let as_json = connection.json;
    match command {
        WorkflowCommand::Deploy {
            file,
            require_migration_check,
        } => {
            let source = source_of(&file)?;
            match definitions
                .deploy_workflow(client.request(proto::DeployWorkflowRequest {
                    source,
                    require_migration_check,
                })?)
                .await
            {
                Ok(response) => {
                    let r = response.into_inner();
                    let v = r.workflow_version.unwrap_or_default();
                    if as_json {
                        out!(
                            "{}",
                            json!({"name": v.name, "version": v.version, "digest": v.digest, "created": r.created})
                        );
                    } else if r.created {
                        out!("deployed {} version {}", v.name, v.version);
                    } else {
                        out!("{} version {} is already this source", v.name, v.version);
                    }
                }
                Err(status) => {
                    use tonic_types::StatusExt;
                    let refusal = lost_change(
                        &status,
                        "deploying the same file again is safe: a source already deployed is answered as such, never deployed twice",
                    );
                    let details = status.get_error_details();
                    if !as_json {
                        eprintln!("{refusal}");
                    }
                    print_source_violations(&details, &file);
                    if let Some(failed) = details.precondition_failure() {
                        for v in &failed.violations {
                            eprintln!(
                                "would break: case {} {}",
                                v.subject.trim_start_matches("cases/"),
                                v.description
                            );
                        }
                    }
                    if as_json {
                        // Said on standard output as JSON, as every refusal is.
                        return Err(refusal.into());
                    }
                    return Ok(ExitCode::from(1));
                }
            }
        }
        WorkflowCommand::CheckMigration { file } => {
            let source = source_of(&file)?;
            let mut audit = AuditServiceClient::new(client.channel.clone());
            let r = match audit
                .check_migration(client.request(proto::CheckMigrationRequest { source })?)
                .await
            {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    use tonic_types::StatusExt;
                    eprintln!("{}", failure(&status));
                    print_source_violations(&status.get_error_details(), &file);
                    return Ok(ExitCode::from(2));
                }
            };
            // A server from before the total was sent leaves it 0.
            let breaking_total = r.breaking_cases_total.max(r.breaking_cases.len() as u64);
            if as_json {
                let breaking: Vec<Json> = r
                    .breaking_cases
                    .iter()
                    .map(|b| json!({"case_id": b.case_id, "workflow_version": b.workflow_version, "state": b.state, "sequence": b.sequence, "kind": b.kind, "reason": b.reason}))
                    .collect();
                out!(
                    "{}",
                    json!({"workflow": r.workflow, "digest": r.digest, "running_cases": r.running_cases, "breaking_cases": breaking, "breaking_cases_total": breaking_total, "warnings": r.warnings})
                );
            } else {
                for w in &r.warnings {
                    out!("warning: {w}");
                }
                for b in &r.breaking_cases {
                    out!(
                        "BREAKS case {} (version {}, in `{}`) at sequence {}: {}: {}",
                        b.case_id,
                        b.workflow_version,
                        b.state,
                        b.sequence,
                        b.kind,
                        b.reason
                    );
                }
                out!(
                    "{}: {} checked against the new version; {}",
                    r.workflow,
                    count(r.running_cases as usize, "running case", "running cases"),
                    match (r.breaking_cases.len() as u64, breaking_total) {
                        (0, 0) => "none would break".to_owned(),
                        (shown, total) if shown < total => format!(
                            "{total} would break ({shown} listed; `govflow audit migration-check` on the store folder lists every one)"
                        ),
                        (_, total) => format!("{total} would break"),
                    }
                );
            }
            if breaking_total > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        WorkflowCommand::List => {
            let page = definitions
                .list_workflows(client.request(proto::ListWorkflowsRequest {
                    page_size: 1000,
                    page_token: String::new(),
                })?)
                .await
                .map_err(|s| failure(&s))?
                .into_inner();
            if as_json {
                for w in &page.workflows {
                    out!(
                        "{}",
                        json!({"name": w.name, "title": w.title, "version": w.version, "digest": w.digest})
                    );
                }
            } else {
                for line in workflow_lines(&page.workflows) {
                    out!("{line}");
                }
            }
        }
        WorkflowCommand::Show { name, version } => {
            let v = deployed_version(&client, &mut definitions, &name, version).await?;
            if as_json {
                out!(
                    "{}",
                    json!({"name": v.name, "version": v.version, "digest": v.digest, "source": v.source})
                );
            } else {
                out!(
                    "// {} version {} ({})\n{}",
                    v.name,
                    v.version,
                    v.digest,
                    v.source
                );
            }
        }
        WorkflowCommand::Events {
            name,
            state,
            version,
        } => {
            let v = deployed_version(&client, &mut definitions, &name, version).await?;
            let mut problems = Vec::new();
            let Some(workflow) = govflow::lang::load::parse::<govflow::lang::model::Workflow>(
                std::path::Path::new(&v.name),
                &v.source,
                &mut problems,
            ) else {
                anyhow::bail!(
                    "the source of {} version {} does not read as a workflow: {}",
                    v.name,
                    v.version,
                    problems
                        .iter()
                        .map(|d| d.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            };
            if let Some(wanted) = &state
                && !workflow.states.iter().any(|s| s.name == *wanted)
            {
                let names: Vec<&str> = workflow.states.iter().map(|s| s.name.as_str()).collect();
                anyhow::bail!(
                    "{} version {} has no state `{wanted}` (its states: {})",
                    v.name,
                    v.version,
                    names.join(", ")
                );
            }
            for line in event_lines(&workflow, state.as_deref(), as_json) {
                out!("{line}");
            }
        }
        WorkflowCommand::Graph { name, format } => {
            let format = match format {
                govflow::render::Format::Dot => proto::RenderFormat::Dot,
                govflow::render::Format::Mermaid => proto::RenderFormat::Mermaid,
                govflow::render::Format::Svg => proto::RenderFormat::Svg,
            };
            let r = definitions
                .render_workflow(client.request(proto::RenderWorkflowRequest {
                    name: workflow_name(&name, None),
                    format: format as i32,
                })?)
                .await
                .map_err(|s| failure(&s))?
                .into_inner();
            out!("{}", r.content.trim_end());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn workflow_name(name: &str, version: Option<u32>) -> String {
    let base = format!("workflows/{}", bare_workflow_name(name));
    match version {
        Some(v) => format!("{base}/versions/{v}"),
        None => base,
    }
}

/// `govflow serve`: prints how to use the tokens, then serves until SIGINT or SIGTERM.
pub async fn serve(config: govflow::server::Config) -> Result<ExitCode> {
    // Bound first: a port in use must stop the start before it opens the
    // store, deploys the folder's versions or writes tokens.
    let listener = govflow::server::bind(config.listen).await?;
    let prepared = govflow::server::prepare(&config)?;
    if let Some(path) = &prepared.token_file {
        eprintln!(
            "govflow: bearer tokens for every agency and for `admin` are in {} (owner-only).",
            path.display()
        );
        eprintln!(
            "  e.g.  export GOVFLOW_TOKEN=$(grep '^\"hebei.sjz.platform\"' {} | cut -d'\"' -f4)",
            path.display()
        );
    }
    eprintln!(
        "govflow: serving {} on {} (data in {})",
        count(
            prepared.engine.library().workflows.len(),
            "workflow",
            "workflows"
        ),
        listener.local_addr().unwrap_or(config.listen),
        config.data.display()
    );
    if let Some(warning) = govflow::server::plaintext_warning(config.listen, prepared.tls.is_some())
    {
        eprintln!("govflow: warning: {warning}");
    }
    let shutdown = async {
        let term = async {
            #[cfg(unix)]
            {
                if let Ok(mut s) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    s.recv().await;
                    return;
                }
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("govflow: stopping: finishing calls under way");
    };
    govflow::server::serve_on(prepared, listener, shutdown).await?;
    eprintln!("govflow: stopped; every acknowledged step is on disk");
    Ok(ExitCode::SUCCESS)
}

/// A refused workflow source's diagnostics, as `file:line:col message`.
fn print_source_violations(details: &tonic_types::ErrorDetails, file: &std::path::Path) {
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            eprintln!(
                "{}:{} {}",
                file.display(),
                v.field.trim_start_matches("source:"),
                v.description
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: deploying a file saved as GBK said only "stream did not
    /// contain valid UTF-8", with no place and no hint, where `govflow
    /// validate` located it and said how to convert it.
    #[test]
    fn a_source_that_is_not_utf8_is_refused_located_before_it_is_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("gbk.ron");
        // `Workflow(title: "中` with 中 in GBK (D6 D0).
        std::fs::write(&file, b"Workflow(\n    title: \"\xd6\xd0\",\n)\n").expect("write");
        let refused = source_of(&file).expect_err("not UTF-8").to_string();
        assert!(
            refused.contains("gbk.ron:2:13: error[not-utf8]"),
            "{refused}"
        );
    }

    /// A change whose answer was lost on the way tells how to find out
    /// whether it was made; a refusal is only itself.
    #[test]
    fn a_watch_that_ends_says_where_to_go_on_from() {
        let ended = watch_failure(&Status::unavailable("the server is stopping"), "41");
        assert!(
            ended.to_string().ends_with(
                "hint: go on from where it stopped with `govflow case watch --cursor 41`"
            ),
            "{ended}"
        );
        let before_any = watch_failure(&Status::unavailable("the server is stopping"), "");
        assert_eq!(
            before_any.to_string(),
            "Unavailable: the server is stopping"
        );
    }

    #[test]
    fn a_lost_answer_says_how_to_retry_safely() {
        let lost = change_failure(&Status::unavailable("connection reset"), "cli-42").to_string();
        assert!(
            lost.starts_with("Unavailable: connection reset\nhint: "),
            "{lost}"
        );
        assert!(lost.contains("--request-id cli-42"), "{lost}");
        let refused = change_failure(&Status::failed_precondition("wrong state"), "cli-42");
        assert_eq!(refused.to_string(), "FailedPrecondition: wrong state");
        // Regression: a deploy whose connection broke said only "transport
        // error", though the deploy may have been made.
        let deploy = lost_change(&Status::unknown("transport error"), "deploy again");
        assert_eq!(
            deploy.hint,
            "the change may or may not have been made; deploy again"
        );
    }

    /// Regression: `--server 127.0.0.1:50051`, the address `govflow serve`
    /// prints, failed with "invalid URL, scheme is missing".
    #[test]
    fn a_server_address_without_a_scheme_is_plain_http() {
        assert_eq!(server_uri("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(server_uri("[::1]:50051"), "http://[::1]:50051");
        assert_eq!(
            server_uri("http://127.0.0.1:50051"),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            server_uri("https://gov.example:443"),
            "https://gov.example:443"
        );
    }

    fn due(s: &str) -> Option<prost_types::Timestamp> {
        let t = chrono::DateTime::parse_from_rfc3339(s).expect("time");
        Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        })
    }

    /// Regression: nothing on the command line said which payload fields an
    /// event takes (a clerk found them one refusal at a time).
    #[test]
    fn workflow_events_lists_each_events_roles_fields_and_guard() {
        let source = r#"Workflow(
            name: "w",
            title: "审批",
            roles: [Role(name: "county"), Role(name: "amr")],
            start: "review",
            states: [
                State(name: "review", title: "审查",
                    deadline: Deadline(within: Days(3), on_expiry: "late"),
                    transitions: [
                        Transition(event: "late", to: "review", roles: []),
                        Transition(event: "grant", to: "joint", title: "准予", roles: ["county"],
                            guard: "payload.days > 0",
                            payload: [
                                Field(name: "days", type: Integer, title: "期限"),
                                Field(name: "note", type: String, required: false),
                            ]),
                    ]),
                State(name: "joint", title: "会签", countersign: Countersign(roles: ["county", "amr"],
                    approved: "done", rejected: "done")),
                State(name: "done", title: "完成", outcome: "done"),
            ],
        )"#;
        let mut problems = Vec::new();
        let workflow: govflow::lang::model::Workflow =
            govflow::lang::load::parse(std::path::Path::new("w.ron"), source, &mut problems)
                .expect("parses");
        let lines = event_lines(&workflow, None, false);
        assert_eq!(
            lines,
            [
                "state review 审查  (deadline 3 days → late)",
                "  grant → joint  [county]  准予",
                "      days: an integer — 期限",
                "      note: a string (optional)",
                "      only if: payload.days > 0",
                "state joint 会签",
                "  sign → done  [county, amr]  会签同意",
                "      comment: a string (optional) — 意见",
                "  reject → done  [county, amr]  会签不同意",
                "      comment: a string (optional) — 意见",
                "state done 完成  (ends the case: done)",
            ]
        );
        let only: Vec<Json> = event_lines(&workflow, Some("review"), true)
            .iter()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0]["event"], "grant");
        assert_eq!(only[0]["payload"][1]["required"], false);
        assert_eq!(only[0]["payload"][0]["type"], json!({"kind": "integer"}));
        assert_eq!(only[0]["payload"][0]["description"], "an integer");
    }

    /// Regression: tables showed times in UTC to the nanosecond
    /// (`2026-12-11T16:00:00Z` for the end of 11 December in Beijing).
    #[test]
    fn tables_show_beijing_time_and_a_day_ends_at_24_00() {
        assert_eq!(
            shown_time(due("2020-06-01T01:00:00.123456789Z").as_ref()),
            "2020-06-01 09:00:00 +08:00"
        );
        assert_eq!(
            shown_time(due("2026-12-11T16:00:00Z").as_ref()),
            "2026-12-11 24:00:00 +08:00"
        );
        assert_eq!(
            shown_time(due("2026-12-11T16:00:01Z").as_ref()),
            "2026-12-12 00:00:01 +08:00"
        );
    }

    /// Regression: `case show` printed both reminders and the deadline as
    /// `deadline time_limit_expired <time>`.
    #[test]
    fn case_show_tells_deadlines_from_reminders() {
        let timer = |id: &str, kind: proto::TimerKind, at: &str| proto::Timer {
            id: id.into(),
            kind: kind as i32,
            event: "time_limit_expired".into(),
            due_time: due(at),
            state: "county_handling".into(),
            calendar_version: String::new(),
        };
        let case = proto::Case {
            id: "c1".into(),
            workflow: "baolian_escalation".into(),
            workflow_version: 1,
            state: "county_handling".into(),
            sequence: 2,
            timers: vec![
                timer(
                    "2:reminder:0",
                    proto::TimerKind::Reminder,
                    "2020-06-03T16:00:00Z",
                ),
                timer(
                    "2:reminder:1",
                    proto::TimerKind::Reminder,
                    "2020-06-04T16:00:00Z",
                ),
                timer("2:expiry", proto::TimerKind::Expiry, "2020-06-05T16:00:00Z"),
            ],
            ..Default::default()
        };
        let lines = case_lines(&case);
        let timers: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("time_limit_expired"))
            .collect();
        assert_eq!(
            timers,
            [
                "reminder   time_limit_expired 2020-06-03 24:00:00 +08:00",
                "reminder   time_limit_expired 2020-06-04 24:00:00 +08:00",
                "deadline   time_limit_expired 2020-06-05 24:00:00 +08:00",
            ]
        );
        assert_eq!(lines[0], "case       c1");
    }

    /// Regression: a name longer than the fixed 36 columns pushed its
    /// version and title out of line.
    #[test]
    fn workflow_list_columns_fit_the_longest_name() {
        let summary = |name: &str, version: u32, title: &str| proto::WorkflowSummary {
            name: format!("workflows/{name}"),
            title: title.into(),
            version,
            ..Default::default()
        };
        let lines = workflow_lines(&[
            summary("baolian_escalation", 3, "包联帮扶诉求办理"),
            summary("baolian_quarterly_coordination", 1, "包联季度协调"),
            summary("zzfl_filing", 12, "备案"),
        ]);
        assert_eq!(
            lines,
            [
                "workflows/baolian_escalation             v3    包联帮扶诉求办理",
                "workflows/baolian_quarterly_coordination v1    包联季度协调",
                "workflows/zzfl_filing                    v12   备案",
            ]
        );
        let version_at = |l: &String| l.find(" v").expect("a version column");
        assert!(lines.iter().all(|l| version_at(l) == version_at(&lines[1])));
    }

    /// Regression: "1 running cases", "serving 1 workflows".
    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(1, "running case", "running cases"), "1 running case");
        assert_eq!(count(0, "running case", "running cases"), "0 running cases");
        assert_eq!(count(2, "workflow", "workflows"), "2 workflows");
    }

    /// Regression: `--var credit_code=9113…` was sent as a number, and the
    /// server rightly refused it for a string variable.
    #[test]
    fn numbers_stay_text_and_json_values_are_parsed() {
        assert_eq!(assignment("credit_code=9113").expect("ok").1, json!("9113"));
        assert_eq!(assignment("days=30").expect("ok").1, json!("30"));
        assert_eq!(assignment("ok=true").expect("ok").1, json!(true));
        assert_eq!(
            assignment("list=[\"甲\",\"乙\"]").expect("ok").1,
            json!(["甲", "乙"])
        );
        assert_eq!(
            assignment("note=a=b").expect("ok"),
            ("note".to_owned(), json!("a=b"))
        );
        assert!(assignment("list=[broken").is_err());
        assert!(assignment("no-equals").is_err());
    }

    /// Regression: `workflow list` shows `workflows/gaozhi_chengnuo`, which
    /// `case start --workflow` and `case list --workflow` refused.
    #[test]
    fn a_workflow_is_named_bare_or_as_workflow_list_shows_it() {
        assert_eq!(
            bare_workflow_name("workflows/gaozhi_chengnuo"),
            "gaozhi_chengnuo"
        );
        assert_eq!(bare_workflow_name("gaozhi_chengnuo"), "gaozhi_chengnuo");
    }

    /// A refused credential says where to give or find a token.
    #[test]
    fn credential_refusals_say_where_the_token_comes_from() {
        let none = govflow::server::api::status(
            tonic::Code::Unauthenticated,
            "no-credential",
            "no credential",
            &[],
        );
        assert!(
            failure(&none)
                .to_string()
                .contains("--token or GOVFLOW_TOKEN")
        );
        let unknown = govflow::server::api::status(
            tonic::Code::Unauthenticated,
            "unknown-credential",
            "unknown or revoked token",
            &[],
        );
        assert!(failure(&unknown).to_string().contains("credentials.toml"));
    }

    /// Regression: `case start --var 's="123"'` stored the string 123, and
    /// `case list --var 's="123"'` looked for the text with its quotes.
    #[test]
    fn a_list_filter_reads_its_value_as_a_start_does() {
        for (given, text) in [
            ("s=\"123\"", "123"),
            ("s=123", "123"),
            ("s=石家庄某公司", "石家庄某公司"),
            ("s=true", "true"),
        ] {
            assert_eq!(
                variable_filter(given).expect("read"),
                ("s".to_owned(), text.to_owned())
            );
        }
    }
}
