//! `govflow bench --in-process`: durable transitions per second with many
//! concurrent callers on the seed workflows, and how list, inbox and
//! transition costs grow with the number of cases.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Map, Value as Json, json};

use govflow::engine::durable::{Engine, FireRequest, StartRequest, SystemClock};
use govflow::lang::load::load;
use govflow::store::{CaseFilter, SledStore, Store, SyncStep};

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
    pub workflows: PathBuf,
    pub data: Option<PathBuf>,
    pub clients: usize,
    pub seconds: u64,
    pub cases: usize,
    pub scale: Vec<usize>,
}

struct Bench {
    engine: Engine,
    syncs: Arc<AtomicU64>,
    cases: usize,
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

/// A 包联 case reported through the platform and classified to its county.
async fn open_case(engine: &Engine, i: usize) -> Result<()> {
    let id = case_id(i);
    engine
        .start(StartRequest {
            request_id: format!("{id}-start"),
            case_id: id.clone(),
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
        })
        .await
        .with_context(|| format!("starting {id}"))?;
    engine
        .fire(FireRequest {
            request_id: format!("{id}-classify"),
            case_id: id.clone(),
            event: "classify".into(),
            agency: WORK_TEAM.into(),
            payload: obj(json!({"level": "county"})),
            expected_sequence: None,
        })
        .await
        .with_context(|| format!("classifying {id}"))?;
    Ok(())
}

impl Bench {
    fn open(options: &BenchOptions, dir: &Path) -> Result<Bench> {
        let sources = load(std::slice::from_ref(&options.workflows))?;
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&syncs);
        let store = SledStore::open(dir)?.with_observer(Arc::new(move |step| {
            if step == SyncStep::Synced {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
        let store: Arc<dyn Store> = Arc::new(store);
        let engine = Engine::open(store, &sources, Arc::new(SystemClock))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Bench {
            engine,
            syncs,
            cases: 0,
        })
    }

    /// Opens cases up to `target`, from `clients` concurrent callers.
    async fn grow(&mut self, target: usize, clients: usize) -> Result<Duration> {
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(self.cases as u64));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (engine, next) = (self.engine.clone(), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= target {
                        return Ok::<(), anyhow::Error>(());
                    }
                    open_case(&engine, i).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        self.cases = self.cases.max(target);
        Ok(started.elapsed())
    }

    /// Durable progress reports from `clients` callers for `seconds`.
    async fn transitions(
        &self,
        clients: usize,
        seconds: u64,
        round: &str,
    ) -> Result<(u64, Duration, Histogram<u64>, u64)> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let syncs_before = self.syncs.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..clients {
            let engine = self.engine.clone();
            let cases = self.cases;
            let round = round.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3)?;
                let mut n = 0u64;
                // Each client walks its own cases: no two callers race for one case.
                let mut i = client;
                while Instant::now() < deadline {
                    let at = Instant::now();
                    let id = case_id(i % cases);
                    engine
                        .fire(FireRequest {
                            request_id: format!("{round}-{client}-{n}"),
                            case_id: id,
                            event: "report_progress".into(),
                            agency: county(i % cases).into(),
                            payload: obj(json!({"progress": "已协调自然资源部门，正在办理"})),
                            expected_sequence: None,
                        })
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
        let syncs = self.syncs.load(Ordering::Relaxed) - syncs_before;
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

fn print_transitions(
    total: u64,
    elapsed: Duration,
    h: &Histogram<u64>,
    syncs: u64,
    clients: usize,
) {
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "durable transitions: {total} in {:.1} s = {rate:.0}/s with {clients} clients; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {syncs} fsync'd commits ({:.1} transitions each)",
        elapsed.as_secs_f64(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        total as f64 / syncs.max(1) as f64,
    );
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
    let mut bench = Bench::open(&options, &dir)?;
    println!(
        "govflow bench --in-process: store {}, workflow baolian_escalation (report_progress)",
        dir.display()
    );
    if options.scale.is_empty() {
        let took = bench.grow(options.cases, options.clients).await?;
        println!(
            "setup: {} cases started and classified ({} durable transitions) in {:.1} s",
            options.cases,
            options.cases * 2,
            took.as_secs_f64()
        );
        let (total, elapsed, h, syncs) = bench
            .transitions(options.clients, options.seconds, "run")
            .await?;
        print_transitions(total, elapsed, &h, syncs, options.clients);
    } else {
        println!("| cases | list page (µs) | inbox page (µs) | transitions/s | p99 (ms) |");
        println!("| ---: | ---: | ---: | ---: | ---: |");
        for (round, &target) in options.scale.iter().enumerate() {
            bench.grow(target, options.clients).await?;
            let (list, inbox) = bench.read_costs()?;
            let (total, elapsed, h, _) = bench
                .transitions(options.clients, options.seconds, &format!("scale{round}"))
                .await?;
            println!(
                "| {target} | {:.0} | {:.0} | {:.0} | {:.2} |",
                list.as_secs_f64() * 1e6,
                inbox.as_secs_f64() * 1e6,
                total as f64 / elapsed.as_secs_f64(),
                h.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
    }
    bench.engine.shutdown();
    Ok(())
}
