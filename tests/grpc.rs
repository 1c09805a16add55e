//! The gRPC service over a real socket: seed processes end to end with each
//! agency's own credential, a deadline on virtual time, a restart in the
//! middle of a case, the authorisation matrix, and bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value as Json, json};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use govflow::engine::durable::{Engine, ManualClock};
use govflow::server::{self, Config, api::Watchers};
use govflow::store::proto::{
    self, audit_service_client::AuditServiceClient, cases_service_client::CasesServiceClient,
    definitions_service_client::DefinitionsServiceClient,
};
use govflow::store::records;

use crate::common::{TestStore, at, shipped};

struct Server {
    endpoint: String,
    port: u16,
    tokens: BTreeMap<String, String>,
    engine: Engine,
    watchers: Watchers,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    async fn start(data: &Path, clock: &Arc<ManualClock>) -> Server {
        Server::start_with(data, clock, |_| {}).await
    }

    /// [`Server::start`] with changes to the default configuration.
    async fn start_with(
        data: &Path,
        clock: &Arc<ManualClock>,
        configure: impl FnOnce(&mut Config),
    ) -> Server {
        let mut config = Config {
            data: data.to_path_buf(),
            workflows: shipped(),
            ..Config::default()
        };
        configure(&mut config);
        let prepared = server::prepare_with_clock(&config, clock.clone()).expect("server prepares");
        Server::serve(data, prepared).await
    }

    /// Serves what was prepared for the data folder `data`.
    async fn serve(data: &Path, prepared: server::Prepared) -> Server {
        let engine = prepared.engine.clone();
        let watchers = prepared.watchers.clone();
        let text =
            std::fs::read_to_string(data.join("credentials.toml")).expect("tokens generated");
        let tokens: BTreeMap<String, String> = toml::from_str::<toml::Table>(&text).expect("toml")
            ["tokens"]
            .as_table()
            .expect("tokens table")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let endpoint = format!("http://{addr}");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::serve_on(prepared, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serves");
        });
        Server {
            endpoint,
            port: addr.port(),
            tokens,
            engine,
            watchers,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint.clone())
            .expect("uri")
            .connect()
            .await
            .expect("connects")
    }

    /// Clients of the three services, on one connection.
    async fn clients(
        &self,
    ) -> (
        CasesServiceClient<Channel>,
        DefinitionsServiceClient<Channel>,
        AuditServiceClient<Channel>,
    ) {
        let channel = self.channel().await;
        (
            CasesServiceClient::new(channel.clone()),
            DefinitionsServiceClient::new(channel.clone()),
            AuditServiceClient::new(channel),
        )
    }

    fn token(&self, principal: &str) -> String {
        self.tokens
            .get(principal)
            .cloned()
            .unwrap_or_else(|| panic!("no token for {principal}"))
    }
}

fn authed<T>(token: Option<&str>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    request
}

fn structure(v: Json) -> Option<prost_types::Struct> {
    Some(records::to_struct(v.as_object().expect("object")))
}

/// A request to start case `id` of `workflow` (request id `{id}-start`).
fn new_case(
    id: &str,
    workflow: &str,
    bindings: &[(&str, &str)],
    variables: Json,
) -> proto::CreateCaseRequest {
    proto::CreateCaseRequest {
        request_id: format!("{id}-start"),
        case_id: id.into(),
        workflow: workflow.into(),
        bindings: bindings
            .iter()
            .map(|(r, a)| ((*r).to_owned(), (*a).to_owned()))
            .collect(),
        variables: structure(variables),
    }
}

/// A request to start 包联 case `id`, with the roles it is always started with.
fn baolian(id: &str, variables: Json) -> proto::CreateCaseRequest {
    let bindings = [
        ("work_team", "hebei.sjz.industry"),
        ("responsible_dept", "hebei.sjz.industry"),
        ("leader", "hebei.sjz.office"),
    ];
    new_case(id, "baolian_escalation", &bindings, variables)
}

/// A request to start 证照分离 registration `id`, registered by the AMR.
fn registration(request_id: &str, id: &str, variables: Json) -> proto::CreateCaseRequest {
    proto::CreateCaseRequest {
        request_id: request_id.into(),
        ..new_case(
            id,
            "zzfl_registration",
            &[("registration", "hebei.sjz.amr")],
            variables,
        )
    }
}

/// A 证照分离 registration `id` of the tests' trading company (request id
/// `start-{id}`).
fn trading_registration(id: &str) -> proto::CreateCaseRequest {
    registration(
        &format!("start-{id}"),
        id,
        json!({"enterprise_name": "石家庄某商贸有限公司", "credit_code": "91130100MA0TEST001"}),
    )
}

/// The text of the seed workflow `name` (`workflows/{name}.ron`).
fn seed_source(name: &str) -> String {
    std::fs::read_to_string(shipped().join(format!("{name}.ron"))).expect("read")
}

/// Runs the `govflow` command line (off the test's runtime threads).
async fn cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_govflow"))
            .args(args)
            .output()
            .expect("runs")
    })
    .await
    .expect("joins")
}

fn reason(status: &Status) -> String {
    server::api::reason(status)
}

fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    (dir, data)
}

/// A server on a fresh data folder (kept while the `TempDir` lives), its
/// clock at `now`.
async fn serve(now: &str) -> (tempfile::TempDir, Arc<ManualClock>, Server) {
    serve_with(now, |_| {}).await
}

/// [`serve`] with changes to the default configuration.
async fn serve_with(
    now: &str,
    configure: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, Arc<ManualClock>, Server) {
    let (dir, data) = data_dir();
    let clock = Arc::new(ManualClock::new(at(now)));
    let server = Server::start_with(&data, &clock, configure).await;
    (dir, clock, server)
}

/// Drains an ExportHistory stream: its lines and skipped records, or the
/// first error (before the stream or in it).
async fn export_lines(
    audit: &mut AuditServiceClient<Channel>,
    token: Option<&str>,
    request: proto::ExportHistoryRequest,
) -> Result<(Vec<String>, Vec<proto::SkippedRecord>), Status> {
    let mut stream = audit
        .export_history(authed(token, request))
        .await?
        .into_inner();
    let (mut lines, mut skipped) = (Vec::new(), Vec::new());
    while let Some(message) = stream.message().await? {
        lines.extend(message.json_lines);
        skipped.extend(message.skipped_records);
    }
    Ok((lines, skipped))
}

/// CheckMigration of `source`, asked as `token`.
async fn check_migration(
    audit: &AuditServiceClient<Channel>,
    token: &str,
    source: &str,
) -> proto::CheckMigrationResponse {
    let request = proto::CheckMigrationRequest {
        source: source.into(),
    };
    audit
        .clone()
        .check_migration(authed(Some(token), request))
        .await
        .expect("checked")
        .into_inner()
}

/// "agency:{id}", "timer:{id}" or "engine", as ReplayCase names an actor.
fn actor_name(actor: Option<&proto::Actor>) -> String {
    match records::from_actor(actor) {
        govflow::engine::Actor::Agency(a) => format!("agency:{a}"),
        govflow::engine::Actor::Timer(t) => format!("timer:{t}"),
        govflow::engine::Actor::Engine => "engine".into(),
    }
}

/// Audits every case the server holds as an auditor does, over gRPC: each
/// case replays exactly as stored, step by step (ReplayCase against
/// ListHistoryEntries); the whole store replays (`audit::replay_all`); the
/// export (ExportHistory) passes the independent Python verifier, which
/// names the entries of tampered copies. Returns the entries audited.
async fn audited(server: &Server) -> u64 {
    let auditor = server.token("hebei.sjz.audit");
    let t = Some(auditor.as_str());
    let (mut cases, _, mut audit) = server.clients().await;
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = cases
            .list_cases(authed(
                t,
                proto::ListCasesRequest {
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                },
            ))
            .await
            .expect("list")
            .into_inner();
        all.extend(page.cases);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut total = 0;
    for case in &all {
        let name = format!("cases/{}", case.id);
        let stored = audit
            .list_history_entries(authed(
                t,
                proto::ListHistoryEntriesRequest {
                    parent: name.clone(),
                    page_size: 1000,
                    page_token: String::new(),
                },
            ))
            .await
            .expect("history")
            .into_inner()
            .history_entries;
        let replayed = audit
            .replay_case(authed(t, proto::ReplayCaseRequest { name }))
            .await
            .expect("replay")
            .into_inner();
        assert!(
            replayed.matches,
            "{}: {}",
            case.id, replayed.divergence_reason
        );
        assert_eq!(stored.len() as u64, case.sequence, "{}", case.id);
        assert_eq!(replayed.steps.len(), stored.len(), "{}", case.id);
        for (step, entry) in replayed.steps.iter().zip(&stored) {
            assert_eq!(
                (step.sequence, step.time, &step.event),
                (entry.sequence, entry.time, &entry.event),
                "{}",
                case.id
            );
            assert_eq!(
                (&step.actor, &step.from_state, &step.to_state),
                (
                    &actor_name(entry.actor.as_ref()),
                    &entry.from_state,
                    &entry.to_state
                ),
                "{}",
                case.id
            );
            assert_eq!(
                step.variables_changed, entry.variables_changed,
                "{}",
                case.id
            );
        }
        total += case.sequence;
    }
    let engine = server.engine.clone();
    let report = tokio::task::spawn_blocking(move || {
        govflow::audit::replay_all(
            &govflow::audit::StoreSource(engine.store().as_ref()),
            &engine.library(),
            &govflow::audit::VerifyScope::All,
            None,
        )
    })
    .await
    .expect("joins")
    .expect("replays");
    assert!(report.matches(), "{:#?}", report.divergences);
    assert_eq!((report.cases, report.entries), (all.len() as u64, total));

    let (lines, skipped) = export_lines(&mut audit, t, proto::ExportHistoryRequest::default())
        .await
        .expect("export");
    assert!(skipped.is_empty(), "{skipped:?}");
    // Every entry, after each case's entries its head line, and last the
    // export's end line.
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("\"end_of_export\":true")),
        "{lines:?}"
    );
    let heads = lines.iter().filter(|l| l.contains("\"head_hash\"")).count();
    assert_eq!((lines.len() - heads - 1) as u64, total);
    assert_eq!(heads, all.len());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("export.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").expect("write");
    crate::audit::python_accepts(&path, total, all.len());
    crate::audit::python_catches_tampering(&path);
    total
}

struct Agent {
    cases: CasesServiceClient<Channel>,
    token: String,
    n: u32,
}

impl Agent {
    async fn new(server: &Server, agency: &str) -> Agent {
        Agent {
            cases: CasesServiceClient::new(server.channel().await),
            token: server.token(agency),
            n: 0,
        }
    }

    /// CreateCase, as this agency.
    async fn create(
        &mut self,
        request: proto::CreateCaseRequest,
    ) -> Result<proto::CreateCaseResponse, Status> {
        self.cases
            .create_case(authed(Some(&self.token), request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// GetCase `cases/{case}`, as this agency.
    async fn get(&mut self, case: &str) -> Result<proto::Case, Status> {
        let request = proto::GetCaseRequest {
            name: format!("cases/{case}"),
        };
        self.cases
            .get_case(authed(Some(&self.token), request))
            .await
            .map(|r| r.into_inner().case.expect("case"))
    }

    async fn fire(
        &mut self,
        case: &str,
        event: &str,
        payload: Json,
    ) -> Result<proto::Case, Status> {
        self.n += 1;
        let request = proto::FireEventRequest {
            request_id: format!("{}-{case}-{event}-{}", &self.token[3..11], self.n),
            case: format!("cases/{case}"),
            event: event.into(),
            payload: structure(payload),
            expected_sequence: None,
        };
        self.cases
            .fire_event(authed(Some(&self.token), request))
            .await
            .map(|r| r.into_inner().case.expect("case"))
    }
}

/// The program an example client runs with, from `variable`, or `None`
/// (the test is skipped) when it is not set and `required` is not either.
fn example_client(variable: &str, required: &str) -> Option<std::ffi::OsString> {
    let found = std::env::var_os(variable);
    if found.is_none() {
        assert!(
            std::env::var_os(required).is_none(),
            "{required} is set but {variable} is not"
        );
        eprintln!("SKIPPED an example client: {variable} is not set");
    }
    found
}

/// Runs an example department system (`client`, given the server, the case
/// id and the token file) against a fresh server: it must end with the
/// 告知承诺 case `case_id` granted and watched through.
async fn example_client_runs_a_gaozhi_case(mut client: std::process::Command, case_id: &str) {
    let (dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    client
        .args(["--server", &format!("127.0.0.1:{}", server.port)])
        .args(["--case-id", case_id])
        .arg("--credentials")
        .arg(dir.path().join("data/credentials.toml"));
    // Off the runtime's thread, which serves the client's calls meanwhile.
    let output = tokio::task::spawn_blocking(move || client.output())
        .await
        .expect("joins")
        .expect("the client runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("watched start → apply → inform → commit → grant"),
        "{text}"
    );
    let case = server.engine.case(case_id).expect("the case is stored");
    assert_eq!(case.state, "operating");
    server.stop().await;
}

/// A department system in another language: `examples/python/gaozhi_client.py`
/// (grpcio, stubs generated from `proto/`) runs a 告知承诺 case with each
/// agency's own token and checks the refusals and their reasons, the retry,
/// the inbox and the watch. It needs a Python with
/// `examples/python/requirements.txt` in `GOVFLOW_GRPC_PYTHON`; without one
/// the test is skipped, unless `GOVFLOW_REQUIRE_PYTHON` is set (as `.ci/run`
/// sets both).
#[tokio::test]
async fn a_python_grpcio_client_runs_a_gaozhi_case_with_each_agencys_token() {
    let Some(python) = example_client("GOVFLOW_GRPC_PYTHON", "GOVFLOW_REQUIRE_PYTHON") else {
        return;
    };
    let mut client = std::process::Command::new(python);
    client.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/gaozhi_client.py"));
    example_client_runs_a_gaozhi_case(client, "gz-python").await;
}

/// The same case from Node.js: `examples/node/gaozhi_client.mjs` (grpc-js,
/// its own HTTP/2 stack, services loaded from `proto/` at run time). It needs
/// `GOVFLOW_GRPC_NODE_DIR`, a folder where `npm ci` installed
/// `examples/node/package.json`; the script is run from there. Skipped
/// without it unless `GOVFLOW_REQUIRE_NODE` is set (as `.ci/run` sets both).
#[tokio::test]
async fn a_node_grpc_js_client_runs_a_gaozhi_case_with_each_agencys_token() {
    let Some(dir) = example_client("GOVFLOW_GRPC_NODE_DIR", "GOVFLOW_REQUIRE_NODE") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Beside its node_modules, where Node resolves the packages it imports.
    let script = Path::new(&dir).join("gaozhi_client.mjs");
    std::fs::copy(root.join("examples/node/gaozhi_client.mjs"), &script).expect("copied");
    let mut client = std::process::Command::new("node");
    client.arg(script).arg("--proto").arg(root.join("proto"));
    example_client_runs_a_gaozhi_case(client, "gz-node").await;
}

#[tokio::test]
async fn a_gaozhi_case_runs_end_to_end_across_a_restart_with_each_agencys_own_credential() {
    let (_dir, data) = data_dir();
    let clock = Arc::new(ManualClock::new(at("2020-03-16T09:00:00+08:00")));
    let server = Server::start(&data, &clock).await;
    let mut platform = Agent::new(&server, "hebei.sjz.platform").await;
    let mut approval = Agent::new(&server, "hebei.sjz.approval").await;
    let start = new_case(
        "gz-1",
        "gaozhi_chengnuo",
        &[
            ("approval", "hebei.sjz.approval"),
            ("supervision", "hebei.sjz.housing"),
            ("registration", "hebei.sjz.amr"),
        ],
        json!({"permit_id": "SGXK-1", "permit_name": "建筑工程施工许可", "enterprise_name": "石家庄某置业有限公司", "credit_code": "91130102MA0HOUS001"}),
    );
    let case = platform
        .create(start)
        .await
        .expect("started")
        .case
        .expect("case");
    assert_eq!(case.state, "awaiting_application");
    platform
        .fire("gz-1", "apply", json!({}))
        .await
        .expect("apply");
    // The approval department sees it in its inbox, with what it may do.
    let inbox = approval
        .cases
        .list_inbox(authed(
            Some(&approval.token),
            proto::ListInboxRequest::default(),
        ))
        .await
        .expect("inbox")
        .into_inner();
    assert_eq!(inbox.items.len(), 1);
    assert_eq!(inbox.items[0].events, ["inform"]);
    approval
        .fire("gz-1", "inform", json!({"conditions": ["已取得建设工程规划许可证"], "supervision_rules": "领证后30日内核查", "breach_consequences": "撤销许可", "model_letter": "示范文本"}))
        .await
        .expect("inform");

    // A restart in the middle of the case.
    server.stop().await;
    let server = Server::start(&data, &clock).await;
    let mut platform = Agent::new(&server, "hebei.sjz.platform").await;
    let mut approval = Agent::new(&server, "hebei.sjz.approval").await;
    let mut supervision = Agent::new(&server, "hebei.sjz.housing").await;

    platform
        .fire(
            "gz-1",
            "commit",
            json!({"kind": "conditions_met", "commitment_text": "承诺已具备条件", "materials": ["告知承诺书（已签章）", "建设工程规划许可证"]}),
        )
        .await
        .expect("commit");
    // Only the approval department decides.
    let refused = platform
        .fire("gz-1", "grant", json!({}))
        .await
        .expect_err("not the platform's to decide");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(reason(&refused), "role-not-allowed");
    let granted = approval
        .fire("gz-1", "grant", json!({}))
        .await
        .expect("grant");
    assert_eq!(granted.state, "operating");
    assert_eq!(
        records::from_struct(granted.variables.as_ref())["may_operate"],
        json!(true)
    );
    let assessed = supervision
        .fire("gz-1", "assess_risk", json!({"risk": "low"}))
        .await;
    let case = match assessed {
        Ok(case) => case,
        Err(status) => panic!("assess_risk: {status:?}"),
    };
    assert_eq!(case.state, "risk_inspection");
    // The history, read by an auditor over gRPC, is chained.
    let mut audit = AuditServiceClient::new(server.channel().await);
    let history = audit
        .list_history_entries(authed(
            Some(&server.token("hebei.sjz.audit")),
            proto::ListHistoryEntriesRequest {
                parent: "cases/gz-1".into(),
                page_size: 0,
                page_token: String::new(),
            },
        ))
        .await
        .expect("history")
        .into_inner()
        .history_entries;
    assert_eq!(history.len() as u64, case.sequence);
    for pair in history.windows(2) {
        assert_eq!(pair[1].previous_hash, pair[0].hash);
        assert_eq!(pair[1].hash, records::entry_hash(&pair[1]).to_vec());
    }
    // The auditor verifies every chain, replays the case, and travels back in time.
    let auditor = server.token("hebei.sjz.audit");
    let verified = audit
        .verify_history(authed(
            Some(&auditor),
            proto::VerifyHistoryRequest::default(),
        ))
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.findings.is_empty(), "{:?}", verified.findings);
    assert_eq!(verified.findings_total, 0);
    assert_eq!(verified.entries, case.sequence);
    let replayed = audit
        .replay_case(authed(
            Some(&auditor),
            proto::ReplayCaseRequest {
                name: "cases/gz-1".into(),
            },
        ))
        .await
        .expect("replay")
        .into_inner();
    assert!(replayed.matches, "{}", replayed.divergence_reason);
    assert_eq!(replayed.steps.len() as u64, case.sequence);
    assert_eq!(replayed.steps_total, case.sequence);
    assert_eq!(replayed.steps[1].actor, "agency:hebei.sjz.platform");
    let then = audit
        .get_case_at(authed(
            Some(&auditor),
            proto::GetCaseAtRequest {
                name: "cases/gz-1".into(),
                at: Some(proto::get_case_at_request::At::Sequence(2)),
            },
        ))
        .await
        .expect("time travel")
        .into_inner()
        .case
        .expect("case");
    assert_eq!((then.state.as_str(), then.sequence), ("applied", 2));
    // Regression: the case as of a step had no head hash.
    assert_eq!(then.head_hash, history[1].hash);
    // Verifying every case is for auditors.
    let refused = audit
        .verify_history(authed(
            Some(&server.token("hebei.sjz.approval")),
            proto::VerifyHistoryRequest::default(),
        ))
        .await
        .expect_err("not an auditor");
    assert_eq!(refused.code(), Code::PermissionDenied);
    audited(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_baolian_problem_escalates_to_supervision_and_the_leader_as_deadlines_pass_on_virtual_time()
 {
    let (_dir, clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    let mut platform = Agent::new(&server, "hebei.sjz.platform").await;
    let mut team = Agent::new(&server, "hebei.sjz.industry").await;
    let start = baolian(
        "bl-1",
        json!({"enterprise_name": "石家庄藁城某装备制造有限公司", "credit_code": "91130182MA0A000002", "county": "hebei.sjz.gaocheng", "problem_summary": "缺少能耗指标"}),
    );
    platform.create(start).await.expect("started");
    team.fire("bl-1", "classify", json!({"level": "county"}))
        .await
        .expect("classified");
    let mut county = Agent::new(&server, "hebei.sjz.gaocheng").await;
    county
        .fire("bl-1", "report_progress", json!({"progress": "已申请调剂"}))
        .await
        .expect("report");
    // Ten working days later (past National Day), the county's limit has
    // passed: the problem is put under 督办, still the county's to solve.
    clock.set(at("2020-10-11T00:00:01+08:00"));
    server.engine.tick().await.expect("timers fire");
    let case = county.get("bl-1").await.expect("the county still sees it");
    assert_eq!(case.state, "supervised");
    assert_eq!(case.bindings["handler"], "hebei.sjz.gaocheng");
    // Five working days of 督办 pass too: it goes to the 包联市领导.
    clock.set(at("2020-10-17T00:00:01+08:00"));
    server.engine.tick().await.expect("timers fire");
    let mut leader = Agent::new(&server, "hebei.sjz.office").await;
    let case = leader.get("bl-1").await.expect("the leader sees the case");
    assert_eq!(case.state, "leader_coordination");
    // The county may no longer report it solved.
    let refused = county
        .fire("bl-1", "resolve", json!({"solution": "已协调"}))
        .await
        .expect_err("only the leader resolves now");
    assert_eq!(refused.code(), Code::PermissionDenied);
    audited(&server).await;
    server.stop().await;
}

/// Every RPC × {no credential, an agency without a role, the agency with
/// one, an auditor, the admin}.
#[tokio::test]
async fn the_authorisation_matrix_holds_for_every_rpc() {
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let (mut cases, mut definitions, mut audit) = server.clients().await;
    let platform = server.token("hebei.sjz.platform");
    let start = trading_registration;
    cases
        .create_case(authed(Some(&platform), start("m-1")))
        .await
        .expect("the matrix's case");
    // A case the agency with a role in the first has none in: the auditor
    // sees both.
    cases
        .create_case(authed(
            Some(&platform),
            new_case(
                "m-gz",
                "gaozhi_chengnuo",
                &[
                    ("approval", "hebei.sjz.approval"),
                    ("supervision", "hebei.sjz.housing"),
                    ("registration", "hebei.sjz.zhengding_ftz"),
                ],
                json!({"permit_id": "SGXK-1", "permit_name": "建筑工程施工许可", "enterprise_name": "某公司", "credit_code": "91130102MA0HOUS001"}),
            ),
        ))
        .await
        .expect("a case without the agency");
    let source = seed_source("zzfl_abolish");
    let registration = seed_source("zzfl_registration");

    let principals: [(&str, Option<String>); 5] = [
        ("none", None),
        ("other agency", Some(server.token("hebei.sjz.tax"))),
        ("agency with a role", Some(server.token("hebei.sjz.amr"))),
        ("auditor", Some(server.token("hebei.sjz.audit"))),
        ("admin", Some(server.token("admin"))),
    ];
    // Expected code per RPC, in the order of `principals`.
    use Code::{NotFound, Ok as Fine, PermissionDenied as Denied, Unauthenticated as Unauth};
    let expected: [(&str, [Code; 5]); 17] = [
        ("CreateCase", [Unauth, Denied, Fine, Denied, Denied]),
        ("FireEvent", [Unauth, NotFound, Fine, Denied, Denied]),
        ("GetCase", [Unauth, NotFound, Fine, Fine, Fine]),
        ("ListCases", [Unauth, Fine, Fine, Fine, Fine]),
        ("ListInbox", [Unauth, Fine, Fine, Fine, Fine]),
        ("ListHistoryEntries", [Unauth, NotFound, Fine, Fine, Fine]),
        ("VerifyHistory", [Unauth, NotFound, Fine, Fine, Fine]),
        ("ReplayCase", [Unauth, NotFound, Fine, Fine, Fine]),
        ("GetCaseAt", [Unauth, NotFound, Fine, Fine, Fine]),
        ("ExportHistory", [Unauth, NotFound, Fine, Fine, Fine]),
        ("CheckMigration", [Unauth, Denied, Denied, Fine, Fine]),
        ("DeployWorkflow", [Unauth, Denied, Denied, Denied, Fine]),
        (
            "DeployWorkflow checked",
            [Unauth, Denied, Denied, Denied, Fine],
        ),
        ("ValidateWorkflow", [Unauth, Fine, Fine, Fine, Fine]),
        ("ListWorkflows", [Unauth, Fine, Fine, Fine, Fine]),
        ("GetWorkflow", [Unauth, Fine, Fine, Fine, Fine]),
        ("RenderWorkflow", [Unauth, Fine, Fine, Fine, Fine]),
    ];
    let mut failures = Vec::new();
    for (rpc, codes) in expected {
        for (i, (who, token)) in principals.iter().enumerate() {
            let t = token.as_deref();
            let n = format!("{rpc}-{i}");
            let got = match rpc {
                "CreateCase" => cases.create_case(authed(t, start(&format!("m-new-{i}")))).await.map(|_| ()),
                "FireEvent" => cases
                    .fire_event(authed(t, proto::FireEventRequest { request_id: n, case: "cases/m-1".into(), event: "register".into(), payload: structure(json!({"credit_code": "91130100MA0TEST001", "business_scope": "日用百货零售", "permits": []})), expected_sequence: None }))
                    .await
                    .map(|_| ()),
                "GetCase" => cases.get_case(authed(t, proto::GetCaseRequest { name: "cases/m-1".into() })).await.map(|_| ()),
                "ListCases" => cases.list_cases(authed(t, proto::ListCasesRequest::default())).await.map(|_| ()),
                "ListInbox" => cases.list_inbox(authed(t, proto::ListInboxRequest::default())).await.map(|_| ()),
                "ListHistoryEntries" => audit.list_history_entries(authed(t, proto::ListHistoryEntriesRequest { parent: "cases/m-1".into(), ..Default::default() })).await.map(|_| ()),
                "VerifyHistory" => audit.verify_history(authed(t, proto::VerifyHistoryRequest { case: "cases/m-1".into(), workflow: String::new() })).await.map(|_| ()),
                "ReplayCase" => audit.replay_case(authed(t, proto::ReplayCaseRequest { name: "cases/m-1".into() })).await.map(|_| ()),
                "GetCaseAt" => audit
                    .get_case_at(authed(t, proto::GetCaseAtRequest { name: "cases/m-1".into(), at: Some(proto::get_case_at_request::At::Sequence(1)) }))
                    .await
                    .map(|_| ()),
                "ExportHistory" => export_lines(&mut audit, t, proto::ExportHistoryRequest { case: "cases/m-1".into(), ..Default::default() }).await.map(|_| ()),
                "CheckMigration" => audit.check_migration(authed(t, proto::CheckMigrationRequest { source: registration.clone() })).await.map(|_| ()),
                "DeployWorkflow" => definitions.deploy_workflow(authed(t, proto::DeployWorkflowRequest { source: source.clone(), require_migration_check: false })).await.map(|_| ()),
                "DeployWorkflow checked" => definitions.deploy_workflow(authed(t, proto::DeployWorkflowRequest { source: source.clone(), require_migration_check: true })).await.map(|_| ()),
                "ValidateWorkflow" => definitions.validate_workflow(authed(t, proto::ValidateWorkflowRequest { source: source.clone() })).await.map(|_| ()),
                "ListWorkflows" => definitions.list_workflows(authed(t, proto::ListWorkflowsRequest::default())).await.map(|_| ()),
                "GetWorkflow" => definitions.get_workflow(authed(t, proto::GetWorkflowRequest { name: "workflows/zzfl_abolish".into() })).await.map(|_| ()),
                "RenderWorkflow" => definitions.render_workflow(authed(t, proto::RenderWorkflowRequest { name: "workflows/zzfl_abolish".into(), format: proto::RenderFormat::Svg as i32 })).await.map(|_| ()),
                other => panic!("unknown rpc {other}"),
            };
            let code = got.as_ref().err().map_or(Code::Ok, |s| s.code());
            if code != codes[i] {
                failures.push(format!("{rpc} as {who}: {code:?}, expected {:?}", codes[i]));
            }
            if let Err(s) = &got
                && code == Code::Unauthenticated
                && reason(s) != "no-credential"
            {
                failures.push(format!("{rpc} as {who}: reason `{}`", reason(s)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // What each sees in lists: an agency only its own cases, the auditor all.
    let listed = |token: &str| {
        let mut cases = cases.clone();
        let token = token.to_owned();
        async move {
            cases
                .list_cases(authed(Some(&token), proto::ListCasesRequest::default()))
                .await
                .expect("list")
                .into_inner()
                .cases
                .len()
        }
    };
    assert_eq!(listed(&server.token("hebei.sjz.tax")).await, 0);
    assert!(listed(&server.token("hebei.sjz.amr")).await >= 1);
    assert!(listed(&server.token("hebei.sjz.audit")).await >= 3);
    // The same in exports and migration checks: an agency is told only of
    // its own cases, even when it asks for another agency's.
    let exported = |token: String, agency: &str| {
        let mut audit = audit.clone();
        let agency = agency.to_owned();
        async move {
            let request = proto::ExportHistoryRequest {
                agency,
                ..Default::default()
            };
            let (lines, _) = export_lines(&mut audit, Some(&token), request)
                .await
                .expect("export");
            lines
                .iter()
                .filter_map(|l| {
                    let line = serde_json::from_str::<Json>(l).expect("json");
                    line["case_id"].as_str().map(str::to_owned)
                })
                .collect::<std::collections::BTreeSet<String>>()
        }
    };
    assert!(exported(server.token("hebei.sjz.tax"), "").await.is_empty());
    assert!(
        exported(server.token("hebei.sjz.tax"), "hebei.sjz.amr")
            .await
            .is_empty()
    );
    let own = exported(server.token("hebei.sjz.amr"), "").await;
    assert!(own.contains("m-1"), "{own:?}");
    let all = exported(server.token("hebei.sjz.audit"), "").await;
    assert!(all.len() >= 3 && own.is_subset(&all), "{all:?}");
    let running = async |token: String| {
        check_migration(&audit, &token, &registration)
            .await
            .running_cases
    };
    // m-1 is registered (closed); the case the matrix started runs.
    assert_eq!(running(server.token("hebei.sjz.audit")).await, 1);
    audited(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_a_reason_every_time() {
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let (mut cases, mut definitions, mut audit) = server.clients().await;
    let amr = server.token("hebei.sjz.amr");
    let platform = server.token("hebei.sjz.platform");
    let t = Some(platform.as_str());
    // A migration check is for auditors.
    let auditor = server.token("hebei.sjz.audit");
    let a = Some(auditor.as_str());
    let start = registration(
        "s",
        "b-1",
        json!({"enterprise_name": "某公司", "credit_code": "91130100MA0TEST002"}),
    );
    cases
        .create_case(authed(t, start.clone()))
        .await
        .expect("started");
    // The start state renamed: b-1, which is in it, would no longer replay.
    let registration_renamed =
        seed_source("zzfl_registration").replace("\"applied\"", "\"submitted\"");
    let fire =
        |event: &str, payload: Json, expected: Option<u64>, id: &str| proto::FireEventRequest {
            request_id: id.into(),
            case: "cases/b-1".into(),
            event: event.into(),
            payload: structure(payload),
            expected_sequence: expected,
        };
    let with_header = |value: &str| {
        let mut request = Request::new(proto::GetCaseRequest {
            name: "cases/b-1".into(),
        });
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("header"));
        request
    };
    let mut two_credentials = with_header(&format!("Bearer {platform}"));
    two_credentials.metadata_mut().append(
        "authorization",
        format!("Bearer {platform}").parse().expect("header"),
    );
    // The scheme's name is case-insensitive.
    cases
        .get_case(with_header(&format!("BEARER {platform}")))
        .await
        .expect("BEARER is Bearer");
    // NaN and infinities: valid protobuf, but no JSON form.
    let number = |n: f64| prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(n)),
    };
    let mut nan_in_a_list = structure(json!({"reason": "x"})).expect("struct");
    nan_in_a_list.fields.insert(
        "scores".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue {
                    values: vec![number(1.0), number(f64::NAN)],
                },
            )),
        },
    );
    let mut infinite_start = start.clone();
    infinite_start.case_id = "b-inf".into();
    infinite_start.request_id = "b-inf-start".into();
    if let Some(v) = infinite_start.variables.as_mut() {
        v.fields
            .insert("enterprise_name".into(), number(f64::INFINITY));
    }
    let checks: Vec<(&str, Result<(), Status>, Code, &str)> = vec![
        ("NaN in a payload list", cases.fire_event(authed(Some(&amr), proto::FireEventRequest { payload: Some(nan_in_a_list), ..fire("refuse", json!({}), None, "f-nan") })).await.map(|_| ()), Code::InvalidArgument, "non-finite-number"),
        ("an infinite variable", cases.create_case(authed(t, infinite_start)).await.map(|_| ()), Code::InvalidArgument, "non-finite-number"),
        ("unknown token", cases.get_case(with_header("Bearer not-a-token")).await.map(|_| ()), Code::Unauthenticated, "unknown-credential"),
        ("not a bearer token", cases.get_case(with_header(&format!("Basic {platform}"))).await.map(|_| ()), Code::Unauthenticated, "malformed-credential"),
        ("two credentials", cases.get_case(two_credentials).await.map(|_| ()), Code::Unauthenticated, "malformed-credential"),
        ("a time with negative nanoseconds", audit.get_case_at(authed(t, proto::GetCaseAtRequest { name: "cases/b-1".into(), at: Some(proto::get_case_at_request::At::Time(prost_types::Timestamp { seconds: 1_600_000_000, nanos: -1 })) })).await.map(|_| ()), Code::InvalidArgument, "bad-time"),
        ("an unknown picture format", definitions.render_workflow(authed(t, proto::RenderWorkflowRequest { name: "workflows/zzfl_abolish".into(), format: 99 })).await.map(|_| ()), Code::InvalidArgument, "bad-format"),
        ("malformed case name", cases.get_case(authed(t, proto::GetCaseRequest { name: "b-1".into() })).await.map(|_| ()), Code::InvalidArgument, "bad-resource-name"),
        ("a case id no case can have", cases.fire_event(authed(t, proto::FireEventRequest { case: format!("cases/{}", "b".repeat(3000)), request_id: "long".into(), event: "x".into(), ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "bad-case-id"),
        ("a step past the head", audit.get_case_at(authed(t, proto::GetCaseAtRequest { name: "cases/b-1".into(), at: Some(proto::get_case_at_request::At::Sequence(99)) })).await.map(|_| ()), Code::OutOfRange, "out-of-range"),
        ("unknown case", cases.get_case(authed(t, proto::GetCaseRequest { name: "cases/nope".into() })).await.map(|_| ()), Code::NotFound, "case-not-found"),
        ("unknown workflow", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "u".into(), case_id: "b-9".into(), workflow: "nope".into(), ..start.clone() })).await.map(|_| ()), Code::NotFound, "unknown-workflow"),
        ("an unknown workflow and no case id", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "u2".into(), case_id: String::new(), workflow: "告知承诺".into(), ..start.clone() })).await.map(|_| ()), Code::NotFound, "unknown-workflow"),
        ("no request id", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: String::new(), case_id: "b-2".into(), ..start.clone() })).await.map(|_| ()), Code::InvalidArgument, "missing-field"),
        ("a request id too long to keep", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "r".repeat(257), case_id: "b-2".into(), ..start.clone() })).await.map(|_| ()), Code::InvalidArgument, "bad-request-id"),
        ("a case id like a command-line option", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "dash-id".into(), case_id: "-x".into(), ..start.clone() })).await.map(|_| ()), Code::InvalidArgument, "bad-case-id"),
        ("bad case id", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "bad-id".into(), case_id: "a b".into(), ..start.clone() })).await.map(|_| ()), Code::InvalidArgument, "bad-case-id"),
        ("duplicate case", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "dup".into(), ..start.clone() })).await.map(|_| ()), Code::AlreadyExists, "case-exists"),
        ("the enterprise's side named its own registration authority", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "self".into(), case_id: "b-5".into(), bindings: [("registration".to_owned(), "hebei.sjz.platform".to_owned())].into(), ..start.clone() })).await.map(|_| ()), Code::InvalidArgument, "invalid-start"),
        ("the enterprise's side giving itself as the county that handles its problem", cases.create_case(authed(t, baolian("b-self", json!({"enterprise_name": "某公司", "credit_code": "91130100MA0TEST002", "county": "hebei.sjz.platform", "problem_summary": "用地", "category": "factor_supply"})))).await.map(|_| ()), Code::InvalidArgument, "invalid-start"),
        ("a variable the workflow keeps", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "kept".into(), case_id: "b-4".into(), variables: structure(json!({"enterprise_name": "某公司", "credit_code": "91130100MA0TEST002", "registered_at": "2020-06-01T00:00:00Z"})), ..start.clone() })).await.map(|_| ()), Code::InvalidArgument, "invalid-start"),
        ("unknown variable", cases.create_case(authed(t, proto::CreateCaseRequest { request_id: "v".into(), case_id: "b-3".into(), variables: structure(json!({"nope": 1})), ..start.clone() })).await.map(|_| ()), Code::InvalidArgument, "invalid-start"),
        ("missing payload field", cases.fire_event(authed(Some(&amr), fire("register", json!({"permits": []}), None, "f1"))).await.map(|_| ()), Code::InvalidArgument, "invalid-payload"),
        ("wrongly typed field", cases.fire_event(authed(Some(&amr), fire("register", json!({"business_scope": 3, "permits": []}), None, "f2"))).await.map(|_| ()), Code::InvalidArgument, "invalid-payload"),
        ("unknown event", cases.fire_event(authed(Some(&amr), fire("explode", json!({}), None, "f3"))).await.map(|_| ()), Code::InvalidArgument, "unknown-event"),
        ("sequence mismatch", cases.fire_event(authed(Some(&amr), fire("refuse", json!({"reason": "材料不全"}), Some(7), "f4"))).await.map(|_| ()), Code::Aborted, "sequence-mismatch"),
        ("a due_before that is no time", cases.list_cases(authed(t, proto::ListCasesRequest { due_before: Some(prost_types::Timestamp { seconds: 0, nanos: -1 }), ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "bad-time"),
        ("negative page size", cases.list_cases(authed(t, proto::ListCasesRequest { page_size: -1, ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "bad-page-size"),
        ("state without workflow", cases.list_cases(authed(t, proto::ListCasesRequest { state: "applied".into(), ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "missing-field"),
        ("a filter on an unknown workflow", cases.list_cases(authed(t, proto::ListCasesRequest { workflow: "gaozhi_chengnou".into(), ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "unknown-workflow"),
        ("a filter on an unknown state", cases.list_cases(authed(t, proto::ListCasesRequest { workflow: "gaozhi_chengnuo".into(), state: "aplied".into(), ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "unknown-state"),
        ("a filter on a variable not searchable", cases.list_cases(authed(t, proto::ListCasesRequest { workflow: "gaozhi_chengnuo".into(), variable_name: "permit_name".into(), variable_value: "x".into(), ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "not-searchable"),
        ("a filter value the variable can never have", cases.list_cases(authed(t, proto::ListCasesRequest { workflow: "baolian_escalation".into(), variable_name: "level".into(), variable_value: "planet".into(), ..Default::default() })).await.map(|_| ()), Code::InvalidArgument, "bad-variable-value"),
        ("bad workflow name", definitions.get_workflow(authed(t, proto::GetWorkflowRequest { name: "zzfl_abolish".into() })).await.map(|_| ()), Code::InvalidArgument, "bad-resource-name"),
        ("unknown workflow version", definitions.get_workflow(authed(t, proto::GetWorkflowRequest { name: "workflows/zzfl_abolish/versions/99".into() })).await.map(|_| ()), Code::NotFound, "workflow-not-found"),
        ("a version past any number", definitions.get_workflow(authed(t, proto::GetWorkflowRequest { name: "workflows/zzfl_abolish/versions/99999999999".into() })).await.map(|_| ()), Code::NotFound, "workflow-not-found"),
        ("invalid deploy", definitions.deploy_workflow(authed(Some(&server.token("admin")), proto::DeployWorkflowRequest { source: "Workflow(name: \"x\", title: \"坏\", roles: [], start: \"nowhere\", states: [])".into(), require_migration_check: false })).await.map(|_| ()), Code::InvalidArgument, "workflow-invalid"),
        ("not RON at all", definitions.deploy_workflow(authed(Some(&server.token("admin")), proto::DeployWorkflowRequest { source: "{{{".into(), require_migration_check: false })).await.map(|_| ()), Code::InvalidArgument, "workflow-invalid"),
        ("invalid checked deploy", definitions.deploy_workflow(authed(Some(&server.token("admin")), proto::DeployWorkflowRequest { source: "Workflow(name: \"x\", title: \"坏\", roles: [], start: \"nowhere\", states: [])".into(), require_migration_check: true })).await.map(|_| ()), Code::InvalidArgument, "workflow-invalid"),
        ("export: malformed case name", export_lines(&mut audit, t, proto::ExportHistoryRequest { case: "b-1".into(), ..Default::default() }).await.map(|_| ()), Code::InvalidArgument, "bad-resource-name"),
        ("export: a state no workflow has", export_lines(&mut audit, t, proto::ExportHistoryRequest { state: "nowhere".into(), ..Default::default() }).await.map(|_| ()), Code::InvalidArgument, "unknown-state"),
        ("export: unknown case", export_lines(&mut audit, t, proto::ExportHistoryRequest { case: "cases/nope".into(), ..Default::default() }).await.map(|_| ()), Code::NotFound, "case-not-found"),
        ("export: end before start", export_lines(&mut audit, t, proto::ExportHistoryRequest { start_time: Some(records::timestamp(at("2020-06-02T00:00:00Z"))), end_time: Some(records::timestamp(at("2020-06-01T00:00:00Z"))), ..Default::default() }).await.map(|_| ()), Code::InvalidArgument, "bad-time-range"),
        ("export: empty time range", export_lines(&mut audit, t, proto::ExportHistoryRequest { start_time: Some(records::timestamp(at("2020-06-01T00:00:00Z"))), end_time: Some(records::timestamp(at("2020-06-01T00:00:00Z"))), ..Default::default() }).await.map(|_| ()), Code::InvalidArgument, "bad-time-range"),
        ("export: bad timestamp", export_lines(&mut audit, t, proto::ExportHistoryRequest { start_time: Some(prost_types::Timestamp { seconds: 0, nanos: -1 }), ..Default::default() }).await.map(|_| ()), Code::InvalidArgument, "bad-time"),
        ("export: timestamp out of range", export_lines(&mut audit, t, proto::ExportHistoryRequest { end_time: Some(prost_types::Timestamp { seconds: i64::MAX, nanos: 0 }), ..Default::default() }).await.map(|_| ()), Code::InvalidArgument, "bad-time"),
        ("migration check: no source", audit.check_migration(authed(a, proto::CheckMigrationRequest { source: " ".into() })).await.map(|_| ()), Code::InvalidArgument, "missing-field"),
        ("migration check: not RON", audit.check_migration(authed(a, proto::CheckMigrationRequest { source: "{{{".into() })).await.map(|_| ()), Code::InvalidArgument, "workflow-invalid"),
        ("migration check: not a workflow", audit.check_migration(authed(a, proto::CheckMigrationRequest { source: "Agencies(agencies: [])".into() })).await.map(|_| ()), Code::InvalidArgument, "workflow-invalid"),
        ("migration check: invalid workflow", audit.check_migration(authed(a, proto::CheckMigrationRequest { source: "Workflow(name: \"x\", title: \"坏\", roles: [], start: \"nowhere\", states: [])".into() })).await.map(|_| ()), Code::InvalidArgument, "workflow-invalid"),
        ("watch: not a cursor", cases.watch_events(authed(t, proto::WatchEventsRequest { cursor: "abc".into() })).await.map(|_| ()), Code::InvalidArgument, "bad-cursor"),
        ("watch: cursor ahead of the feed", cases.watch_events(authed(t, proto::WatchEventsRequest { cursor: "999999".into() })).await.map(|_| ()), Code::InvalidArgument, "bad-cursor"),
        ("checked deploy that would break b-1", definitions.deploy_workflow(authed(Some(&server.token("admin")), proto::DeployWorkflowRequest { source: registration_renamed.clone(), require_migration_check: true })).await.map(|_| ()), Code::FailedPrecondition, "migration-check-failed"),
    ];
    let mut failures = Vec::new();
    for (what, result, code, why) in checks {
        match result {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(s) if s.code() != code || reason(&s) != why => failures.push(format!(
                "{what}: {:?} [{}] {}, expected {code:?} [{why}]",
                s.code(),
                reason(&s),
                s.message()
            )),
            // Regression: a payload's refusal named its field only in words;
            // a BadRequest violation names it for clients that read details.
            Err(s) if why == "invalid-payload" => {
                let fields: Vec<String> = s
                    .get_error_details()
                    .bad_request()
                    .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
                    .unwrap_or_default();
                if fields.len() != 1 || !fields[0].starts_with("payload.") {
                    failures.push(format!("{what}: field violations {fields:?}"));
                }
            }
            Err(_) => {}
        }
    }
    // Workflows are named as ListWorkflows shows them too, not only bare.
    let listed = cases
        .list_cases(authed(
            t,
            proto::ListCasesRequest {
                workflow: "workflows/zzfl_registration".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("a workflow's resource name filters")
        .into_inner();
    assert_eq!(
        listed
            .cases
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        ["b-1"]
    );
    // And by deadline: b-1's registration is due within a working day.
    let due = cases
        .list_cases(authed(
            t,
            proto::ListCasesRequest {
                due_before: Some(records::timestamp(at("2030-01-01T00:00:00Z"))),
                ..Default::default()
            },
        ))
        .await
        .expect("listed by deadline")
        .into_inner();
    assert_eq!(
        due.cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["b-1"]
    );
    // Under the 1 MiB message limit but over the store's record limit: refused
    // alone (it used to fail the commit and stop every later write).
    let too_large = cases
        .fire_event(authed(
            Some(&amr),
            fire(
                "refuse",
                json!({"reason": "长".repeat(70_000)}),
                None,
                "f-large",
            ),
        ))
        .await
        .expect_err("too large to store");
    if too_large.code() != Code::InvalidArgument || reason(&too_large) != "record-too-large" {
        failures.push(format!(
            "a request too large to store: {:?} [{}] {}",
            too_large.code(),
            reason(&too_large),
            too_large.message()
        ));
    }
    // Out of order: once refused the case is closed; another event on it is refused.
    cases
        .fire_event(authed(
            Some(&amr),
            fire("refuse", json!({"reason": "经营范围不符"}), None, "f5"),
        ))
        .await
        .expect("refused");
    let late = cases
        .fire_event(authed(
            Some(&amr),
            fire("refuse", json!({"reason": "再次"}), None, "f6"),
        ))
        .await
        .expect_err("closed");
    if late.code() != Code::FailedPrecondition {
        failures.push(format!("event on a closed case: {:?}", late.code()));
    }
    // Oversized: more than the 1 MiB limit, refused before it reaches the engine.
    let huge = "壹".repeat(400_000);
    let big = cases
        .fire_event(authed(
            Some(&amr),
            fire("refuse", json!({"reason": huge}), None, "f7"),
        ))
        .await
        .expect_err("too big");
    if big.code() != Code::ResourceExhausted
        || reason(&big) != "message-too-large"
        || !big.message().contains("1048576 bytes")
    {
        failures.push(format!(
            "oversized request: {:?} [{}] {}",
            big.code(),
            reason(&big),
            big.message()
        ));
    }
    // Nothing above was INTERNAL, and the validator explains an invalid source.
    let diagnostics = definitions
        .validate_workflow(authed(t, proto::ValidateWorkflowRequest { source: "Workflow(name: \"x\", title: \"坏\", roles: [], start: \"nowhere\", states: [])".into() }))
        .await
        .expect("validate answers")
        .into_inner();
    assert!(!diagnostics.valid);
    assert!(
        diagnostics
            .diagnostics
            .iter()
            .any(|d| d.code == "unknown-state" && d.line == 1),
        "{:?}",
        diagnostics.diagnostics
    );
    // Brackets nested far deeper than RON reads (a 200 KB request) are a
    // syntax error, not a stack overflow that ends the server.
    let nested = definitions
        .validate_workflow(authed(
            t,
            proto::ValidateWorkflowRequest {
                source: format!("Workflow(name: \"x\", title: {}", "[".repeat(200_000)),
            },
        ))
        .await
        .expect("validate answers nested brackets")
        .into_inner();
    assert!(
        nested.diagnostics.iter().any(|d| d.code == "syntax"),
        "{:?}",
        nested.diagnostics
    );
    // Regression: a source with a NUL byte inside a string deployed, where
    // `govflow validate` refused the same file as not text.
    let filing = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/zzfl_filing.ron"),
    )
    .expect("read")
    .replacen("title: \"", "title: \"\0", 1);
    let nul = definitions
        .deploy_workflow(authed(
            Some(&server.token("admin")),
            proto::DeployWorkflowRequest {
                source: filing,
                ..Default::default()
            },
        ))
        .await
        .expect_err("a source with a NUL byte is no text");
    assert_eq!(
        (nul.code(), reason(&nul)),
        (Code::InvalidArgument, "workflow-invalid".to_owned())
    );
    assert!(nul.message().contains("is NUL"), "{}", nul.message());
    // Regression: every problem of a large source was answered, each hint
    // listing every declared name: hundreds of megabytes for a request of a
    // few hundred kilobytes. At most 1,000 are, then how many more there are.
    let transitions: String = (0..1500)
        .map(|i| format!("Transition(event: \"e{i}\", to: \"nowhere{i}\", roles: [\"clerk\"]),"))
        .collect();
    let many = definitions
        .validate_workflow(authed(
            t,
            proto::ValidateWorkflowRequest {
                source: format!(
                    "Workflow(name: \"many\", title: \"多\", roles: [Role(name: \"clerk\", binding: Starter)], start: \"open\", states: [State(name: \"open\", title: \"办\", transitions: [{transitions}]), State(name: \"done\", title: \"完\", outcome: \"done\")])"
                ),
            },
        ))
        .await
        .expect("validate answers many problems")
        .into_inner();
    assert!(!many.valid);
    assert_eq!(many.diagnostics.len(), 1001);
    let last = many.diagnostics.last().expect("a last one");
    assert_eq!(last.code, "too-many-problems");
    assert!(
        last.message.starts_with("500 more problems"),
        "{}",
        last.message
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    server.stop().await;
}

#[tokio::test]
async fn a_watch_resumes_from_its_cursor_without_gaps_or_duplicates() {
    let (_dir, _clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    let mut stream = open_watch(&server, WATCHER, "0", None).await;
    let mut other = open_watch(&server, "hebei.sjz.tax", "0", None).await;
    baolian_case(&server, "w-1").await;
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..2 {
        let message = next_step(&mut stream, 10).await;
        seen.push(watched(&message));
        cursor = message.cursor;
    }
    drop(stream);
    // While nobody watches, the case moves on.
    let mut county = Agent::new(&server, "hebei.sjz.zhengding").await;
    for i in 0..3 {
        county
            .fire(
                "w-1",
                "report_progress",
                json!({"progress": format!("进展{i}")}),
            )
            .await
            .expect("report");
    }
    let mut resumed = open_watch(&server, WATCHER, &cursor, None).await;
    for _ in 0..3 {
        seen.push(watched(&next_step(&mut resumed, 10).await));
    }
    let expected: Vec<(String, u64)> = (1..=5).map(|s| ("w-1".to_owned(), s)).collect();
    assert_eq!(
        seen, expected,
        "every step once, in order, across the reconnection"
    );
    // An agency with no role in the case sees nothing of it.
    let nothing =
        tokio::time::timeout(std::time::Duration::from_millis(500), other.message()).await;
    assert!(
        nothing.is_err(),
        "the tax bureau was shown a step of a case it holds no role in"
    );
    audited(&server).await;
    server.stop().await;
}

/// The steps a watch shows an agency within `secs` seconds of quiet.
async fn steps_within(
    stream: &mut tonic::Streaming<proto::WatchEventsResponse>,
    quiet_ms: u64,
) -> Vec<(String, u64)> {
    let mut seen = Vec::new();
    while let Ok(message) =
        tokio::time::timeout(Duration::from_millis(quiet_ms), stream.message()).await
    {
        seen.push(watched(&message.expect("ok").expect("a step")));
    }
    seen
}

/// Regression: which steps a watch showed an agency depended on the roles
/// it held when the watch read them, not when the steps were made. A city
/// department bound away from a case was never shown the step that did it
/// (and a watch resumed later showed it nothing of the case), while the
/// agency bound in its place was shown the case's earlier steps, from
/// before it held any role. An agency now sees the steps just before or
/// after which it holds a role, live and resumed alike.
#[tokio::test]
async fn a_watch_shows_an_agency_the_steps_made_while_it_held_a_role_however_late_it_reads_them() {
    let (_dir, _clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    let department = "hebei.sjz.justice";
    let province = "hebei";
    let mut live = open_watch(&server, department, "0", None).await;
    let mut platform = Agent::new(&server, WATCHER).await;
    platform
        .create(baolian(
            "w-2",
            json!({"enterprise_name": "某企业", "credit_code": "91130100MA0WATCH03", "county": "hebei.sjz.zhengding", "problem_summary": "用地审批"}),
        ))
        .await
        .expect("started");
    let mut team = Agent::new(&server, "hebei.sjz.industry").await;
    // 2: the city department is bound as handler; 3: the case goes up to
    // the province, whose government becomes handler; 4: a step without it.
    team.fire(
        "w-2",
        "classify",
        json!({"level": "city", "department": department}),
    )
    .await
    .expect("classified");
    team.fire("w-2", "escalate", json!({"reason": "涉及省级审批权限"}))
        .await
        .expect("escalated");
    Agent::new(&server, "hebei.sjz.shuangchuang")
        .await
        .fire("w-2", "forward_to_province", json!({}))
        .await
        .expect("forwarded");
    let step = |s: u64| ("w-2".to_owned(), s);
    assert_eq!(steps_within(&mut live, 1500).await, [step(2), step(3)]);
    // Read again from the start, after the fact: the same steps.
    let mut again = open_watch(&server, department, "0", None).await;
    assert_eq!(steps_within(&mut again, 1000).await, [step(2), step(3)]);
    let mut bound_later = open_watch(&server, province, "0", None).await;
    assert_eq!(
        steps_within(&mut bound_later, 1000).await,
        [step(3), step(4)]
    );
    // The agency bound away no longer reads the case; the province does.
    let mut cases = CasesServiceClient::new(server.channel().await);
    for (agency, code) in [(department, Code::NotFound), (province, Code::Ok)] {
        let got = cases
            .get_case(authed(
                Some(&server.token(agency)),
                proto::GetCaseRequest {
                    name: "cases/w-2".into(),
                },
            ))
            .await;
        assert_eq!(
            got.map_or_else(|s| s.code(), |_| Code::Ok),
            code,
            "{agency}"
        );
    }
    audited(&server).await;
    server.stop().await;
}

/// Regression: a watch opened "from now" that was cut before its first step
/// had no cursor to resume from, and lost the steps made in between. Its
/// headers now say where it starts.
#[tokio::test]
async fn a_watch_from_now_says_where_it_starts() {
    let (_dir, _clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    baolian_case(&server, "w-0").await;
    let mut client = CasesServiceClient::new(server.channel().await);
    let response = client
        .watch_events(authed(
            Some(&server.token(WATCHER)),
            proto::WatchEventsRequest::default(),
        ))
        .await
        .expect("watching");
    let start = response
        .metadata()
        .get("cursor")
        .and_then(|v| v.to_str().ok())
        .expect("a cursor header")
        .to_owned();
    assert_ne!(start, "0", "the steps already made are behind it");
    drop(response);
    baolian_case(&server, "w-1").await;
    let mut resumed = open_watch(&server, WATCHER, &start, None).await;
    let first = watched(&next_step(&mut resumed, 10).await);
    assert_eq!(
        first,
        ("w-1".to_owned(), 1),
        "resumed from the start, not from now"
    );
    server.stop().await;
}

/// The platform watches the 包联 cases of these tests (it holds a role in each).
const WATCHER: &str = "hebei.sjz.platform";

/// A watch of `agency`'s steps after `cursor`, on its own connection. With
/// `window`, the client's HTTP/2 receive windows are that many bytes, so a
/// stream it does not read is full after a few steps.
async fn open_watch(
    server: &Server,
    agency: &str,
    cursor: &str,
    window: Option<u32>,
) -> tonic::Streaming<proto::WatchEventsResponse> {
    let mut endpoint = Channel::from_shared(server.endpoint.clone()).expect("uri");
    if window.is_some() {
        endpoint = endpoint
            .initial_stream_window_size(window)
            .initial_connection_window_size(window);
    }
    let mut client = CasesServiceClient::new(endpoint.connect().await.expect("connects"));
    client
        .watch_events(authed(
            Some(&server.token(agency)),
            proto::WatchEventsRequest {
                cursor: cursor.into(),
            },
        ))
        .await
        .expect("watching")
        .into_inner()
}

/// (case, sequence) of a watched step.
fn watched(message: &proto::WatchEventsResponse) -> (String, u64) {
    let entry = message.history_entry.as_ref().expect("entry");
    (entry.case_id.clone(), entry.sequence)
}

/// The next step on `stream`, which must come within `secs` seconds.
async fn next_step(
    stream: &mut tonic::Streaming<proto::WatchEventsResponse>,
    secs: u64,
) -> proto::WatchEventsResponse {
    tokio::time::timeout(Duration::from_secs(secs), stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("a step")
}

/// The `cursor` an ErrorInfo carries.
fn status_cursor(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get("cursor").cloned())
        .unwrap_or_else(|| panic!("no cursor in {status:?}"))
}

/// Starts 包联 case `id` (the platform) and classifies it (the work team):
/// two steps. The county (正定) then handles it.
async fn baolian_case(server: &Server, id: &str) {
    let mut platform = Agent::new(server, WATCHER).await;
    let start = baolian(
        id,
        json!({"enterprise_name": "某企业", "credit_code": "91130100MA0WATCH02", "county": "hebei.sjz.zhengding", "problem_summary": "用电增容"}),
    );
    platform.create(start).await.expect("started");
    let mut team = Agent::new(server, "hebei.sjz.industry").await;
    team.fire(id, "classify", json!({"level": "county"}))
        .await
        .expect("classified");
}

/// The county reports progress on `id` `reports` times, each report a few
/// kilobytes, so that a few dozen steps fill an HTTP/2 window. Each report
/// must be answered (durable) within a minute: a fire that waited on a
/// watcher would stall, and fail here instead of hanging the test.
async fn report_progress(mut county: Agent, id: String, reports: usize) {
    let long = "已协调供电公司现场勘察，增容方案待批复；".repeat(60);
    for i in 0..reports {
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            county.fire(
                &id,
                "report_progress",
                json!({"progress": format!("第{i}次进展：{long}")}),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("report {i} on {id} stalled"))
        .unwrap_or_else(|e| panic!("report {i} on {id}: {e:?}"));
    }
}

/// Opens a watch of [`WATCHER`]'s steps that is never read, then runs 包联
/// case `id` with 120 long reports: more than the watch's window and the
/// server's queue hold.
async fn unread_watch(server: &Server, id: &str) -> tonic::Streaming<proto::WatchEventsResponse> {
    let slow = open_watch(server, WATCHER, "", Some(65_535)).await;
    baolian_case(server, id).await;
    let county = Agent::new(server, "hebei.sjz.zhengding").await;
    report_progress(county, id.into(), 120).await;
    slow
}

/// Polls `done` every 100 ms until it holds; false if it does not within a
/// minute.
async fn within_a_minute(done: impl Fn() -> bool) -> bool {
    for _ in 0..600 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Polls until `watchers` watch tasks are running; false after a minute.
async fn watch_tasks_become(server: &Server, watchers: usize) -> bool {
    within_a_minute(|| server.watchers.running() == watchers).await
}

/// Issue 5, point 5: a watcher that does not read never slows the engine; it
/// is cut off with RESOURCE_EXHAUSTED `slow-watcher` and a cursor, after the
/// steps already queued for it, and resuming from that cursor gives the rest
/// of the feed without a gap or a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_cut_off_without_slowing_the_engine_and_resumes_from_its_cursor() {
    const CASES: usize = 6;
    const REPORTS: usize = 50;
    let total = CASES * (2 + REPORTS);
    let (_dir, _clock, server) =
        serve_with("2020-09-21T09:00:00+08:00", |c| c.watch_cutoff_ms = 1000).await;
    // Opened before the first step, never read until the end: a 64 KiB
    // window holds about fifteen steps, the server's queue 64 more.
    let mut slow = open_watch(&server, WATCHER, "0", Some(65_535)).await;
    // The same agency's feed, read as it comes.
    let mut reading = open_watch(&server, WATCHER, "0", None).await;
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < total {
            let message =
                tokio::time::timeout(std::time::Duration::from_secs(60), reading.message())
                    .await
                    .expect("the reading watcher is kept up to date")
                    .expect("the reading watcher is not cut off")
                    .expect("a step");
            seen.push(watched(&message));
        }
        seen
    });
    let mut reporters = Vec::new();
    for c in 0..CASES {
        let id = format!("slow-{c}");
        baolian_case(&server, &id).await;
        let county = Agent::new(&server, "hebei.sjz.zhengding").await;
        reporters.push(tokio::spawn(report_progress(county, id, REPORTS)));
    }
    for reporter in reporters {
        reporter.await.expect("every report answered");
    }
    // The feed as the engine recorded it: every step of every case, once.
    let feed: Vec<(String, u64)> = server
        .engine
        .feed(0, 100_000)
        .expect("feed")
        .into_iter()
        .map(|f| (f.case_id, f.sequence))
        .collect();
    assert_eq!(feed.len(), total);
    let seen = reader.await.expect("reader");
    assert_eq!(
        seen, feed,
        "the reading watcher got the whole feed, in order"
    );
    // The reader has gone; the slow watcher's task ends by itself at the
    // cut-off, although its client neither reads nor goes away.
    assert!(
        watch_tasks_become(&server, 0).await,
        "{} watch tasks still running",
        server.watchers.running()
    );
    assert_eq!(
        server.watchers.open(),
        1,
        "only the slow stream is held, for its client to read"
    );
    // Now the slow client reads: the steps queued for it, then the cut-off.
    let mut got = Vec::new();
    let mut last_cursor = String::new();
    let cut = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), slow.message())
            .await
            .expect("the queued steps and the status are delivered")
        {
            Ok(Some(message)) => {
                got.push(watched(&message));
                last_cursor = message.cursor;
            }
            Ok(None) => panic!("the slow stream ended without a status after {}", got.len()),
            Err(status) => break status,
        }
    };
    assert_eq!(cut.code(), Code::ResourceExhausted, "{cut:?}");
    assert_eq!(reason(&cut), "slow-watcher", "{cut:?}");
    assert!(
        !got.is_empty() && got.len() < total,
        "{} of {total} steps before the cut-off",
        got.len()
    );
    let cursor = status_cursor(&cut);
    assert_eq!(
        cursor, last_cursor,
        "the cut-off's cursor is that of the last step delivered before it"
    );
    // Resuming from it: the rest of the feed, nothing twice.
    let mut resumed = open_watch(&server, WATCHER, &cursor, None).await;
    while got.len() < total {
        got.push(watched(&next_step(&mut resumed, 30).await));
    }
    let more = tokio::time::timeout(std::time::Duration::from_millis(300), resumed.message()).await;
    assert!(more.is_err(), "a step beyond the feed: {more:?}");
    assert_eq!(got, feed, "cut off and resumed: every step once, in order");
    drop(resumed);
    audited(&server).await;
    server.stop().await;
}

/// A watch task blocked on a client that does not read ends as soon as the
/// client goes away, long before the cut-off.
#[tokio::test]
async fn a_watch_task_ends_when_its_client_goes_away() {
    // Nobody is cut off during this test.
    let no_cutoff = |c: &mut Config| c.watch_cutoff_ms = 3_600_000;
    let (_dir, _clock, server) = serve_with("2020-09-21T09:00:00+08:00", no_cutoff).await;
    let slow = unread_watch(&server, "gone-1").await;
    assert_eq!(
        server.watchers.running(),
        1,
        "the watch task waits on its client"
    );
    drop(slow);
    assert!(
        watch_tasks_become(&server, 0).await,
        "the watch task outlived its client"
    );
    within_a_minute(|| server.watchers.open() == 0).await;
    assert_eq!(server.watchers.open(), 0, "the stream outlived its client");
    server.stop().await;
}

/// Stopping drains calls under way, but a watcher that never reads cannot
/// hold the server (and the engine's last sync) forever: it gets the
/// cut-off time, like any watcher that leaves a step unread.
#[tokio::test]
async fn stopping_the_server_does_not_wait_forever_on_a_watcher_that_never_reads() {
    let (_dir, _clock, server) =
        serve_with("2020-09-21T09:00:00+08:00", |c| c.watch_cutoff_ms = 1000).await;
    let watchers = server.watchers.clone();
    let _slow = unread_watch(&server, "stop-1").await;
    tokio::time::timeout(std::time::Duration::from_secs(60), server.stop())
        .await
        .expect("the server stopped although a watcher never read");
    assert_eq!(watchers.running(), 0, "a watch task outlived the server");
}

/// A client that stopped reading (a frozen process, a lost network) holds
/// its connection until HTTP/2 keep-alive gives up, 50 s later; stopping
/// waits for it no longer than the watch cut-off.
#[tokio::test]
async fn stopping_the_server_does_not_wait_on_a_client_that_stopped_reading() {
    use tokio::io::AsyncWriteExt;
    let (_dir, _clock, server) =
        serve_with("2020-09-21T09:00:00+08:00", |c| c.watch_cutoff_ms = 1000).await;
    let mut frozen = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .expect("connect");
    // The HTTP/2 preface and empty settings, then nothing is ever read.
    frozen
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(60), server.stop())
        .await
        .expect("stopped");
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "stopping waited {:?} for a client that reads nothing",
        stopping.elapsed()
    );
    drop(frozen);
}

/// 证照分离 over gRPC: a registration spawns one child per permit, each in
/// the workflow of its way of reform; every department acts with its own
/// token on its child; the registration completes when all have settled.
#[tokio::test]
async fn a_zzfl_registration_settles_when_its_four_children_do() {
    let (_dir, _clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    let mut platform = Agent::new(&server, "hebei.sjz.platform").await;
    let mut ftz = Agent::new(&server, "hebei.sjz.zhengding_ftz").await;
    let mut amr = Agent::new(&server, "hebei.sjz.amr").await;
    let mut police = Agent::new(&server, "hebei.sjz.police").await;
    let mut approval = Agent::new(&server, "hebei.sjz.approval").await;
    let start = new_case(
        "zz-1",
        "zzfl_registration",
        &[("registration", "hebei.sjz.zhengding_ftz")],
        json!({"enterprise_name": "河北正定某食品科技有限公司", "declared_scope": "食品生产、道路普通货物运输"}),
    );
    platform.create(start).await.expect("started");
    let registered = ftz
        .fire(
            "zz-1",
            "register",
            json!({
                "credit_code": "91130123MA0FOODS01",
                "business_scope": "食品生产；道路货物运输",
                "permits": ["ZZFL-C-019", "ZZFL-C-034", "ZZFL-C-005", "ZZFL-C-001"],
            }),
        )
        .await
        .expect("registered");
    assert_eq!(registered.state, "awaiting_permits");
    let ways: Vec<&str> = registered
        .children
        .iter()
        .map(|c| c.workflow.as_str())
        .collect();
    assert_eq!(
        ways,
        [
            "zzfl_abolish",
            "zzfl_filing",
            "zzfl_commitment",
            "zzfl_optimise"
        ]
    );
    // Approval abolished: the supervising department takes it into supervision.
    amr.fire("zz-1/0", "take_into_supervision", json!({}))
        .await
        .expect("abolish child");
    // Filing: filed at registration, then supervised.
    ftz.fire(
        "zz-1/1",
        "file_at_registration",
        json!({"filing_info": "仓储场所地址、面积及负责人"}),
    )
    .await
    .expect("filed");
    amr.fire("zz-1/1", "take_into_supervision", json!({}))
        .await
        .expect("filing child");
    // 告知承诺: the enterprise commits, the approving department decides on the spot.
    platform
        .fire("zz-1/2", "apply", json!({}))
        .await
        .expect("apply");
    police
        .fire("zz-1/2", "inform", json!({"conditions": ["具有符合安全要求的经营场所"], "supervision_rules": "双随机抽查", "breach_consequences": "撤销许可", "model_letter": "示范文本"}))
        .await
        .expect("inform");
    platform
        .fire(
            "zz-1/2",
            "commit",
            json!({"kind": "conditions_met", "commitment_text": "承诺真实", "materials": ["告知承诺书（已签章）", "经营场所平面图"]}),
        )
        .await
        .expect("commit");
    police
        .fire("zz-1/2", "grant", json!({}))
        .await
        .expect("grant");
    amr.fire("zz-1/2", "assess_risk", json!({"risk": "low"}))
        .await
        .expect("risk");
    amr.fire(
        "zz-1/2",
        "pass_inspection",
        json!({"findings": "与承诺一致"}),
    )
    .await
    .expect("inspection");
    // Optimised approval: accepted, then a countersign of the departments concerned.
    platform
        .fire(
            "zz-1/3",
            "apply",
            json!({"application": "道路货物运输经营许可申请"}),
        )
        .await
        .expect("apply");
    approval
        .fire("zz-1/3", "accept", json!({}))
        .await
        .expect("accept");
    approval
        .fire("zz-1/3", "sign", json!({"comment": "同意"}))
        .await
        .expect("sign");
    let refused = police
        .fire("zz-1/3", "sign", json!({"comment": "同意"}))
        .await
        .expect_err("not a countersigner");
    assert_eq!(
        refused.code(),
        Code::NotFound,
        "the police hold no role in this child: it is invisible to them"
    );
    amr.fire("zz-1/3", "sign", json!({"comment": "同意"}))
        .await
        .expect("sign");
    amr.fire("zz-1/3", "take_into_supervision", json!({}))
        .await
        .expect("optimise child");
    // The filed and the 告知承诺 items stay under supervision, so the
    // registration waits for them, until the enterprise deregisters.
    let parent = ftz.get("zz-1").await.expect("parent");
    assert_eq!(parent.state, "awaiting_permits");
    amr.fire(
        "zz-1/1",
        "end_supervision",
        json!({"reason": "enterprise_deregistered", "note": "企业已注销登记"}),
    )
    .await
    .expect("filing supervision ended");
    police
        .fire(
            "zz-1/2",
            "end_supervision",
            json!({"reason": "enterprise_deregistered", "decision": "企业已注销登记，注销许可"}),
        )
        .await
        .expect("commitment supervision ended");
    let parent = ftz.get("zz-1").await.expect("parent");
    assert_eq!(parent.state, "all_settled");
    assert!(
        parent.children.iter().all(|c| !c.outcome.is_empty()),
        "{:?}",
        parent.children
    );
    // The auditor exports the registration's own history and then its
    // children's, each filtered, and replays all of it.
    let mut audit = AuditServiceClient::new(server.channel().await);
    let auditor = server.token("hebei.sjz.audit");
    let (lines, _) = export_lines(
        &mut audit,
        Some(&auditor),
        proto::ExportHistoryRequest {
            case: "cases/zz-1".into(),
            ..Default::default()
        },
    )
    .await
    .expect("export");
    // Its entries, its head line and the end line.
    assert_eq!(lines.len() as u64, parent.sequence + 2);
    assert!(lines[lines.len() - 2].contains("\"head_hash\""));
    assert!(lines[lines.len() - 1].contains("\"end_of_export\""));
    let (children, _) = export_lines(
        &mut audit,
        Some(&auditor),
        proto::ExportHistoryRequest {
            workflow: "zzfl_commitment".into(),
            ..Default::default()
        },
    )
    .await
    .expect("export");
    let (end, children) = children.split_last().expect("an end line");
    assert!(end.contains("\"end_of_export\""), "{end}");
    assert!(
        !children.is_empty()
            && children
                .iter()
                .all(|l| l.contains("\"case_id\":\"zz-1/2\"")),
        "{children:?}"
    );
    audited(&server).await;
    server.stop().await;
}

/// Mutual TLS: a client certificate listed in the configuration is that
/// agency, without a token; an unlisted one still needs a token; plaintext
/// is refused.
#[tokio::test]
async fn mutual_tls_maps_a_client_certificate_to_its_agency() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use sha2::Digest;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    let (dir, data) = data_dir();
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("signed");
        (cert, key)
    };
    let (server_cert, server_key) = leaf("localhost");
    let (platform_cert, platform_key) = leaf("platform.example");
    let (stranger_cert, stranger_key) = leaf("stranger.example");
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let clock = Arc::new(ManualClock::new(at("2020-06-01T09:00:00+08:00")));
    let server = Server::start_with(&data, &clock, |config| {
        config.tls = Some(server::TlsConfig {
            cert: write("server.pem", server_cert.pem()),
            key: write("server.key", server_key.serialize_pem()),
            client_ca: Some(write("ca.pem", ca_cert.pem())),
        });
        config.client_certificates = [(
            format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(platform_cert.der()))
            ),
            "hebei.sjz.platform".to_owned(),
        )]
        .into();
    })
    .await;
    let port = server.port;
    let connect = |cert: String, key: String| {
        let ca = ca_cert.pem();
        async move {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key))
                .domain_name("localhost");
            Channel::from_shared(format!("https://localhost:{port}"))
                .expect("uri")
                .tls_config(tls)
                .expect("tls")
                .connect()
                .await
                .expect("connects")
        }
    };
    let start = registration(
        "tls-1",
        "tls-1",
        json!({"enterprise_name": "某公司", "credit_code": "91130100MA0TLS0001"}),
    );
    let mut platform =
        CasesServiceClient::new(connect(platform_cert.pem(), platform_key.serialize_pem()).await);
    let case = platform
        .create_case(Request::new(start))
        .await
        .expect("the certificate is the platform's credential")
        .into_inner()
        .case
        .expect("case");
    assert_eq!(case.bindings["platform"], "hebei.sjz.platform");
    // Regression: a token sent beside the certificate was ignored, even one
    // of another agency. The same caller's token is fine; another's is
    // refused as ambiguous.
    let read_as = |token: String| {
        let mut platform = platform.clone();
        async move {
            platform
                .get_case(authed(
                    Some(&token),
                    proto::GetCaseRequest {
                        name: "cases/tls-1".into(),
                    },
                ))
                .await
        }
    };
    read_as(server.token("hebei.sjz.platform"))
        .await
        .expect("certificate and token of one caller");
    let ambiguous = read_as(server.token("hebei.sjz.amr"))
        .await
        .expect_err("certificate and token of two callers");
    assert_eq!(
        (ambiguous.code(), reason(&ambiguous)),
        (Code::Unauthenticated, "ambiguous-credential".to_owned())
    );
    let mut stranger =
        CasesServiceClient::new(connect(stranger_cert.pem(), stranger_key.serialize_pem()).await);
    let refused = stranger
        .get_case(Request::new(proto::GetCaseRequest {
            name: "cases/tls-1".into(),
        }))
        .await
        .expect_err("unlisted certificate, no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    // The refusal names the certificate, as the operator must add it.
    let fingerprint = hex::encode(sha2::Sha256::digest(stranger_cert.der().as_ref()));
    assert!(
        refused
            .message()
            .contains(&format!("\"sha256:{fingerprint}\"")),
        "{}",
        refused.message()
    );
    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("uri")
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let answer = CasesServiceClient::new(channel)
            .get_case(Request::new(proto::GetCaseRequest {
                name: "cases/tls-1".into(),
            }))
            .await;
        assert!(answer.is_err(), "a plaintext call was answered");
    }

    // The command line, with the platform's certificate as its credential.
    let ca = write("ca.pem", ca_cert.pem());
    let cert = write("platform.pem", platform_cert.pem());
    let key = write("platform.key", platform_key.serialize_pem());
    let path = |p: &std::path::Path| p.display().to_string();
    let https = format!("https://localhost:{port}");
    let show = |tls: Vec<String>| {
        let mut args: Vec<String> = ["case", "show", "tls-1", "--json", "--server", &https]
            .map(str::to_owned)
            .into();
        args.extend(tls);
        cli(args)
    };
    let shown = show(vec![
        "--ca-cert".into(),
        path(&ca),
        "--client-cert".into(),
        path(&cert),
        "--client-key".into(),
        path(&key),
    ])
    .await;
    assert_eq!(
        shown.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(String::from_utf8_lossy(&shown.stdout).contains("\"tls-1\""));
    let without_ca = show(Vec::new()).await;
    assert_ne!(without_ca.status.code(), Some(0));
    // Asked for JSON, the failure is a JSON answer too.
    let answer: Json = serde_json::from_slice(&without_ca.stdout).expect("JSON on stdout");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs `--ca-cert FILE`")),
        "{answer}"
    );
    server.stop().await;
}

/// A migration check over gRPC on a deliberately breaking edit of a seed
/// workflow names the affected case, step and reason, and a deploy that
/// requires the check is refused with the list and changes nothing; a
/// compatible edit names none and is deployed.
#[tokio::test]
async fn a_deploy_requiring_the_migration_check_is_refused_when_running_cases_would_break() {
    use tonic_types::StatusExt;
    let (_dir, _clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    let mut platform = Agent::new(&server, "hebei.sjz.platform").await;
    let mut team = Agent::new(&server, "hebei.sjz.industry").await;
    for id in ["bl-1", "bl-2"] {
        let start = baolian(
            id,
            json!({"enterprise_name": "石家庄某装备制造有限公司", "credit_code": "91130100MA0MIGR001", "county": "hebei.sjz.zhengding", "problem_summary": "用地手续"}),
        );
        platform.create(start).await.expect("started");
    }
    team.fire("bl-1", "classify", json!({"level": "county"}))
        .await
        .expect("classified");
    let v1 = seed_source("baolian_escalation");
    // bl-1 is in county_handling: renamed, its classification would lead elsewhere.
    let breaking = v1.replace("\"county_handling\"", "\"county_processing\"");
    // A new version that changes no rule: only a comment.
    let compatible = format!("{v1}\n// 修订：只改说明\n");
    assert_ne!(breaking, v1);
    assert_ne!(compatible, v1);
    let (_, mut definitions, audit) = server.clients().await;
    let admin = server.token("admin");
    let check =
        async |token: String, source: String| check_migration(&audit, &token, &source).await;

    let report = check(server.token("hebei.sjz.audit"), breaking.clone()).await;
    assert_eq!(report.workflow, "baolian_escalation");
    assert_eq!(report.running_cases, 2);
    let named: Vec<(&str, u64, &str, &str, u32)> = report
        .breaking_cases
        .iter()
        .map(|b| {
            (
                b.case_id.as_str(),
                b.sequence,
                b.kind.as_str(),
                b.state.as_str(),
                b.workflow_version,
            )
        })
        .collect();
    assert_eq!(named, [("bl-1", 2, "history", "county_handling", 1)]);
    assert_eq!(report.breaking_cases_total, 1);
    assert!(
        report.breaking_cases[0].reason.contains("to state"),
        "{}",
        report.breaking_cases[0].reason
    );
    // Regression: any agency could run a check, and so have the server
    // evaluate expressions of its own writing over stored cases, without a
    // budget: a source built to explode took the server down. It is for
    // auditors and the admin.
    let refused = audit
        .clone()
        .check_migration(authed(
            Some(&server.token("hebei.sjz.industry")),
            proto::CheckMigrationRequest {
                source: breaking.clone(),
            },
        ))
        .await
        .expect_err("an agency may not run a migration check");
    assert_eq!(
        (refused.code(), reason(&refused)),
        (Code::PermissionDenied, "auditors-only".to_owned())
    );

    // The deploy that requires the check is refused, naming bl-1, and nothing changes.
    let reader = definitions.clone();
    let current = || {
        let mut definitions = reader.clone();
        let admin = admin.clone();
        async move {
            definitions
                .get_workflow(authed(
                    Some(&admin),
                    proto::GetWorkflowRequest {
                        name: "workflows/baolian_escalation".into(),
                    },
                ))
                .await
                .expect("get")
                .into_inner()
                .workflow_version
                .expect("version")
        }
    };
    let before = current().await;
    let versions_before = server.engine.workflow_versions().expect("versions").len();
    let history_before = server.engine.history("bl-1").expect("history");
    let refused = definitions
        .deploy_workflow(authed(
            Some(&admin),
            proto::DeployWorkflowRequest {
                source: breaking.clone(),
                require_migration_check: true,
            },
        ))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "migration-check-failed");
    assert!(refused.message().contains("bl-1"), "{}", refused.message());
    let details = refused.get_error_details();
    let violations: Vec<&str> = details
        .precondition_failure()
        .expect("a PreconditionFailure")
        .violations
        .iter()
        .map(|v| v.subject.as_str())
        .collect();
    assert_eq!(violations, ["cases/bl-1"]);
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["breaking_cases"], "1");
    let after = current().await;
    assert_eq!(
        (after.version, &after.digest),
        (before.version, &before.digest)
    );
    assert_eq!(
        server.engine.workflow_versions().expect("versions").len(),
        versions_before
    );
    assert_eq!(
        server.engine.history("bl-1").expect("history"),
        history_before
    );

    // The same from the command line.
    let files = tempfile::tempdir().expect("tempdir");
    let file = files.path().join("baolian_escalation.ron");
    std::fs::write(&file, &breaking).expect("write");
    let with = |token: &str, rest: &[&str]| {
        let mut args: Vec<String> = rest.iter().map(|a| (*a).to_owned()).collect();
        args.extend([
            "--server".to_owned(),
            server.endpoint.clone(),
            "--token".to_owned(),
            token.to_owned(),
            file.display().to_string(),
        ]);
        args
    };
    let checked = cli(with(
        &server.token("hebei.sjz.audit"),
        &["workflow", "check-migration"],
    ))
    .await;
    let text = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{text}");
    assert!(
        text.contains("BREAKS case bl-1 (version 1, in `county_handling`) at sequence 2"),
        "{text}"
    );
    let refused = cli(with(
        &admin,
        &["workflow", "deploy", "--require-migration-check"],
    ))
    .await;
    let text = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(text.contains("[migration-check-failed]"), "{text}");
    assert!(
        text.contains("would break: case bl-1 sequence 2 (history)"),
        "{text}"
    );
    assert_eq!(
        current().await.version,
        before.version,
        "still nothing deployed"
    );

    // A compatible edit names none and is deployed with the check required.
    let report = check(server.token("hebei.sjz.audit"), compatible.clone()).await;
    assert!(
        report.breaking_cases.is_empty(),
        "{:?}",
        report.breaking_cases
    );
    assert_eq!(report.running_cases, 2);
    let deployed = definitions
        .deploy_workflow(authed(
            Some(&admin),
            proto::DeployWorkflowRequest {
                source: compatible,
                require_migration_check: true,
            },
        ))
        .await
        .expect("deployed")
        .into_inner();
    assert!(deployed.created);
    assert_eq!(
        deployed.workflow_version.expect("version").version,
        before.version + 1
    );
    // The running cases move on, on the version they started on.
    let mut county = Agent::new(&server, "hebei.sjz.zhengding").await;
    let moved = county
        .fire("bl-1", "report_progress", json!({"progress": "已协调"}))
        .await
        .expect("report");
    assert_eq!(moved.workflow_version, before.version);
    audited(&server).await;
    server.stop().await;
}

/// Regression: README's `token()` read only quoted keys, so `token admin`
/// (a bare key in credentials.toml) came out empty.
#[tokio::test]
async fn the_readme_token_function_reads_every_credential() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(at("2020-06-01T09:00:00+08:00")));
    let server = Server::start(&dir.path().join("govflow-data"), &clock).await;
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let function = readme
        .lines()
        .find(|l| l.starts_with("token() {"))
        .expect("README defines token()");
    for principal in ["admin", "hebei", "hebei.sjz.audit", "hebei.sjz.platform"] {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("{function}\ntoken {principal}"))
            .current_dir(dir.path())
            .output()
            .expect("bash runs");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            server.token(principal),
            "token {principal}"
        );
    }
}

/// A server on the shipped workflows, its clock at `now`, whose engine is on
/// a [`TestStore`] (so that the test can make its disk fail, or count reads).
async fn serve_on_test_store(now: &str) -> (tempfile::TempDir, Arc<TestStore>, Server) {
    let (dir, data) = data_dir();
    let clock = Arc::new(ManualClock::new(at(now)));
    let config = Config {
        data: data.clone(),
        workflows: shipped(),
        ..Config::default()
    };
    let mut prepared = server::prepare_with_clock(&config, clock.clone()).expect("prepares");
    let store = Arc::new(TestStore::open(&data.join("test-store")));
    prepared.engine = Engine::open(
        store.clone(),
        &govflow::lang::load::load(&[shipped()]).expect("loads"),
        clock,
    )
    .expect("engine opens");
    let server = Server::serve(&data, prepared).await;
    (dir, store, server)
}

/// What the server's health service answers for `service` ("" for the server).
async fn health_of(server: &Server, service: &str) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    HealthClient::new(server.channel().await)
        .check(request)
        .await
        .expect("health answers")
        .into_inner()
        .status
}

/// Polls until the server's health is `status`; false after five seconds.
async fn health_becomes(
    server: &Server,
    status: tonic_health::pb::health_check_response::ServingStatus,
) -> bool {
    for _ in 0..100 {
        if health_of(server, "").await == status as i32 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Regression: when the engine stopped for good (its writer gone after a
/// bug), the timer loop ended quietly and health went on answering SERVING
/// while every change was refused.
#[tokio::test]
async fn health_checks_answer_not_serving_once_the_engine_has_stopped() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    assert_eq!(health_of(&server, "").await, ServingStatus::Serving as i32);
    server.engine.shutdown();
    assert!(
        health_becomes(&server, ServingStatus::NotServing).await,
        "health still answers SERVING with the engine stopped"
    );
    server.stop().await;
}

#[tokio::test]
async fn health_checks_answer_not_serving_once_storage_has_failed() {
    use tonic_health::pb::health_check_response::ServingStatus;
    // The server's engine, on a store whose disk the test can make fail.
    let (_dir, store, server) = serve_on_test_store("2020-06-01T01:00:00Z").await;
    let status = |service: &'static str| health_of(&server, service);
    let services = ["", "govflow.v1.CasesService", "govflow.v1.AuditService"];
    for service in services {
        assert_eq!(
            status(service).await,
            ServingStatus::Serving as i32,
            "{service}"
        );
    }
    let (mut cases, _, _) = server.clients().await;
    let platform = server.token("hebei.sjz.platform");
    let start = trading_registration("h");
    cases
        .create_case(authed(Some(&platform), start.clone()))
        .await
        .expect("starts while the disk works");
    store
        .fail_syncs
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = cases
        .create_case(authed(
            Some(&platform),
            proto::CreateCaseRequest {
                request_id: "start-h2".into(),
                case_id: "h2".into(),
                ..start
            },
        ))
        .await
        .expect_err("the disk failed");
    assert_eq!(
        (refused.code(), reason(&refused)),
        (Code::Internal, "storage".to_owned())
    );
    assert!(
        health_becomes(&server, ServingStatus::NotServing).await,
        "health still answers SERVING after storage failed"
    );
    for service in services {
        assert_eq!(
            status(service).await,
            ServingStatus::NotServing as i32,
            "{service}"
        );
    }
    // Regression: reads answered with what sled held in memory, the failed
    // step included; a deploy was refused as UNAVAILABLE "stopped".
    let read = cases
        .get_case(authed(
            Some(&platform),
            proto::GetCaseRequest {
                name: "cases/h".into(),
            },
        ))
        .await
        .expect_err("nothing is read after storage failed");
    assert_eq!(
        (read.code(), reason(&read)),
        (Code::Internal, "storage".to_owned())
    );
    assert!(
        read.message().contains("until govflow is restarted"),
        "{}",
        read.message()
    );
    let mut definitions = DefinitionsServiceClient::new(server.channel().await);
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/zzfl_filing.ron"),
    )
    .expect("read")
        + "\n// a new version\n";
    let deploy = definitions
        .deploy_workflow(authed(
            Some(&server.token("admin")),
            proto::DeployWorkflowRequest {
                source,
                ..Default::default()
            },
        ))
        .await
        .expect_err("nothing is deployed after storage failed");
    assert_eq!(
        (deploy.code(), reason(&deploy)),
        (Code::Internal, "storage".to_owned())
    );
    server.stop().await;
}

/// Regression: `govflow case inbox` showed only the first 1,000 entries, and
/// `case list` and `case inbox` printed nothing at all when there were none.
#[tokio::test]
async fn the_command_line_pages_through_a_long_inbox_and_says_when_there_is_nothing() {
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let (mut cases, _, _) = server.clients().await;
    let amr = server.token("hebei.sjz.amr");
    // More than a page can hold (1,000 at most).
    let count = 1005;
    for n in 0..count {
        cases
            .create_case(authed(
                Some(&amr),
                trading_registration(&format!("r{n:04}")),
            ))
            .await
            .expect("starts");
    }
    // The address as `govflow serve` prints it, without a scheme.
    let address = format!("127.0.0.1:{}", server.port);
    let run = |token: String, what: &'static str| {
        cli(vec![
            "case".into(),
            what.into(),
            "--server".into(),
            address.clone(),
            "--token".into(),
            token,
        ])
    };
    for what in ["inbox", "list"] {
        let out = run(amr.clone(), what).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(ids.len(), count, "{what}: {text}");
        assert!(ids.contains("r0000") && ids.contains("r1004"), "{what}");
    }
    let tax = server.token("hebei.sjz.tax");
    let inbox = run(tax.clone(), "inbox").await;
    assert_eq!(
        String::from_utf8_lossy(&inbox.stdout).trim(),
        "nothing to act on"
    );
    let list = run(tax, "list").await;
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "no cases");
    server.stop().await;
}

/// Regression: a step refused by a guard or a payload said nothing of where
/// a clerk finds what the event needs; the hint now names the command that
/// lists it for the case's state and version.
#[tokio::test]
async fn the_command_line_points_a_refused_step_at_the_events_of_its_state() {
    let (_dir, _clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    let (mut cases, _, _) = server.clients().await;
    cases
        .create_case(authed(
            Some(&server.token("hebei.sjz.platform")),
            baolian(
                "bl-hint",
                json!({"enterprise_name": "某公司", "credit_code": "91130182MA0A000009", "county": "hebei.sjz.gaocheng", "problem_summary": "用地"}),
            ),
        ))
        .await
        .expect("started");
    let out = cli(vec![
        "case".into(),
        "fire".into(),
        "bl-hint".into(),
        "classify".into(),
        "--set".into(),
        "level=city".into(),
        "--json".into(),
        "--server".into(),
        format!("127.0.0.1:{}", server.port),
        "--token".into(),
        server.token("hebei.sjz.industry"),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let refusal: Json = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(refusal["error"]["reason"], "guard-false", "{refusal}");
    assert_eq!(
        refusal["error"]["hint"],
        "what each event of state `awaiting_classification` needs: govflow workflow events baolian_escalation --version 1 --state awaiting_classification",
        "{refusal}"
    );
    server.stop().await;
}

/// Regression: the enterprise service platform could start a 包联 quarterly
/// bulletin naming itself the issuer, and then publicly criticise a
/// department. It holds only the roles fixed to it.
#[tokio::test]
async fn neither_the_enterprise_platform_nor_a_county_department_takes_a_role_not_theirs() {
    let (_dir, _clock, server) = serve("2020-09-21T09:00:00+08:00").await;
    let (mut cases, _, _) = server.clients().await;
    let refused = cases
        .create_case(authed(
            Some(&server.token("hebei.sjz.platform")),
            new_case(
                "bulletin-1",
                "baolian_quarterly_bulletin",
                &[("issuer", "hebei.sjz.platform")],
                json!({"quarter": "2020Q3"}),
            ),
        ))
        .await
        .expect_err("the platform is no issuer");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(reason(&refused), "invalid-start");
    assert!(
        refused.message().contains("acts for enterprises"),
        "{refused:?}"
    );
    // Regression: a county department (of level County too) could name
    // itself the county of a 困难企业 case and act as the county government.
    let county_department = server.token("hebei.sjz.gaocheng.hrss");
    let refused = cases
        .create_case(authed(
            Some(&county_department),
            new_case(
                "kn-1",
                "kunnan_qiye",
                &[
                    ("insurance_agency", "hebei.sjz.gaocheng.hrss.unemployment"),
                    ("hrss", "hebei.sjz.gaocheng.hrss"),
                ],
                json!({"enterprise_name": "某纺织有限公司", "credit_code": "91130182MA0TEXT001", "county": "hebei.sjz.gaocheng.hrss", "insured_at": "county"}),
            ),
        ))
        .await
        .expect_err("a county department is no county government");
    assert_eq!(reason(&refused), "invalid-start", "{refused:?}");
    assert!(refused.message().contains("role `city_gov`"), "{refused:?}");
    // A department may issue it.
    cases
        .create_case(authed(
            Some(&server.token("hebei.sjz.industry")),
            new_case(
                "bulletin-2",
                "baolian_quarterly_bulletin",
                &[("issuer", "hebei.sjz.industry")],
                json!({"quarter": "2020Q3"}),
            ),
        ))
        .await
        .expect("a department issues it");
    server.stop().await;
}

/// Regression: `govflow case inbox --json` gave a case without a deadline
/// the table's dash (`"deadline": "—"`) instead of null.
#[tokio::test]
async fn the_command_line_inbox_in_json_gives_null_for_no_deadline() {
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let (mut cases, _, _) = server.clients().await;
    let platform = server.token("hebei.sjz.platform");
    cases
        .create_case(authed(
            Some(&platform),
            new_case(
                "gz-json",
                "gaozhi_chengnuo",
                &[
                    ("approval", "hebei.sjz.approval"),
                    ("supervision", "hebei.sjz.housing"),
                    ("registration", "hebei.sjz.amr"),
                ],
                json!({"permit_id": "SGXK-1", "permit_name": "建筑工程施工许可", "enterprise_name": "石家庄某置业有限公司", "credit_code": "91130102MA0HOUS001"}),
            ),
        ))
        .await
        .expect("starts");
    let amr = server.token("hebei.sjz.amr");
    cases
        .create_case(authed(Some(&amr), trading_registration("r-json")))
        .await
        .expect("starts");
    let address = format!("127.0.0.1:{}", server.port);
    let inbox = |token: String| {
        cli(vec![
            "case".into(),
            "inbox".into(),
            "--json".into(),
            "--server".into(),
            address.clone(),
            "--token".into(),
            token,
        ])
    };
    let item = |out: std::process::Output, id: &str| -> Json {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Json>(l).expect("a JSON line"))
            .find(|item| item["case"]["id"] == id)
            .expect("the case is in the inbox")
    };
    let waiting = item(inbox(platform).await, "gz-json");
    assert_eq!(waiting["deadline"], Json::Null, "{waiting}");
    let due = item(inbox(amr).await, "r-json");
    assert!(
        due["deadline"].as_str().is_some_and(|d| d.ends_with('Z')),
        "{due}"
    );
    server.stop().await;
}

/// Sends its bytes as they are, so that a test can send what no generated
/// client would: bytes that are not a protobuf message.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = bytes::Buf::chunk(src).to_vec();
        bytes::Buf::advance(src, bytes.len());
        Ok(Some(bytes))
    }
}

/// Regression: a request that does not decode as its message got tonic's
/// INTERNAL ("failed to decode Protobuf message"), on every method.
#[tokio::test]
async fn bytes_that_are_not_the_methods_message_are_invalid_argument_on_every_rpc() {
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let admin = server.token("admin");
    let methods = [
        ("CasesService", "CreateCase", false),
        ("CasesService", "FireEvent", false),
        ("CasesService", "GetCase", false),
        ("CasesService", "ListCases", false),
        ("CasesService", "ListInbox", false),
        ("CasesService", "WatchEvents", true),
        ("DefinitionsService", "DeployWorkflow", false),
        ("DefinitionsService", "ValidateWorkflow", false),
        ("DefinitionsService", "ListWorkflows", false),
        ("DefinitionsService", "GetWorkflow", false),
        ("DefinitionsService", "RenderWorkflow", false),
        ("AuditService", "ListHistoryEntries", false),
        ("AuditService", "VerifyHistory", false),
        ("AuditService", "ReplayCase", false),
        ("AuditService", "GetCaseAt", false),
        ("AuditService", "ExportHistory", true),
        ("AuditService", "CheckMigration", false),
    ];
    // A field key that is not a varint, then a length past the end.
    let garbage = vec![
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0a, 0x7f,
    ];
    for (service, method, streams) in methods {
        let mut grpc = tonic::client::Grpc::new(server.channel().await);
        grpc.ready().await.expect("ready");
        let path: tonic::codegen::http::uri::PathAndQuery =
            format!("/govflow.v1.{service}/{method}")
                .parse()
                .expect("path");
        let request = authed(Some(&admin), garbage.clone());
        let refused = if streams {
            grpc.server_streaming(request, path, RawCodec)
                .await
                .map(|_| ())
        } else {
            grpc.unary(request, path, RawCodec).await.map(|_| ())
        }
        .expect_err(method);
        assert_eq!(
            (refused.code(), reason(&refused)),
            (Code::InvalidArgument, "malformed-message".to_owned()),
            "{method}: {refused:?}"
        );
    }
    // Well formed, but nested past prost's limit: said as such, not "malformed".
    let mut deep = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("底".into())),
    };
    for _ in 0..50 {
        deep = prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                fields: [("x".to_owned(), deep)].into(),
            })),
        };
    }
    let (mut cases, _, _) = server.clients().await;
    let refused = cases
        .fire_event(authed(
            Some(&admin),
            proto::FireEventRequest {
                request_id: "deep".into(),
                case: "cases/any".into(),
                event: "e".into(),
                payload: Some(prost_types::Struct {
                    fields: [("deep".to_owned(), deep)].into(),
                }),
                expected_sequence: None,
            },
        ))
        .await
        .expect_err("too deep");
    assert_eq!(
        (refused.code(), reason(&refused)),
        (Code::InvalidArgument, "too-deep".to_owned()),
        "{refused:?}"
    );
    server.stop().await;
}

/// Some clients and gateways compress their requests by default; without
/// gzip the server answered them UNIMPLEMENTED.
#[tokio::test]
async fn a_client_that_compresses_with_gzip_is_served_and_answered_compressed() {
    use tonic::codec::CompressionEncoding::Gzip;
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let mut cases = CasesServiceClient::new(server.channel().await)
        .send_compressed(Gzip)
        .accept_compressed(Gzip);
    let amr = server.token("hebei.sjz.amr");
    let start = trading_registration("gz");
    cases
        .create_case(authed(Some(&amr), start))
        .await
        .expect("a compressed request is served");
    let shown = cases
        .get_case(authed(
            Some(&amr),
            proto::GetCaseRequest {
                name: "cases/gz".into(),
            },
        ))
        .await
        .expect("get");
    assert_eq!(
        shown
            .metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("gzip"),
        "the answer is compressed for a client that accepts it"
    );
    assert_eq!(shown.into_inner().case.expect("case").id, "gz");
    // Small compressed, over the limit once inflated: refused as any
    // oversized request is (tonic's own refusal carried no reason).
    let inflated = registration(
        "start-big",
        "big",
        json!({"enterprise_name": "0".repeat(20 << 20), "credit_code": "91130100MA0TEST001"}),
    );
    let refused = cases
        .create_case(authed(Some(&amr), inflated))
        .await
        .expect_err("over the limit once inflated");
    assert_eq!(
        (refused.code(), reason(&refused)),
        (Code::ResourceExhausted, "message-too-large".to_owned()),
        "{refused:?}"
    );
    server.stop().await;
}

/// Regression: a page of up to 1,000 cases was sent whole, however large;
/// with big cases (records may be up to 64 KiB) a client on its default
/// limit (4 MiB in grpc-go, grpc-java, grpcio, and tonic's client here)
/// could not read it. A page now ends early, with a token for the rest.
#[tokio::test]
async fn pages_of_large_cases_fit_what_clients_accept_by_default() {
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let mut platform = Agent::new(&server, "hebei.sjz.platform").await;
    // Cases of about 31 KB (a start's history entry holds its variables
    // twice, within the 64 KiB a record may have).
    let long_name = "x".repeat(30_000);
    for n in 0..150 {
        let start = new_case(
            &format!("big-{n:03}"),
            "gaozhi_chengnuo",
            &[
                ("approval", "hebei.sjz.approval"),
                ("supervision", "hebei.sjz.housing"),
                ("registration", "hebei.sjz.amr"),
            ],
            json!({"permit_id": "SGXK-1", "permit_name": long_name, "enterprise_name": "某公司", "credit_code": "91130102MA0HOUS001"}),
        );
        platform.create(start).await.expect("started");
    }
    let (mut listed, mut inboxed, mut pages) = (Vec::new(), Vec::new(), 0);
    let mut token = String::new();
    loop {
        let request = proto::ListCasesRequest {
            page_size: 1000,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = platform
            .cases
            .list_cases(authed(Some(&platform.token), request))
            .await
            .expect("a page the client can read")
            .into_inner();
        pages += 1;
        listed.extend(page.cases.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    token.clear();
    loop {
        let request = proto::ListInboxRequest {
            page_size: 1000,
            page_token: token.clone(),
        };
        let page = platform
            .cases
            .list_inbox(authed(Some(&platform.token), request))
            .await
            .expect("an inbox page the client can read")
            .into_inner();
        inboxed.extend(page.items.into_iter().filter_map(|i| i.case).map(|c| c.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let all: Vec<String> = (0..150).map(|n| format!("big-{n:03}")).collect();
    assert!(pages > 1, "150 cases of 31 KB came in one page");
    assert_eq!(listed, all);
    assert_eq!(inboxed, all);
    // A page token goes on only with the caller and filter that got it:
    // taken elsewhere it would skip cases without a word.
    let list = |token: &str, workflow: &str| proto::ListCasesRequest {
        page_size: 10,
        page_token: token.to_owned(),
        workflow: workflow.to_owned(),
        ..Default::default()
    };
    let token = platform
        .cases
        .list_cases(authed(Some(&platform.token), list("", "")))
        .await
        .expect("a first page")
        .into_inner()
        .next_page_token;
    let mut approval = Agent::new(&server, "hebei.sjz.approval").await;
    for (what, answer) in [
        (
            "another filter",
            platform
                .cases
                .list_cases(authed(
                    Some(&platform.token),
                    list(&token, "gaozhi_chengnuo"),
                ))
                .await,
        ),
        (
            "another caller",
            approval
                .cases
                .list_cases(authed(Some(&approval.token), list(&token, "")))
                .await,
        ),
        (
            "a made-up token",
            platform
                .cases
                .list_cases(authed(Some(&platform.token), list("big-100", "")))
                .await,
        ),
    ] {
        let refused = answer.expect_err(what);
        assert_eq!(
            (refused.code(), reason(&refused)),
            (Code::InvalidArgument, "bad-page-token".to_owned()),
            "{what}: {refused:?}"
        );
    }
    server.stop().await;
}

/// Regression: one caller could open watch streams without limit, each
/// holding a task and a queue of steps, so a department system that opened
/// watches and never closed them could exhaust the server for every other
/// agency. One caller now holds at most `MAX_WATCHES_PER_CALLER`; the next
/// is RESOURCE_EXHAUSTED `too-many-watches`, other callers are unaffected,
/// and closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_holds_a_bounded_number_of_watches_without_affecting_others() {
    use govflow::server::api::MAX_WATCHES_PER_CALLER;
    let (_dir, _clock, server) = serve("2020-06-01T09:00:00+08:00").await;
    let mut open = Vec::new();
    for _ in 0..MAX_WATCHES_PER_CALLER {
        open.push(open_watch(&server, WATCHER, "", None).await);
    }
    let mut client = CasesServiceClient::new(server.channel().await);
    let one_more = || {
        authed(
            Some(&server.token(WATCHER)),
            proto::WatchEventsRequest::default(),
        )
    };
    let refused = client
        .watch_events(one_more())
        .await
        .expect_err("one watch too many");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(reason(&refused), "too-many-watches");
    let _other = open_watch(&server, "hebei.sjz.approval", "", None).await;
    drop(open.pop());
    assert!(
        within_a_minute(|| server.watchers.open() == MAX_WATCHES_PER_CALLER).await,
        "the closed watch was not given back"
    );
    client
        .watch_events(one_more())
        .await
        .expect("room again once one is closed");
    server.stop().await;
}

/// Regression: a watch read, for each batch of 64 steps, every case's
/// history from the batch's first step to the end of the case, so catching
/// up on a long case read its history over and over (quadratic). It now
/// reads each step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_catching_up_on_a_long_case_reads_each_step_once() {
    const REPORTS: usize = 300;
    let (_dir, store, server) = serve_on_test_store("2020-09-21T09:00:00+08:00").await;
    baolian_case(&server, "long").await;
    let engine = server.engine.clone();
    let fire = |request_id: String, event: &str, agency: &str, payload: Json| {
        govflow::engine::durable::FireRequest {
            request_id,
            case_id: "long".into(),
            event: event.into(),
            agency: agency.into(),
            payload: crate::common::obj(payload),
            expected_sequence: None,
        }
    };
    for n in 0..REPORTS {
        let report = json!({"progress": "已协调自然资源部门，正在办理"});
        engine
            .fire(fire(
                format!("r{n}"),
                "report_progress",
                "hebei.sjz.zhengding",
                report,
            ))
            .await
            .expect("report");
    }
    let steps = REPORTS + 2;
    store
        .history_entries_read
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let mut watch = open_watch(&server, "hebei.sjz.industry", "0", None).await;
    for _ in 0..steps {
        watch.message().await.expect("a step").expect("not ended");
    }
    let read = store
        .history_entries_read
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        read <= steps + 64,
        "{read} history entries read to send {steps} steps"
    );
    server.stop().await;
}

/// Regression: taking an agency out of the directory stopped the server
/// from starting ("credential for `hebei.drc`: no such agency in the
/// directory"), over the token govflow itself had generated for it. Its
/// token is now kept but not accepted, and works again if it returns.
#[tokio::test]
async fn an_agency_taken_out_of_the_directory_loses_its_access_not_the_server() {
    let (dir, data) = data_dir();
    let clock = Arc::new(ManualClock::new(at("2020-06-01T09:00:00+08:00")));
    let server = Server::start(&data, &clock).await;
    let (removed, kept) = (
        server.token("hebei.drc"),
        server.token("hebei.sjz.platform"),
    );
    server.stop().await;
    let workflows = dir.path().join("workflows");
    crate::common::copy_tree(&shipped(), &workflows);
    let directory = workflows.join("agencies.ron");
    let text = std::fs::read_to_string(&directory).expect("read");
    let without: String = text
        .lines()
        .filter(|l| !l.contains("id: \"hebei.drc\""))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, text, "the directory lists hebei.drc");
    std::fs::write(&directory, without).expect("write");

    let server = Server::start_with(&data, &clock, |c| c.workflows = workflows.clone()).await;
    let (mut cases, _, _) = server.clients().await;
    let listed = |token: &str| authed(Some(token), proto::ListCasesRequest::default());
    let refused = cases
        .list_cases(listed(&removed))
        .await
        .expect_err("revoked");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(reason(&refused), "unknown-credential");
    cases
        .list_cases(listed(&kept))
        .await
        .expect("others keep theirs");
    server.stop().await;

    let server = Server::start(&data, &clock).await;
    assert_eq!(server.token("hebei.drc"), removed, "the same token");
    let (mut cases, _, _) = server.clients().await;
    cases
        .list_cases(listed(&removed))
        .await
        .expect("back again");
    server.stop().await;
}
