//! `govflow audit …`: offline auditing of a store folder (DESIGN §7), on top
//! of [`govflow::audit`]. The store must not be open in a running server
//! (sled locks its folder): stop it, or audit a copy.
//!
//! Exit codes: 0 when all is well; 1 when the audit found something
//! (`verify`: a problem in a chain; `replay`: a divergence (of any case, with
//! `--all` or `--workflow`); `export`: records
//! left out; `migration-check`: cases that would break); 2 on errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, FixedOffset, NaiveDate, TimeZone, Utc};

use govflow::audit::{
    self, At, AuditError, AuditLibrary, ExportFilter, Progress, ReplayStep, SledSource, VerifyScope,
};
use govflow::lang::validate::count;

/// Where the store is.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store folder (the server's `--data`).
    #[arg(long, value_name = "DIR", default_value = "govflow-data")]
    pub data: PathBuf,
}

/// Where the store and the rules are.
#[derive(clap::Args, Debug, Clone)]
pub struct RulesArgs {
    /// The store folder (the server's `--data`).
    #[arg(long, value_name = "DIR", default_value = "govflow-data")]
    pub data: PathBuf,
    /// The workflows folder: agency directory, catalogues, calendar and the
    /// current workflows (older versions come from the store).
    #[arg(long, value_name = "DIR", default_value = "workflows")]
    pub workflows: PathBuf,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum AuditCommand {
    /// Replay a case's history step by step through the workflow version it is
    /// pinned to; stop at the first divergence and say where and why. With
    /// --all or --workflow, replay every case (in parallel) and name each one
    /// that diverges. Exits 1 on a divergence.
    Replay {
        /// The case id.
        #[arg(required_unless_present_any = ["all", "workflow"], conflicts_with_all = ["all", "workflow"])]
        case: Option<String>,
        /// Every case in the store.
        #[arg(long, conflicts_with = "workflow")]
        all: bool,
        /// Every case of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        #[command(flatten)]
        rules: RulesArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// No progress bar (--all, --workflow).
        #[arg(long)]
        no_progress: bool,
    },
    /// Recompute the hash chains of one case, of a workflow's cases, or of the
    /// whole store; name every altered, missing, reordered, forged or
    /// undecodable entry. Exits 1 when it finds a problem.
    Verify {
        /// Only this case.
        #[arg(long, conflicts_with = "workflow")]
        case: Option<String>,
        /// Only the cases of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Show a case (state, variables, bindings, timers) as of a sequence number or a moment.
    #[command(group(clap::ArgGroup::new("when").required(true).args(["sequence", "time"])))]
    At {
        /// The case id.
        case: String,
        /// Right after this step.
        #[arg(long)]
        sequence: Option<u64>,
        /// As of this moment (RFC 3339, or a date YYYY-MM-DD meaning its start
        /// in Asia/Shanghai): after the last step at or before it.
        #[arg(long)]
        time: Option<String>,
        #[command(flatten)]
        rules: RulesArgs,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export histories as JSON Lines (one entry per line, with its hashes;
    /// check them with tools/verify_export.py).
    Export {
        /// Only this case.
        #[arg(long)]
        case: Option<String>,
        /// Only cases of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only cases in which this agency holds or held a role, or acted.
        #[arg(long)]
        agency: Option<String>,
        /// Only cases now in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only entries at or after this time (RFC 3339, or YYYY-MM-DD in Asia/Shanghai).
        #[arg(long)]
        since: Option<String>,
        /// Only entries before this time (RFC 3339, or YYYY-MM-DD in Asia/Shanghai).
        #[arg(long)]
        until: Option<String>,
        /// Write here instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Replay every running case of a workflow against a new version of it
    /// (before deploying it) and list the cases that would break. Exits 1 when
    /// some would.
    MigrationCheck {
        /// The new version's source file.
        file: PathBuf,
        #[command(flatten)]
        rules: RulesArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an audit command.
pub fn run(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::Replay {
            case,
            all: _,
            workflow,
            rules,
            json,
            no_progress,
        } => match (case, workflow) {
            (Some(case), _) => replay(&case, &rules, json),
            (None, Some(w)) => replay_all(&VerifyScope::Workflow(w), &rules, json, !no_progress),
            (None, None) => replay_all(&VerifyScope::All, &rules, json, !no_progress),
        },
        AuditCommand::Verify {
            case,
            workflow,
            store,
            json,
            no_progress,
        } => {
            let scope = match (case, workflow) {
                (Some(c), _) => VerifyScope::Case(c),
                (None, Some(w)) => VerifyScope::Workflow(w),
                (None, None) => VerifyScope::All,
            };
            verify(&store.data, &scope, json, !no_progress)
        }
        AuditCommand::At {
            case,
            sequence,
            time,
            rules,
            json,
        } => {
            let when = match (sequence, time) {
                (Some(s), _) => At::Sequence(s),
                (None, Some(t)) => At::Time(parse_time(&t)?),
                (None, None) => bail!("give --sequence or --time"),
            };
            at(&case, when, &rules, json)
        }
        AuditCommand::Export {
            case,
            workflow,
            agency,
            state,
            since,
            until,
            output,
            store,
        } => {
            let filter = ExportFilter {
                case,
                workflow,
                agency,
                state,
                since: since.as_deref().map(parse_time).transpose()?,
                until: until.as_deref().map(parse_time).transpose()?,
                visible_to: None,
            };
            if let (Some(since), Some(until)) = (filter.since, filter.until)
                && until <= since
            {
                bail!("--until must come after --since: the window would hold nothing");
            }
            export(&store.data, &filter, output.as_deref())
        }
        AuditCommand::MigrationCheck { file, rules, json } => migration_check(&file, &rules, json),
    }
}

/// RFC 3339, or a date meaning its first moment in Asia/Shanghai (UTC+8).
pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.to_utc());
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").with_context(|| {
        format!("`{text}` is neither an RFC 3339 time (2020-06-01T09:00:00+08:00) nor a date (2020-06-01)")
    })?;
    let shanghai = FixedOffset::east_opt(8 * 3600).context("offset")?;
    let midnight = date.and_hms_opt(0, 0, 0).context("midnight")?;
    shanghai
        .from_local_datetime(&midnight)
        .single()
        .map(|t| t.to_utc())
        .context("an ambiguous local time")
}

/// An opened store, and the folder it is in (for messages).
struct Store {
    source: SledSource,
    dir: PathBuf,
}

impl Store {
    /// An audit error as the command reports it: a store whose data cannot
    /// be read is named, and its cause said once.
    fn failed(&self, e: AuditError) -> anyhow::Error {
        unreadable(&self.dir, e)
    }
}

fn unreadable(dir: &Path, e: AuditError) -> anyhow::Error {
    if e.is_unreadable_store() {
        anyhow!(
            "the store at {} cannot be read: {}",
            dir.display(),
            e.unreadable_reason()
        )
    } else {
        e.into()
    }
}

/// The store of a data folder: `govflow serve` keeps it in `<data>/store`;
/// a bare store folder works too.
fn open(data: &Path) -> Result<Store> {
    let served = data.join("store");
    let dir = if served.join("db").exists() {
        served
    } else {
        data.to_path_buf()
    };
    // A missing store or one in use names its folder itself.
    let source = SledSource::open(&dir).map_err(|e| unreadable(&dir, e))?;
    Ok(Store { source, dir })
}

/// What `--workflows` is, for a folder that cannot be loaded.
const WORKFLOWS_HINT: &str = "hint: give the workflows folder (agency directory, catalogues, calendar, workflows) with --workflows DIR; the default is ./workflows, relative to the current folder";

fn open_rules(rules: &RulesArgs) -> Result<(Store, AuditLibrary)> {
    let store = open(&rules.data)?;
    let lib = match AuditLibrary::load(&rules.workflows, &store.source) {
        Ok(lib) => lib,
        Err(e @ AuditError::Load(_)) => bail!("{e}\n{WORKFLOWS_HINT}"),
        Err(AuditError::InvalidLibrary(diagnostics)) => {
            for d in diagnostics.iter().filter(|d| d.is_error()) {
                eprintln!("{d}");
            }
            bail!(
                "the workflows in {} do not validate; the audit needs their agency directory and catalogues",
                rules.workflows.display()
            );
        }
        Err(e) => return Err(store.failed(e)),
    };
    for (name, version) in &lib.unavailable {
        eprintln!(
            "warning: {name} version {version} no longer compiles against today's directory and catalogues; its cases cannot be replayed"
        );
    }
    Ok((store, lib))
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

fn compact(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn pairs(map: &std::collections::BTreeMap<String, impl serde::Serialize>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", compact(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A progress bar on standard error for a long pass over the store
/// (hidden unless `shown`), and what updates it.
fn progress_bar(verb: &str, shown: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::hidden();
    if shown {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{spinner}} {verb} [{{bar:30}}] {{pos}}/{{len}} parts, {{msg}} ({{elapsed}}, eta {{eta}})"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
    }
    bar
}

fn show_progress(bar: &indicatif::ProgressBar, p: Progress) {
    bar.set_length(p.parts_total);
    bar.set_position(p.parts_done);
    bar.set_message(format!(
        "{} cases, {} entries",
        p.cases_done, p.entries_checked
    ));
}

/// The summary line of a pass over the store: "verified 3 cases, 10 history
/// entries in 0.01 s (1000 entries/s)".
fn write_pass(
    out: &mut impl Write,
    verb: &str,
    cases: u64,
    entries: u64,
    elapsed: std::time::Duration,
    rate: f64,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{verb} {}, {} in {:.2} s ({rate:.0} entries/s)",
        count(cases, "case", "cases"),
        count(entries, "history entry", "history entries"),
        elapsed.as_secs_f64(),
    )
}

fn verify(data: &Path, scope: &VerifyScope, json: bool, progress: bool) -> Result<ExitCode> {
    let store = open(data)?;
    let bar = progress_bar("verifying", progress && !json);
    let report = audit::verify(
        &store.source,
        scope,
        Some(&|p: Progress| show_progress(&bar, p)),
    )
    .map_err(|e| store.failed(e))?;
    bar.finish_and_clear();
    if json {
        print_json(&report)?;
    } else {
        let mut out = std::io::stdout().lock();
        for f in &report.findings {
            writeln!(out, "PROBLEM {f}")?;
        }
        write_pass(
            &mut out,
            "verified",
            report.cases,
            report.entries,
            report.elapsed,
            report.entries_per_second(),
        )?;
        if report.is_clean() {
            writeln!(out, "every hash chain is intact")?;
        } else {
            let cases: std::collections::BTreeSet<&str> =
                report.findings.iter().map(|f| f.case_id.as_str()).collect();
            writeln!(
                out,
                "{} problem(s) in {} case(s)",
                report.findings.len(),
                cases.len()
            )?;
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn write_step(out: &mut impl Write, step: &ReplayStep) -> std::io::Result<()> {
    let who = if step.actor.is_empty() {
        step.actor_kind.to_owned()
    } else {
        format!("{} {}", step.actor_kind, step.actor)
    };
    let from = if step.from_state.is_empty() {
        "·"
    } else {
        &step.from_state
    };
    writeln!(
        out,
        "#{:<4} {}  {who}  {}  {from} → {}{}",
        step.sequence,
        step.time
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        step.event,
        step.to_state,
        step.outcome
            .as_deref()
            .map(|o| format!("  (outcome {o})"))
            .unwrap_or_default()
    )?;
    if step.payload.as_object().is_some_and(|p| !p.is_empty()) {
        writeln!(out, "      payload    {}", compact(&step.payload))?;
    }
    if !step.variables_changed.is_empty() {
        writeln!(out, "      variables  {}", pairs(&step.variables_changed))?;
    }
    if !step.bindings_changed.is_empty() {
        writeln!(out, "      bindings   {}", pairs(&step.bindings_changed))?;
    }
    for t in &step.timers_set {
        writeln!(
            out,
            "      timer set  {} ({:?} → {}) due {}",
            t.id,
            t.kind,
            t.event,
            t.due.to_rfc3339()
        )?;
    }
    if !step.timers_cancelled.is_empty() {
        writeln!(out, "      cancelled  {}", step.timers_cancelled.join(", "))?;
    }
    if let Some(calendar) = &step.calendar_version {
        writeln!(out, "      calendar   {calendar}")?;
    }
    if !step.request_id.is_empty() {
        writeln!(out, "      request    {}", step.request_id)?;
    }
    Ok(())
}

fn replay(case: &str, rules: &RulesArgs, json: bool) -> Result<ExitCode> {
    let (store, lib) = open_rules(rules)?;
    let report =
        audit::replay_case(&store.source, &lib.library, case).map_err(|e| store.failed(e))?;
    if json {
        print_json(&report)?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "case {} — workflow {} version {} ({}){}",
            report.case_id,
            report.workflow,
            report.workflow_version,
            short(&report.workflow_digest),
            report
                .parent
                .as_deref()
                .map(|p| format!(", child of {p}"))
                .unwrap_or_default()
        )?;
        for step in &report.steps {
            write_step(&mut out, step)?;
        }
        match &report.divergence {
            None => writeln!(
                out,
                "replayed {} of {} steps: identical to the stored history and case record",
                report.steps.len(),
                report.stored_steps
            )?,
            Some(stop) => writeln!(
                out,
                "DIVERGES at sequence {}: {} ({} steps replayed identically before it)",
                stop.sequence,
                stop.reason,
                report.steps.len()
            )?,
        }
    }
    Ok(if report.matches() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn replay_all(
    scope: &VerifyScope,
    rules: &RulesArgs,
    json: bool,
    progress: bool,
) -> Result<ExitCode> {
    let (store, lib) = open_rules(rules)?;
    let bar = progress_bar("replaying", progress && !json);
    let report = audit::replay_all(
        &store.source,
        &lib.library,
        scope,
        Some(&|p: Progress| show_progress(&bar, p)),
    )
    .map_err(|e| store.failed(e))?;
    bar.finish_and_clear();
    if json {
        print_json(&report)?;
    } else {
        let mut out = std::io::stdout().lock();
        for d in &report.divergences {
            writeln!(out, "DIVERGES {d}")?;
        }
        write_pass(
            &mut out,
            "replayed",
            report.cases,
            report.entries,
            report.elapsed,
            report.entries_per_second(),
        )?;
        if report.matches() {
            writeln!(
                out,
                "every case replays exactly as stored, step by step, and agrees with its case record"
            )?;
        } else {
            writeln!(
                out,
                "{} case(s) do not replay as stored",
                report.divergences.len()
            )?;
        }
    }
    Ok(if report.matches() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn at(case: &str, when: At, rules: &RulesArgs, json: bool) -> Result<ExitCode> {
    let (store, lib) = open_rules(rules)?;
    let view =
        audit::case_at(&store.source, &lib.library, case, when).map_err(|e| store.failed(e))?;
    if json {
        print_json(&view)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    let asked = match when {
        At::Sequence(s) => format!("after step {s}"),
        At::Time(t) => format!("as of {}", t.to_rfc3339()),
    };
    writeln!(
        out,
        "case {} ({} version {}) {asked}: step {} at {}",
        view.case_id,
        view.workflow,
        view.workflow_version,
        view.sequence,
        view.time.to_rfc3339()
    )?;
    writeln!(
        out,
        "state      {}{}",
        view.state,
        view.outcome
            .as_deref()
            .map(|o| format!(" (outcome {o})"))
            .unwrap_or_default()
    )?;
    for (name, value) in &view.variables {
        writeln!(out, "variable   {name} = {}", compact(value))?;
    }
    for (role, agency) in &view.bindings {
        writeln!(out, "role       {role} → {agency}")?;
    }
    for t in &view.timers {
        writeln!(
            out,
            "timer      {} ({:?} → {}) due {}",
            t.id,
            t.kind,
            t.event,
            t.due.to_rfc3339()
        )?;
    }
    for (role, s) in &view.case.signatures {
        writeln!(
            out,
            "signature  {role}: {} {} at {}",
            s.agency,
            if s.approved { "approved" } else { "rejected" },
            s.at.to_rfc3339()
        )?;
    }
    for child in &view.case.children {
        writeln!(
            out,
            "child      {} ({}) {}",
            child.id,
            child.workflow,
            child.outcome.as_deref().unwrap_or("running")
        )?;
    }
    writeln!(out, "last step:")?;
    write_step(&mut out, &view.step)?;
    Ok(ExitCode::SUCCESS)
}

fn export(data: &Path, filter: &ExportFilter, output: Option<&Path>) -> Result<ExitCode> {
    let store = open(data)?;
    let summary = match output {
        // Whole or not at all: an export cut short by an error or a crash
        // must not pass for a complete one, nor replace an earlier export.
        Some(path) => govflow::files::write_whole(path, None, |file| {
            audit::export(&store.source, filter, file).map_err(|e| store.failed(e))
        })
        .with_context(|| format!("writing {}", path.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            audit::export(&store.source, filter, &mut out).map_err(|e| store.failed(e))?
        }
    };
    for s in &summary.skipped {
        eprintln!(
            "warning: left out of the export: case {}{}: {}",
            s.case_id,
            s.sequence
                .map(|n| format!(" sequence {n}"))
                .unwrap_or_default(),
            s.reason
        );
    }
    eprintln!(
        "exported {} of {}{}; SHA-256 of the export before its end line: {} (keep it apart from \
         the file: tools/verify_export.py prints the one it computes)",
        count(summary.entries, "entry", "entries"),
        count(summary.cases, "case", "cases"),
        output
            .map(|p| format!(" to {}", p.display()))
            .unwrap_or_default(),
        summary.sha256
    );
    Ok(if summary.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} record(s) could not be read; run `govflow audit verify` on the store",
            summary.skipped.len()
        );
        ExitCode::from(1)
    })
}

fn migration_check(file: &Path, rules: &RulesArgs, json: bool) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (store, lib) = open_rules(rules)?;
    let report = match audit::migration_check(&store.source, &lib, file, &text) {
        Ok(report) => report,
        Err(AuditError::InvalidWorkflow(diagnostics)) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            bail!("{} does not validate: nothing was checked", file.display());
        }
        Err(e) => return Err(store.failed(e)),
    };
    if json {
        print_json(&report)?;
    } else {
        let mut out = std::io::stdout().lock();
        for w in &report.warnings {
            writeln!(out, "warning: {w}")?;
        }
        for b in &report.breaking {
            writeln!(
                out,
                "BREAKS case {} (version {}, in `{}`) at sequence {}: {}: {}",
                b.case_id,
                b.version,
                b.state,
                b.sequence,
                match b.kind {
                    audit::BreakKind::History => "history",
                    audit::BreakKind::Ahead => "next step",
                    audit::BreakKind::Unreadable => "unreadable",
                },
                b.reason
            )?;
        }
        writeln!(
            out,
            "{}: {} running case(s) checked against the new version ({}); {}",
            report.workflow,
            report.running,
            short(&report.new_digest),
            if report.is_compatible() {
                "none would break".to_owned()
            } else {
                format!("{} would break", report.breaking.len())
            }
        )?;
    }
    Ok(if report.is_compatible() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
