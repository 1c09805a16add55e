//! `govflow bench --in-process`: durable transitions per second with many
//! concurrent callers on the seed workflows, and how list, inbox and
//! transition costs grow with the number of cases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Map, Value as Json, json};
use tonic::Request;
use tonic::transport::Channel;

use govflow::engine::durable::{
    Engine, EngineOptions, FireRequest, Monotonic, StartRequest, SystemClock,
};
use govflow::lang::load::load;
use govflow::store::proto::{self, cases_service_client::CasesServiceClient};
use govflow::store::{CaseFilter, SledStore, Store, SyncStep, records};

/// The counties cases are spread over, so that inboxes are realistic.
const COUNTIES: [&str; 8] = [
    "hebei.sjz.changan",
    "hebei.sjz.qiaoxi",
    "hebei.sjz.xinhua",
    "hebei.sjz.yuhua",
    "hebei.sjz.zhengding",
    "hebei.sjz.luquan",
    "hebei.sjz.gaocheng",
    "hebei.sjz.xinji",
];

const WORK_TEAM: &str = "hebei.sjz.drc";

pub struct BenchOptions {
    /// Drive a server over gRPC on loopback instead of the engine in process.
    pub grpc: bool,
    /// HTTP/2 connections the gRPC clients share.
    pub connections: usize,
    pub workflows: PathBuf,
    pub data: Option<PathBuf>,
    pub clients: usize,
    pub seconds: u64,
    pub cases: usize,
    pub scale: Vec<usize>,
    /// With `scale`: how many cases, spread evenly over the store, the
    /// active-set figure is measured on.
    pub active: usize,
    /// In process: the engine's and the store's memory.
    pub engine: EngineOptions,
    pub store_cache_bytes: u64,
}

struct Bench {
    target: Target,
    engine: Engine,
    /// fsync'd commits so far (in process only).
    syncs: Option<Arc<AtomicU64>>,
    cases: usize,
    server: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

fn obj(v: Json) -> Map<String, Json> {
    v.as_object().cloned().unwrap_or_default()
}

fn county(i: usize) -> &'static str {
    COUNTIES[i % COUNTIES.len()]
}

fn case_id(i: usize) -> String {
    format!("bench-{i:07}")
}

/// What the benchmark drives: the engine in this process, or a server over gRPC.
#[derive(Clone)]
enum Target {
    Engine(Engine),
    Grpc(Arc<Grpc>),
}

/// gRPC connections to a server on loopback, and its agencies' tokens.
struct Grpc {
    channels: Vec<Channel>,
    tokens: BTreeMap<String, String>,
}

impl Grpc {
    fn cases(&self, i: usize) -> CasesServiceClient<Channel> {
        CasesServiceClient::new(self.channels[i % self.channels.len()].clone())
    }

    fn request<T>(&self, agency: &str, message: T) -> Result<Request<T>> {
        let token = self
            .tokens
            .get(agency)
            .with_context(|| format!("no token for {agency}"))?;
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        Ok(request)
    }
}

fn start_request(i: usize) -> StartRequest {
    let id = case_id(i);
    StartRequest {
        request_id: format!("{id}-start"),
        case_id: id,
        workflow: "baolian_escalation".into(),
        agency: "hebei.sjz.platform".into(),
        bindings: [
            ("work_team".to_owned(), WORK_TEAM.to_owned()),
            (
                "responsible_dept".to_owned(),
                "hebei.sjz.industry".to_owned(),
            ),
            ("leader".to_owned(), "hebei.sjz.office".to_owned()),
        ]
        .into(),
        variables: obj(json!({
            "enterprise_name": format!("石家庄测试企业{i}有限公司"),
            "credit_code": format!("91130100MA{i:08}"),
            "county": county(i),
            "problem_summary": "用地手续办理缓慢",
        })),
    }
}

fn classify_request(i: usize) -> FireRequest {
    let id = case_id(i);
    FireRequest {
        request_id: format!("{id}-classify"),
        case_id: id,
        event: "classify".into(),
        agency: WORK_TEAM.into(),
        payload: obj(json!({"level": "county"})),
        expected_sequence: None,
    }
}

fn report_request(i: usize, request_id: String) -> FireRequest {
    FireRequest {
        request_id,
        case_id: case_id(i),
        event: "report_progress".into(),
        agency: county(i).into(),
        payload: obj(json!({"progress": "已协调自然资源部门，正在办理"})),
        expected_sequence: None,
    }
}

fn fire_message(r: FireRequest) -> proto::FireEventRequest {
    proto::FireEventRequest {
        request_id: r.request_id,
        case: format!("cases/{}", r.case_id),
        event: r.event,
        payload: Some(records::to_struct(&r.payload)),
        expected_sequence: r.expected_sequence,
    }
}

impl Target {
    /// A 包联 case reported through the platform and classified to its county.
    async fn open_case(&self, i: usize) -> Result<()> {
        match self {
            Target::Engine(engine) => {
                engine
                    .start(start_request(i))
                    .await
                    .with_context(|| format!("starting case {i}"))?;
                engine
                    .fire(classify_request(i))
                    .await
                    .with_context(|| format!("classifying case {i}"))?;
            }
            Target::Grpc(grpc) => {
                let r = start_request(i);
                let message = proto::CreateCaseRequest {
                    request_id: r.request_id,
                    case_id: r.case_id,
                    workflow: r.workflow,
                    bindings: r.bindings.into_iter().collect(),
                    variables: Some(records::to_struct(&r.variables)),
                };
                grpc.cases(i)
                    .create_case(grpc.request(&r.agency, message)?)
                    .await?;
                let c = classify_request(i);
                let agency = c.agency.clone();
                grpc.cases(i)
                    .fire_event(grpc.request(&agency, fire_message(c))?)
                    .await?;
            }
        }
        Ok(())
    }

    /// One durable progress report on case `i`.
    async fn report(&self, i: usize, request_id: String) -> Result<()> {
        let r = report_request(i, request_id);
        match self {
            Target::Engine(engine) => {
                engine.fire(r).await?;
            }
            Target::Grpc(grpc) => {
                let agency = r.agency.clone();
                grpc.cases(i)
                    .fire_event(grpc.request(&agency, fire_message(r))?)
                    .await?;
            }
        }
        Ok(())
    }
}

impl Bench {
    fn open(options: &BenchOptions, dir: &Path) -> Result<Bench> {
        let sources = load(std::slice::from_ref(&options.workflows))?;
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&syncs);
        let store = SledStore::open_with_cache(dir, options.store_cache_bytes)?.with_observer(
            Arc::new(move |step| {
                if step == SyncStep::Synced {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }),
        );
        let store: Arc<dyn Store> = Arc::new(store);
        let engine = Engine::open_with(
            store,
            &sources,
            Arc::new(Monotonic::new(SystemClock)),
            options.engine,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Bench {
            target: Target::Engine(engine.clone()),
            engine,
            syncs: Some(syncs),
            cases: 0,
            server: None,
        })
    }

    /// A server on a loopback port, with its data in `dir`, driven over gRPC
    /// through `connections` HTTP/2 connections.
    async fn serve(options: &BenchOptions, dir: &Path, connections: usize) -> Result<Bench> {
        let config = govflow::server::Config {
            data: dir.to_path_buf(),
            workflows: options.workflows.clone(),
            ..govflow::server::Config::default()
        };
        let prepared = govflow::server::prepare(&config)?;
        let engine = prepared.engine.clone();
        let text = std::fs::read_to_string(dir.join("credentials.toml"))?;
        let tokens: BTreeMap<String, String> = toml::from_str::<toml::Table>(&text)?
            .get("tokens")
            .and_then(|t| t.as_table())
            .context("no tokens in credentials.toml")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = govflow::server::serve_on(prepared, listener, shutdown).await {
                eprintln!("server: {e}");
            }
        });
        let mut channels = Vec::new();
        for _ in 0..connections {
            channels.push(Channel::from_shared(endpoint.clone())?.connect().await?);
        }
        Ok(Bench {
            target: Target::Grpc(Arc::new(Grpc { channels, tokens })),
            engine,
            syncs: None,
            cases: 0,
            server: Some((stop, task)),
        })
    }

    /// Opens cases up to `target`, from `clients` concurrent callers.
    async fn grow(&mut self, target: usize, clients: usize) -> Result<Duration> {
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(self.cases as u64));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (driver, next) = (self.target.clone(), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= target {
                        return Ok::<(), anyhow::Error>(());
                    }
                    driver.open_case(i).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        self.cases = self.cases.max(target);
        Ok(started.elapsed())
    }

    /// Durable progress reports from `clients` callers for `seconds`, on the
    /// cases `walk` picks.
    async fn transitions(
        &self,
        clients: usize,
        seconds: u64,
        round: &str,
        walk: Walk,
    ) -> Result<(u64, Duration, Histogram<u64>, Option<u64>)> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        // Request ids new to the store even when the bench runs again on it.
        let round = format!("{round}-{}", chrono::Utc::now().timestamp_micros());
        let syncs_before = self.syncs.as_ref().map(|s| s.load(Ordering::Relaxed));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..clients {
            let driver = self.target.clone();
            let round = round.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3)?;
                let mut n = 0u64;
                // Each client walks its own cases: no two callers race for one case.
                let mut i = client;
                while Instant::now() < deadline {
                    let at = Instant::now();
                    driver
                        .report(walk.case(i), format!("{round}-{client}-{n}"))
                        .await?;
                    latencies.record(at.elapsed().as_micros() as u64)?;
                    n += 1;
                    i += clients;
                }
                Ok::<(u64, Histogram<u64>), anyhow::Error>((n, latencies))
            }));
        }
        let mut total = 0;
        let mut all = Histogram::<u64>::new(3)?;
        for t in tasks {
            let (n, h) = t.await??;
            total += n;
            all.add(h)?;
        }
        let elapsed = started.elapsed();
        let syncs = self
            .syncs
            .as_ref()
            .zip(syncs_before)
            .map(|(s, before)| s.load(Ordering::Relaxed) - before);
        Ok((total, elapsed, all, syncs))
    }

    /// Mean cost of a first page of a list and of an inbox.
    fn read_costs(&self) -> Result<(Duration, Duration)> {
        const ROUNDS: u32 = 200;
        let started = Instant::now();
        for r in 0..ROUNDS {
            let filter = CaseFilter {
                workflow: Some("baolian_escalation".into()),
                state: Some("county_handling".into()),
                agency: Some(county(r as usize).into()),
                ..CaseFilter::default()
            };
            let page = self.engine.list(&filter, "", 50)?;
            if page.cases.is_empty() {
                bail!("the list came back empty");
            }
        }
        let list = started.elapsed() / ROUNDS;
        let started = Instant::now();
        for r in 0..ROUNDS {
            let page = self.engine.inbox(county(r as usize), "", 50)?;
            if page.cases.is_empty() {
                bail!("the inbox came back empty");
            }
        }
        Ok((list, started.elapsed() / ROUNDS))
    }
}

/// Which cases a transition run walks through: `count` of them, `stride`
/// apart (bench cases are numbered 0, 1, 2, … in the order they were opened).
#[derive(Debug, Clone, Copy)]
struct Walk {
    count: usize,
    stride: usize,
}

impl Walk {
    /// Every one of `cases` cases.
    fn every(cases: usize) -> Walk {
        Walk {
            count: cases,
            stride: 1,
        }
    }

    /// `active` cases spread evenly over `cases`.
    fn spread(active: usize, cases: usize) -> Walk {
        let count = active.clamp(1, cases);
        Walk {
            count,
            stride: cases / count,
        }
    }

    /// The case of the `i`-th step.
    fn case(self, i: usize) -> usize {
        (i % self.count) * self.stride
    }
}

fn print_transitions(
    total: u64,
    elapsed: Duration,
    h: &Histogram<u64>,
    syncs: Option<u64>,
    clients: usize,
) {
    let rate = total as f64 / elapsed.as_secs_f64();
    let commits = syncs.map_or_else(String::new, |n| {
        format!(
            "; {n} fsync'd commits ({:.1} transitions each)",
            total as f64 / n.max(1) as f64
        )
    });
    println!(
        "durable transitions: {total} in {:.1} s = {rate:.0}/s with {clients} clients; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{commits}",
        elapsed.as_secs_f64(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
}

/// How many bench cases a kept store already holds (they are opened in
/// order, 0, 1, 2, …), so that a run on it grows it instead of retrying
/// every start.
fn existing_cases(engine: &Engine) -> usize {
    let exists = |i: usize| engine.case(&case_id(i)).is_ok();
    if !exists(0) {
        return 0;
    }
    let mut high = 1;
    while exists(high) {
        high *= 2;
    }
    // exists(low) and not exists(high): the first missing one is in between.
    let mut low = high / 2;
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if exists(middle) {
            low = middle;
        } else {
            high = middle;
        }
    }
    high
}

pub async fn run(options: BenchOptions) -> Result<()> {
    let temp;
    let dir = match &options.data {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mut bench = if options.grpc {
        Bench::serve(&options, &dir, options.connections).await?
    } else {
        Bench::open(&options, &dir)?
    };
    bench.cases = existing_cases(&bench.engine);
    println!(
        "govflow bench {}: store {}, workflow baolian_escalation (report_progress)",
        if options.grpc {
            "over gRPC (loopback)"
        } else {
            "in process"
        },
        dir.display()
    );
    if options.scale.is_empty() {
        let kept = bench.cases.min(options.cases);
        let took = bench.grow(options.cases, options.clients).await?;
        let opened = options.cases - kept;
        println!(
            "setup: {opened} cases started and classified ({} durable transitions) in {:.1} s{}",
            opened * 2,
            took.as_secs_f64(),
            if kept > 0 {
                format!(", beside {kept} the store already held")
            } else {
                String::new()
            }
        );
        let (total, elapsed, h, syncs) = bench
            .transitions(
                options.clients,
                options.seconds,
                "run",
                Walk::every(options.cases),
            )
            .await?;
        print_transitions(total, elapsed, &h, syncs, options.clients);
    } else {
        let active = options.active;
        println!(
            "| cases | list page (µs) | inbox page (µs) | transitions/s on {active} cases | p99 (ms) | transitions/s sweeping every case | p99 (ms) |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (round, &target) in options.scale.iter().enumerate() {
            bench.grow(target, options.clients).await?;
            let (list, inbox) = bench.read_costs()?;
            let mut row = format!(
                "| {target} | {:.0} | {:.0} |",
                list.as_secs_f64() * 1e6,
                inbox.as_secs_f64() * 1e6
            );
            for (walk, name) in [
                (Walk::spread(active, target), "active"),
                (Walk::every(target), "sweep"),
            ] {
                let (total, elapsed, h, _) = bench
                    .transitions(
                        options.clients,
                        options.seconds,
                        &format!("scale{round}-{name}"),
                        walk,
                    )
                    .await?;
                row += &format!(
                    " {:.0} | {:.2} |",
                    total as f64 / elapsed.as_secs_f64(),
                    h.value_at_quantile(0.99) as f64 / 1000.0
                );
            }
            println!("{row}");
        }
    }
    if let Some((stop, task)) = bench.server.take() {
        let _ = stop.send(());
        let _ = task.await;
    }
    bench.engine.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Walk;
    use std::collections::BTreeSet;

    #[test]
    fn an_active_set_is_spread_over_the_whole_store_and_stays_inside_it() {
        let walk = Walk::spread(10_000, 1_000_000);
        let visited: BTreeSet<usize> = (0..20_000).map(|i| walk.case(i)).collect();
        assert_eq!(visited.len(), 10_000);
        assert_eq!(visited.first(), Some(&0));
        assert_eq!(visited.last(), Some(&999_900));
        // Asking for more active cases than the store holds walks them all.
        let small = Walk::spread(10_000, 300);
        let visited: BTreeSet<usize> = (0..600).map(|i| small.case(i)).collect();
        assert_eq!(visited, (0..300).collect());
    }

    #[test]
    fn a_sweep_visits_every_case_in_turn() {
        let walk = Walk::every(5);
        let steps: Vec<usize> = (0..7).map(|i| walk.case(i)).collect();
        assert_eq!(steps, [0, 1, 2, 3, 4, 0, 1]);
    }
}
