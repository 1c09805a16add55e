//! The `govflow` command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use govflow::lang::load::{self, Document};
use govflow::lang::validate::{count, validate};
use govflow::render;

/// glibc's allocator spends half the engine's time consolidating small
/// chunks freed across threads; mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit_cmd;
mod bench;
mod client;
mod workload;

#[derive(Parser)]
#[command(
    name = "govflow",
    version,
    about = "Cross-department government workflows as RON state-machine graphs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check workflow files and folders; report every problem with file:line:col.
    Validate {
        /// Files or folders (folders are searched for .ron files).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
        /// Also draw every workflow into this folder (`NAME.dot`, `NAME.mmd`, `NAME.svg`).
        #[arg(long, value_name = "DIR")]
        draw: Option<PathBuf>,
    },
    /// Run scenario files against their workflows on virtual time; report transition coverage.
    Test {
        /// Files or folders holding workflows and scenarios.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Fail unless every workflow the scenarios exercise (their own, and
        /// the children they start) reaches this coverage (percent, 0–100).
        #[arg(long, value_name = "PERCENT", value_parser = percent)]
        min_coverage: Option<f64>,
    },
    /// Draw a workflow as a picture.
    Graph {
        /// The workflow file.
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = render::Format::Dot)]
        format: render::Format,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Run the server: the engine behind gRPC (data in ./govflow-data, workflows from ./workflows).
    Serve {
        /// A TOML configuration file (listen, data, workflows, auditors, credentials,
        /// watch_cutoff_ms, tls, client_certificates).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen on this address (default 127.0.0.1:50051).
        #[arg(long, value_parser = govflow::server::parse_listen)]
        listen: Option<std::net::SocketAddr>,
        /// Keep data in this folder (default govflow-data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Load workflows from this folder (default workflows).
        #[arg(long)]
        workflows: Option<PathBuf>,
    },
    /// Audit a store folder (offline): replay, verify, at, export, migration-check.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Cases on a server: start, fire, show, list, inbox, watch.
    Case {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: client::CaseCommand,
    },
    /// Workflows on a server: deploy, check-migration, list, show, events, graph.
    Workflow {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: client::WorkflowCommand,
    },
    /// Measure durable transitions per second (and scaling with the number of cases).
    Bench {
        /// Drive the engine inside this process.
        #[arg(long, conflicts_with = "grpc", required_unless_present = "grpc")]
        in_process: bool,
        /// Drive a server over gRPC: one is started on a loopback port, and the
        /// clients reach it through real sockets with their agencies' tokens.
        #[arg(long)]
        grpc: bool,
        /// HTTP/2 connections the gRPC clients share.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Concurrent callers.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// How long to measure.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Cases to spread the load over.
        #[arg(long, default_value_t = 10_000)]
        cases: usize,
        /// Instead: grow the store through these case counts and measure list,
        /// inbox and transition costs at each (e.g. `--scale 10000,1000000`).
        #[arg(long, value_delimiter = ',')]
        scale: Vec<usize>,
        /// With `--scale`: the cases the first transition figure at each size
        /// is measured on, spread evenly over the store (the second sweeps
        /// every case, so nearly every step finds its case cold).
        #[arg(long, default_value_t = 10_000, requires = "scale")]
        active: usize,
        /// The workflows folder.
        #[arg(long, default_value = "workflows")]
        workflows: PathBuf,
        /// Keep the store here instead of a temporary folder.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Cases the engine keeps decoded in memory (in process only).
        #[arg(long, conflicts_with = "grpc", default_value_t = govflow::engine::durable::EngineOptions::default().cache_cases)]
        cache_cases: usize,
        /// sled's page cache in MiB (in process only).
        #[arg(long, conflicts_with = "grpc", default_value_t = govflow::store::DEFAULT_CACHE_BYTES >> 20)]
        store_cache_mib: u64,
    },
    /// Commits steps from many tasks until killed (the crash test's worker).
    #[command(hide = true)]
    CrashWorker {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        workflows: PathBuf,
        #[arg(long, default_value_t = 0)]
        run: u32,
        #[arg(long, default_value_t = 16)]
        tasks: usize,
    },
    /// Catalogues: import the official permit list.
    #[command(subcommand)]
    Catalogue(CatalogueCommand),
}

#[derive(Subcommand)]
enum CatalogueCommand {
    /// Load the official 证照分离 list (one annex, as CSV) into a catalogue file.
    Import {
        /// CSV with the official columns 事项名称, 设定依据, 审批层级和部门, 改革方式, 具体改革举措, 事中事后监管措施.
        #[arg(long)]
        csv: PathBuf,
        /// Which annex this is: the centrally set items or Hebei's own.
        #[arg(long, value_enum)]
        level: Level,
        /// The catalogue file to update (rewritten in place).
        #[arg(long, default_value = "workflows/catalogues/permits.ron")]
        catalogue: PathBuf,
        /// The agency directory used to map departments to agency ids.
        #[arg(long, default_value = "workflows/agencies.ron")]
        agencies: PathBuf,
        /// Agency id for rows whose department cannot be matched.
        #[arg(long, default_value = govflow::catalogue::DEFAULT_DEPARTMENT)]
        default_department: String,
        /// Agency id for rows whose supervising department cannot be matched.
        #[arg(long, default_value = govflow::catalogue::DEFAULT_SUPERVISOR)]
        default_supervisor: String,
        /// Prefix of the generated row ids (default ZZFL-C- or ZZFL-H-).
        #[arg(long)]
        id_prefix: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Level {
    Central,
    Hebei,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // An audit names a store it cannot read itself, once: sled's own log
    // lines about it would only repeat it (GOVFLOW_LOG still shows them).
    let quiet = match cli.command {
        Command::Audit(_) => "warn,sled=off",
        // A server logs each call (`govflow::requests`); GOVFLOW_LOG=warn stops it.
        Command::Serve { .. } => "warn,govflow::requests=info",
        _ => "warn",
    };
    // A server's log is written by a thread of its own, so that a slow
    // reader of stderr (a terminal, a busy journal) never slows its calls:
    // past 128,000 lines waiting, lines are dropped rather than waited for.
    // The guard writes what is left when `main` returns.
    let (writer, _written_on_exit) = if matches!(cli.command, Command::Serve { .. }) {
        let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
        (BoxMakeWriter::new(writer), Some(guard))
    } else {
        (BoxMakeWriter::new(std::io::stderr), None)
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GOVFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(quiet)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer)
        .init();
    // Every command may compile or evaluate expressions (validate, test,
    // replay), which need more stack than a main thread has in a debug
    // build: the command runs on a thread with the stack they may need.
    let command = std::thread::Builder::new()
        .name("govflow".into())
        .stack_size(govflow::lang::expr::STACK_BYTES)
        .spawn(move || run(cli));
    let outcome = match command {
        Ok(thread) => match thread.join() {
            Ok(outcome) => outcome,
            // The panic has been printed by the hook.
            Err(_) => return ExitCode::from(101),
        },
        Err(e) => Err(anyhow::Error::new(e).context("starting the command's thread")),
    };
    match outcome {
        Ok(code) => code,
        // The reader of our output went away (`govflow audit at … | head`):
        // nothing is wrong, and nothing more is wanted.
        Err(e) if reader_gone(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("govflow: {}", client::causes(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

/// Whether `e` is a write to a pipe whose reader has closed it.
fn reader_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The runtime of the commands that run or reach a server. Its threads
/// validate deployed workflows and run audits, so they get the stack that
/// expressions may need (`lang::expr::STACK_BYTES`).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(govflow::lang::expr::STACK_BYTES)
        .build()
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate {
            paths,
            format,
            draw,
        } => {
            let code = validate_command(&paths, format)?;
            if let Some(dir) = draw {
                draw_all(&paths, &dir)?;
            }
            Ok(code)
        }
        Command::Graph {
            file,
            format,
            output,
        } => graph_command(&file, format, output),
        Command::Catalogue(command) => catalogue_command(command),
        Command::Audit(command) => audit_cmd::run(command),
        Command::Serve {
            config,
            listen,
            data,
            workflows,
        } => {
            let mut config = match config {
                Some(path) => govflow::server::Config::load(&path)?,
                None => govflow::server::Config::default(),
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(data) = data {
                config.data = data;
            }
            if let Some(workflows) = workflows {
                config.workflows = workflows;
            }
            runtime()?.block_on(client::serve(config))
        }
        // A refusal from the server is the command's answer (exit 1), not a usage error.
        Command::Case {
            connection,
            command,
        } => {
            let json = connection.json;
            Ok(answer(
                runtime()?.block_on(client::case(connection, command)),
                json,
            ))
        }
        Command::Workflow {
            connection,
            command,
        } => {
            let json = connection.json;
            Ok(answer(
                runtime()?.block_on(client::workflow(connection, command)),
                json,
            ))
        }
        Command::Bench {
            in_process: _,
            grpc,
            connections,
            clients,
            seconds,
            cases,
            scale,
            active,
            workflows,
            data,
            cache_cases,
            store_cache_mib,
        } => {
            let options = bench::BenchOptions {
                grpc,
                connections,
                workflows,
                data,
                clients,
                seconds,
                cases,
                scale,
                active,
                engine: govflow::engine::durable::EngineOptions { cache_cases },
                store_cache_bytes: store_cache_mib << 20,
            };
            runtime()?.block_on(bench::run(options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CrashWorker {
            data,
            workflows,
            run,
            tasks,
        } => {
            runtime()?.block_on(workload::crash_worker(&data, &workflows, run, tasks))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Test {
            paths,
            min_coverage,
        } => test_command(&paths, min_coverage),
    }
}

/// A percentage on the command line: a number from 0 to 100.
fn percent(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("`{text}` is not a percentage from 0 to 100")),
    }
}

fn test_command(paths: &[PathBuf], min_coverage: Option<f64>) -> Result<ExitCode> {
    let sources = load::load(paths)?;
    let validated = validate(&sources);
    let Some(library) = validated.library else {
        for d in &validated.diagnostics {
            println!("{d}");
        }
        println!("the workflows do not validate: no scenario was run");
        return Ok(ExitCode::from(1));
    };
    let run = govflow::scenario::run::run(&sources, &library);
    let mut out = std::io::stdout().lock();
    // Warnings (a deadline needing the calendar none is loaded) explain failures below.
    for d in &validated.diagnostics {
        writeln!(out, "{d}")?;
    }
    for report in &run.scenarios {
        match &report.failure {
            None => writeln!(out, "ok   {} — {}", report.file.display(), report.name)?,
            Some(why) => writeln!(
                out,
                "FAIL {} — {}\n     {why}",
                report.file.display(),
                report.name
            )?,
        }
    }
    let tested: std::collections::BTreeSet<&str> =
        run.scenarios.iter().map(|r| r.workflow.as_str()).collect();
    writeln!(out, "\ntransition coverage:")?;
    let mut below = 0;
    let width = run
        .coverage
        .iter()
        .map(|c| c.workflow.len())
        .max()
        .unwrap_or(0);
    for coverage in &run.coverage {
        let percent = coverage.percent();
        let has_scenarios = tested.contains(coverage.workflow.as_str());
        // A child workflow is exercised by its parents' scenarios.
        let exercised = has_scenarios || !coverage.covered.is_empty();
        writeln!(
            out,
            "  {:<width$} {:>5.1}%  ({}/{}){}",
            coverage.workflow,
            percent,
            coverage.covered.len(),
            coverage.all.len(),
            match (has_scenarios, exercised) {
                (true, _) => "",
                (false, true) => "  (as a child of other scenarios' cases)",
                (false, false) => "  (no scenario)",
            }
        )?;
        for missing in coverage.missing() {
            writeln!(out, "      not exercised: {missing}")?;
        }
        if let Some(min) = min_coverage
            && exercised
            && percent + f64::EPSILON < min
        {
            below += 1;
        }
    }
    let passed = run.scenarios.iter().filter(|r| r.passed()).count();
    // A scenario file with a mistake validation found (one that does not
    // parse runs not at all) fails the run too.
    let with_mistakes = validated
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.file.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let failed = run.scenarios.len() - passed;
    writeln!(out, "\n{passed} passed, {failed} failed")?;
    if with_mistakes > 0 {
        writeln!(
            out,
            "{} with mistakes (above)",
            count(with_mistakes as u64, "scenario file", "scenario files")
        )?;
    }
    if below > 0 {
        writeln!(
            out,
            "{} below the required coverage of {:.1}%",
            count(below, "workflow", "workflows"),
            min_coverage.unwrap_or(0.0)
        )?;
    }
    Ok(if failed == 0 && below == 0 && with_mistakes == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn catalogue_command(command: CatalogueCommand) -> Result<ExitCode> {
    let CatalogueCommand::Import {
        csv,
        level,
        catalogue,
        agencies,
        default_department,
        default_supervisor,
        id_prefix,
    } = command;
    use govflow::catalogue::{ImportLevel, ImportOptions, csv_text, import_csv, merge, to_ron};
    let level = match level {
        Level::Central => ImportLevel::Central,
        Level::Hebei => ImportLevel::Hebei,
    };
    let read =
        |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let read_text = |path: &PathBuf| {
        String::from_utf8(read(path)?).with_context(|| format!("{} is not UTF-8", path.display()))
    };
    let mut diagnostics = Vec::new();
    let (agencies_text, catalogue_text) = (read_text(&agencies)?, read_text(&catalogue)?);
    let directory = load::parse(
        &agencies,
        load::source_text(&agencies_text),
        &mut diagnostics,
    );
    let target = load::parse(
        &catalogue,
        load::source_text(&catalogue_text),
        &mut diagnostics,
    );
    let (Some(directory), Some(mut target)) = (directory, target) else {
        for d in &diagnostics {
            eprintln!("{d}");
        }
        return Ok(ExitCode::from(1));
    };
    let options = ImportOptions {
        id_prefix,
        default_department,
        default_supervisor,
        ..ImportOptions::new(level)
    };
    let csv_name = csv.display().to_string();
    let (text, encoding) = csv_text(&csv_name, &read(&csv)?)?;
    if encoding != "UTF-8" {
        eprintln!("govflow: {csv_name} is not UTF-8; read as {encoding}");
    }
    let rows = import_csv(&csv_name, &text, &directory, &options)?;
    let count = rows.len();
    merge(&mut target, level, rows);
    let written = to_ron(&target);
    // Checked as `validate` would check it, before anything is written: a
    // merge that would give two rows one key (an `--id-prefix` that clashes
    // with rows kept, an item listed twice) leaves the file as it was. The
    // declared totals are the operator's to update, so they do not stop it.
    let checked = validate(&load::from_texts(
        vec![
            (agencies.clone(), agencies_text),
            (catalogue.clone(), written.clone()),
        ],
        None,
    ));
    let refusals: Vec<_> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error() && d.code != "catalogue-count")
        .collect();
    if !refusals.is_empty() {
        for d in &refusals {
            eprintln!("{}", d.message);
        }
        eprintln!(
            "govflow: {} was not changed: the imported rows would make it invalid",
            catalogue.display()
        );
        return Ok(ExitCode::from(1));
    }
    govflow::files::replace(&catalogue, written.as_bytes(), None)
        .with_context(|| format!("writing {}", catalogue.display()))?;
    println!(
        "imported {count} {} rows into {} (status {:?}); run `govflow validate` to check the declared totals",
        level.as_str(),
        catalogue.display(),
        target.status
    );
    Ok(ExitCode::SUCCESS)
}

/// Exit 1 with the reason when a client command failed.
fn answer(result: Result<ExitCode>, json: bool) -> ExitCode {
    result.unwrap_or_else(|e| {
        match e.downcast_ref::<client::Refusal>() {
            // A script asked for JSON: the refusal is its answer.
            Some(refusal) if json => {
                println!("{}", serde_json::json!({ "error": refusal }));
            }
            // So is what stopped the command before any answer (an argument
            // it cannot use, a file it cannot read), in the same shape.
            None if json => {
                let refusal = client::Refusal {
                    code: "InvalidArgument".into(),
                    reason: "client".into(),
                    message: client::causes(e.as_ref()),
                    hint: String::new(),
                };
                println!("{}", serde_json::json!({ "error": refusal }));
            }
            _ => eprintln!("govflow: {}", client::causes(e.as_ref())),
        }
        ExitCode::from(1)
    })
}

fn validate_command(paths: &[PathBuf], format: OutputFormat) -> Result<ExitCode> {
    let sources = load::load(paths)?;
    let validated = validate(&sources);
    let errors = validated
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .count();
    let warnings = validated.diagnostics.len() - errors;
    let mut out = std::io::stdout().lock();
    match format {
        OutputFormat::Text => {
            for d in &validated.diagnostics {
                writeln!(out, "{d}")?;
            }
            let workflows = sources.workflows().count();
            if validated.diagnostics.is_empty() {
                writeln!(
                    out,
                    "ok: {}, {}, no problems",
                    count(sources.files.len(), "file", "files"),
                    count(workflows, "workflow", "workflows")
                )?;
            } else {
                writeln!(
                    out,
                    "{}, {} in {}",
                    count(errors, "error", "errors"),
                    count(warnings, "warning", "warnings"),
                    count(sources.files.len(), "file", "files")
                )?;
            }
        }
        OutputFormat::Json => {
            let report = serde_json::json!({
                "files": sources.files.len(),
                "errors": errors,
                "warnings": warnings,
                "diagnostics": validated.diagnostics,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        }
    }
    Ok(if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Writes a file the user named, whole or not at all: an earlier picture
/// is never left cut short.
fn write_file(path: &std::path::Path, contents: &[u8]) -> Result<()> {
    govflow::files::replace(path, contents, None)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes every workflow found under `paths` in every picture format.
fn draw_all(paths: &[PathBuf], dir: &std::path::Path) -> Result<()> {
    let sources = load::load(paths)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut count = 0;
    for (_, workflow) in sources.workflows() {
        // The name becomes a file name: `../x` would be drawn outside `dir`.
        if !govflow::lang::validate::is_workflow_name(&workflow.name) {
            eprintln!(
                "not drawn: workflow name `{}` is not a name (see its `bad-name` error)",
                workflow.name.escape_debug()
            );
            continue;
        }
        for (format, ext) in [
            (render::Format::Dot, "dot"),
            (render::Format::Mermaid, "mmd"),
            (render::Format::Svg, "svg"),
        ] {
            let path = dir.join(format!("{}.{ext}", workflow.name));
            write_file(&path, render::render(workflow, format).as_bytes())?;
        }
        count += 1;
    }
    eprintln!("drew {count} workflows into {}", dir.display());
    Ok(())
}

fn graph_command(
    file: &PathBuf,
    format: render::Format,
    output: Option<PathBuf>,
) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut diagnostics = Vec::new();
    let workflow = match load::read_source(file, &text, &mut diagnostics).1 {
        Some(Document::Workflow(w)) => w,
        Some(_) => anyhow::bail!("{} is not a workflow file", file.display()),
        None => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    let picture = render::render(&workflow, format);
    match output {
        Some(path) => write_file(&path, picture.as_bytes())?,
        None => std::io::stdout().lock().write_all(picture.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{client, reader_gone};

    /// Regression: `govflow audit at … | head` ended with "Broken pipe (os
    /// error 32)" and exit 2; a reader that has what it wanted is not an error.
    #[test]
    fn a_reader_that_went_away_is_not_an_error() {
        let gone = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let export = anyhow::Error::new(govflow::audit::AuditError::Write(gone));
        assert!(reader_gone(&export.context("exporting")));
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert!(!reader_gone(&anyhow::Error::new(
            govflow::audit::AuditError::Write(full)
        )));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("storage: {0}")]
    struct Repeats(#[from] std::io::Error);

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::from(Repeats(io)).context("opening the store");
        assert_eq!(
            client::causes(e.as_ref()),
            "opening the store: storage: disk on fire"
        );
        let plain = anyhow::anyhow!("no such case").context("reading a case");
        assert_eq!(
            client::causes(plain.as_ref()),
            "reading a case: no such case"
        );
    }
}
