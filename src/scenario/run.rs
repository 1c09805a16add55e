//! Running scenario files on virtual time, in memory, through the pure core.
//!
//! Each scenario starts its case (id `main`) at `start.at`, then runs its steps.
//! Children are started from the core's spawn requests (their starter is the
//! agency whose step spawned them) and a child reaching a terminal state tells
//! its parent, recursively. `Advance` fires every timer of every case that
//! comes due, earliest first (ties by case id, then timer id), with the clock
//! set to each timer's due time, then leaves the clock at the target.
//!
//! Coverage counts, per workflow, the items of [`crate::engine::coverage`]
//! taken by any case of that workflow in any scenario.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use serde_json::{Map as JsonMap, Value as Json};

use super::model::{Expect, Scenario, Step as ScenarioStep, Target};
use crate::calendar::Unit;
use crate::engine::core::{self, Actor, Case, Input, RejectCode, Step};
use crate::engine::coverage;
use crate::lang::diag::did_you_mean;
use crate::lang::load::Sources;
use crate::lang::model::Period;
use crate::lang::validate::{Library, count};
use crate::lang::value::{self, ron_to_json};

/// The id of a scenario's own case; its children are `main/0`, `main/1`, ….
pub const MAIN_CASE: &str = "main";

/// More timer firings than this in one `Advance` means a deadline loop.
const MAX_FIRINGS_PER_ADVANCE: usize = 10_000;

/// The result of one scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioReport {
    pub file: PathBuf,
    pub name: String,
    pub workflow: String,
    /// `None` when it passed; else names the failing step, e.g.
    /// "step 4 (Fire `classify` by hebei.sjz.platform): rejected: guard-false: …".
    pub failure: Option<String>,
}

impl ScenarioReport {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// Which paths of a workflow the scenarios took (items: see [`crate::engine::coverage`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    pub workflow: String,
    pub covered: BTreeSet<String>,
    pub all: BTreeSet<String>,
}

impl Coverage {
    /// Covered items as a percentage of all; 100 for a workflow with none.
    pub fn percent(&self) -> f64 {
        if self.all.is_empty() {
            100.0
        } else {
            self.covered.len() as f64 * 100.0 / self.all.len() as f64
        }
    }

    /// Items no scenario took, in order.
    pub fn missing(&self) -> Vec<&String> {
        self.all.difference(&self.covered).collect()
    }
}

/// Everything a test run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestRun {
    pub scenarios: Vec<ScenarioReport>,
    /// One per workflow of the library, by name.
    pub coverage: Vec<Coverage>,
}

impl TestRun {
    pub fn passed(&self) -> bool {
        self.scenarios.iter().all(ScenarioReport::passed)
    }
}

/// Runs every scenario of `sources` against `library`.
pub fn run(sources: &Sources, library: &Library) -> TestRun {
    let mut taken: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let scenarios = sources
        .scenarios()
        .map(|(file, scenario)| ScenarioReport {
            file: file.path.clone(),
            name: scenario.name.clone(),
            workflow: scenario.workflow.clone(),
            failure: if library.workflows.contains_key(&scenario.workflow) {
                run_scenario(library, scenario, MAIN_CASE, &mut taken, None).err()
            } else {
                Some(unknown_workflow(
                    library,
                    &scenario.workflow,
                    Some(&file.path),
                ))
            },
        })
        .collect();
    let coverage = library
        .workflows
        .iter()
        .map(|(name, wf)| {
            let all = coverage::items(&wf.def);
            let covered = taken
                .get(name)
                .map(|t| t.intersection(&all).cloned().collect())
                .unwrap_or_default();
            Coverage {
                workflow: name.clone(),
                covered,
                all,
            }
        })
        .collect();
    TestRun {
        scenarios,
        coverage,
    }
}

/// The cases one scenario produced, each with its history in order, by id.
pub type Histories = BTreeMap<String, (Case, Vec<core::Entry>)>;

/// Runs one scenario with its own case named `main` (its children
/// `{main}/0`, …) and returns every case it produced with its history, as
/// the core took each step: real histories for audits and benchmarks.
/// `Err` names the failing step, as [`run`] reports it.
pub fn record(lib: &Library, scenario: &Scenario, main: &str) -> Result<Histories, String> {
    let mut taken = BTreeMap::new();
    let mut entries = BTreeMap::new();
    let cases = run_scenario(lib, scenario, main, &mut taken, Some(&mut entries))?;
    Ok(cases
        .into_iter()
        .map(|(id, case)| {
            let history = entries.remove(&id).unwrap_or_default();
            (id, (case, history))
        })
        .collect())
}

/// Runs one scenario; `Err` names the failing step. Returns its cases as
/// they ended, and appends each step's entry to `histories` when given.
fn run_scenario(
    lib: &Library,
    scenario: &Scenario,
    main: &str,
    taken: &mut BTreeMap<String, BTreeSet<String>>,
    histories: Option<&mut BTreeMap<String, Vec<core::Entry>>>,
) -> Result<BTreeMap<String, Case>, String> {
    if !lib.workflows.contains_key(&scenario.workflow) {
        return Err(unknown_workflow(lib, &scenario.workflow, None));
    }
    let start = &scenario.start;
    let clock = DateTime::parse_from_rfc3339(&start.at)
        .map(|t| t.to_utc())
        .map_err(|_| {
            format!(
                "start: `at` is `{}`, not an RFC 3339 time like 2020-06-01T09:00:00+08:00",
                start.at
            )
        })?;
    let start_variables = json_map(&start.variables);
    let step = core::start(
        lib,
        &scenario.workflow,
        main,
        &start.by,
        &start.bindings,
        &start_variables,
        clock,
    )
    .and_then(|step| core::admit_start(lib, &step, &start.by, &start_variables).map(|()| step))
    .map_err(|r| format!("start (by {}): rejected: {r}", start.by))?;
    let mut driver = Driver {
        lib,
        main,
        cases: BTreeMap::new(),
        clock,
        fired: Vec::new(),
        taken,
        histories,
    };
    driver
        .commit(step)
        .map_err(|e| format!("start (by {}): {e}", start.by))?;
    driver.fired.clear();
    for (i, step) in scenario.steps.iter().enumerate() {
        driver
            .step(step)
            .map_err(|e| format!("{}: {e}", describe(i + 1, step)))?;
    }
    Ok(driver.cases)
}

/// Why a scenario's workflow is not in the library, and — when it is not a
/// misspelling — how to pass it along with the scenario (`file`, when known,
/// is the scenario's: the workflow is looked for beside it and above).
fn unknown_workflow(lib: &Library, name: &str, file: Option<&Path>) -> String {
    let names = lib.workflows.keys().map(String::as_str);
    if let Some(close) = did_you_mean(name, names.clone()) {
        return format!("unknown workflow `{name}`: no such workflow is loaded ({close})");
    }
    let scenario = file.map_or_else(|| "SCENARIO".to_owned(), |f| f.display().to_string());
    // The nearest folder above the scenario holding `NAME.ron`, if any: not
    // the scenario itself, which may bear its workflow's name.
    let found = file.and_then(|f| {
        f.ancestors().skip(1).find(|dir| {
            let candidate = dir.join(format!("{name}.ron"));
            candidate != f && candidate.is_file()
        })
    });
    let (folder, workflow_file) = match found {
        Some(dir) if dir.as_os_str().is_empty() => ("./".to_owned(), format!("{name}.ron")),
        Some(dir) => (
            format!("{}/", dir.display()),
            dir.join(format!("{name}.ron")).display().to_string(),
        ),
        None => ("WORKFLOWS/".to_owned(), format!("WORKFLOWS/{name}.ron")),
    };
    let example =
        format!("e.g. `govflow test {folder}` or `govflow test {workflow_file} {scenario}`");
    if lib.workflows.is_empty() {
        format!(
            "unknown workflow `{name}`: no workflow is loaded; pass the workflow files or folder along with the scenario, {example}"
        )
    } else {
        let loaded: Vec<&str> = names.collect();
        format!(
            "unknown workflow `{name}`: no such workflow is loaded (loaded: {}); pass its file or folder too, {example}",
            loaded.join(", ")
        )
    }
}

/// "step 4 (Fire `classify` by hebei.sjz.platform)".
fn describe(n: usize, step: &ScenarioStep) -> String {
    let on = |t: &Target| match t {
        Target::Main => String::new(),
        Target::Child(i) => format!(" on child {i}"),
    };
    match step {
        ScenarioStep::Fire {
            event, by, case, ..
        } => format!("step {n} (Fire `{event}` by {by}{})", on(case)),
        ScenarioStep::Reject {
            event, by, case, ..
        } => format!("step {n} (Reject `{event}` by {by}{})", on(case)),
        ScenarioStep::Advance(p) => format!("step {n} (Advance {p})"),
        ScenarioStep::Expect(e) => format!("step {n} (Expect{})", on(&e.case)),
    }
}

fn json_map(values: &BTreeMap<String, ron::Value>) -> JsonMap<String, Json> {
    values
        .iter()
        .map(|(k, v)| (k.clone(), ron_to_json(v)))
        .collect()
}

struct Driver<'a> {
    lib: &'a Library,
    /// The scenario's own case.
    main: &'a str,
    cases: BTreeMap<String, Case>,
    clock: DateTime<Utc>,
    /// (case id, event) fired by the engine itself since the last acting step.
    fired: Vec<(String, String)>,
    taken: &'a mut BTreeMap<String, BTreeSet<String>>,
    /// Each case's entries, when recording.
    histories: Option<&'a mut BTreeMap<String, Vec<core::Entry>>>,
}

impl Driver<'_> {
    fn step(&mut self, step: &ScenarioStep) -> Result<(), String> {
        match step {
            ScenarioStep::Fire {
                event,
                by,
                payload,
                case,
            } => {
                self.fired.clear();
                let id = self.target(case)?;
                let input = Input::Fire {
                    event: event.clone(),
                    agency: by.clone(),
                    payload: json_map(payload),
                };
                match core::apply(self.lib, self.case(&id)?, &input, self.clock) {
                    Ok(step) => self.commit(step),
                    Err(r) => Err(format!("rejected: {r}")),
                }
            }
            ScenarioStep::Reject {
                event,
                by,
                payload,
                reason,
                mentions,
                case,
            } => {
                self.fired.clear();
                let Some(code) = RejectCode::parse(reason) else {
                    let codes: Vec<&str> = RejectCode::ALL.iter().map(|c| c.as_str()).collect();
                    let hint = did_you_mean(reason, codes.iter().copied())
                        .unwrap_or_else(|| format!("codes: {}", codes.join(", ")));
                    return Err(format!(
                        "`reason: \"{reason}\"` is not a rejection code ({hint})"
                    ));
                };
                let id = self.target(case)?;
                let input = Input::Fire {
                    event: event.clone(),
                    agency: by.clone(),
                    payload: json_map(payload),
                };
                match core::apply(self.lib, self.case(&id)?, &input, self.clock) {
                    Ok(step) => Err(format!(
                        "was accepted (state `{}` → `{}`), expected a rejection `{reason}`",
                        step.entry.from, step.entry.to
                    )),
                    Err(r) if r.code != code => Err(format!(
                        "rejected with `{}`, expected `{reason}`: {}",
                        r.code, r.message
                    )),
                    Err(r) => match mentions {
                        Some(m) if !r.message.contains(m.as_str()) => Err(format!(
                            "rejected with `{reason}` as expected, but the message does not mention `{m}`: {}",
                            r.message
                        )),
                        _ => Ok(()),
                    },
                }
            }
            ScenarioStep::Advance(period) => {
                self.fired.clear();
                self.advance(period)
            }
            ScenarioStep::Expect(expect) => self.expect(expect),
        }
    }

    fn target(&self, target: &Target) -> Result<String, String> {
        match target {
            Target::Main => Ok(self.main.to_owned()),
            Target::Child(n) => {
                let children = self
                    .cases
                    .get(self.main)
                    .map(|c| c.children.as_slice())
                    .unwrap_or_default();
                children.get(*n).map(|c| c.id.clone()).ok_or_else(|| {
                    format!(
                        "the case has no child {n}: it has {} (counted from 0)",
                        children.len()
                    )
                })
            }
        }
    }

    fn case(&self, id: &str) -> Result<&Case, String> {
        self.cases
            .get(id)
            .ok_or_else(|| format!("case `{id}` was never started"))
    }

    /// Records an accepted step, starts its children and tells its parent when
    /// it settled.
    fn commit(&mut self, step: Step) -> Result<(), String> {
        let Step {
            case,
            entry,
            spawn,
            settled,
        } = step;
        if let Some(histories) = self.histories.as_deref_mut() {
            histories
                .entry(case.id.clone())
                .or_default()
                .push(entry.clone());
        }
        if let Some(wf) = self.lib.workflows.get(&case.workflow) {
            self.taken
                .entry(case.workflow.clone())
                .or_default()
                .extend(coverage::taken(&wf.def, &entry));
        }
        if entry.seq > 1 && matches!(entry.actor, Actor::Timer(_) | Actor::Engine) {
            let shown = match entry.payload.get(core::SPENT_KEY).and_then(|v| v.as_str()) {
                Some(why) => {
                    let code = why.split(':').next().unwrap_or(why);
                    format!("{} (no transition: {code})", entry.event)
                }
                None => entry.event.clone(),
            };
            self.fired.push((case.id.clone(), shown));
        }
        let id = case.id.clone();
        let parent = case.parent.clone();
        let starter = core::spawn_starter(&entry.actor).to_owned();
        // The case is stored before its children start: a child that settles
        // at once tells its parent as it is after this step.
        self.cases.insert(id.clone(), case);
        for request in &spawn {
            let child = {
                let parent_case = self.case(&id)?;
                core::start_child(self.lib, parent_case, request, &starter, self.clock)
                    .and_then(|child| core::admit_spawn(self.lib, &child, request).map(|()| child))
                    .map_err(|r| format!("child {} could not start: {r}", request.child_id))?
            };
            self.commit(child)?;
        }
        let Some(outcome) = settled else {
            return Ok(());
        };
        if let Some(parent_id) = parent {
            let Some(parent_case) = self.cases.get(&parent_id) else {
                return Err(format!(
                    "case `{id}` settled, but its parent `{parent_id}` is unknown"
                ));
            };
            let input = Input::ChildSettled {
                child_id: id.clone(),
                outcome: outcome.clone(),
            };
            match core::apply(self.lib, parent_case, &input, self.clock) {
                Ok(step) => self.commit(step)?,
                Err(r) if r.code == RejectCode::CaseClosed => {}
                Err(r) => {
                    return Err(format!(
                        "telling case `{parent_id}` that child `{id}` settled: rejected: {r}"
                    ));
                }
            }
        }
        // Its running children are told, and those whose state reacts move.
        let running: Vec<String> = core::running_children(self.case(&id)?)
            .map(str::to_owned)
            .collect();
        for child_id in running {
            let told = core::tell_child(self.lib, self.case(&child_id)?, &outcome, self.clock);
            match told {
                None => {}
                Some(Ok(step)) => self.commit(step)?,
                // As on a server: the parent's step stands, the child stays
                // as it was, and the refusal is shown among the events fired.
                Some(Err(r)) => self.fired.push((
                    child_id,
                    format!(
                        "{} (refused: {})",
                        core::PARENT_SETTLED_EVENT,
                        r.code.as_str()
                    ),
                )),
            }
        }
        Ok(())
    }

    /// The moment a length of time after the clock: working days as deadlines
    /// count them, days and hours exactly (24 h a day).
    fn after(
        &self,
        period: &Period,
        vars: &BTreeMap<String, Json>,
    ) -> Result<DateTime<Utc>, String> {
        let (unit, n) = core::period(period, vars)?;
        Ok(match unit {
            Unit::WorkingDays => match &self.lib.calendar {
                Some(cal) => cal
                    .add(self.clock, Unit::WorkingDays, n)
                    .map_err(|e| e.to_string())?,
                None => {
                    return Err(format!(
                        "{}; add it beside the workflows",
                        crate::calendar::CalendarError::NoCalendar
                    ));
                }
            },
            Unit::Days => TimeDelta::try_days(i64::from(n))
                .and_then(|d| self.clock.checked_add_signed(d))
                .ok_or("the target time is out of range")?,
            Unit::Hours => TimeDelta::try_hours(i64::from(n))
                .and_then(|d| self.clock.checked_add_signed(d))
                .ok_or("the target time is out of range")?,
        })
    }

    fn advance(&mut self, period: &Period) -> Result<(), String> {
        let vars = self
            .cases
            .get(self.main)
            .map(|c| c.vars.clone())
            .unwrap_or_default();
        let target = match period.anchor() {
            // A day on the calendar (`DayOf`, `LastDayOf`): to its end, as a deadline counts it.
            Some(anchor) => core::anchored_period(self.lib, self.clock, anchor)?,
            None => self.after(period, &vars)?,
        };
        for _ in 0..MAX_FIRINGS_PER_ADVANCE {
            let next = self
                .cases
                .iter()
                .flat_map(|(id, c)| c.timers.iter().map(move |t| (t.due, id, t)))
                .filter(|(due, _, _)| *due <= target)
                .min_by(|a, b| (a.0, a.1, &a.2.id).cmp(&(b.0, b.1, &b.2.id)))
                .map(|(due, id, t)| (due, id.clone(), t.id.clone(), t.event.clone()));
            let Some((due, case_id, timer_id, event)) = next else {
                self.clock = self.clock.max(target);
                return Ok(());
            };
            self.clock = self.clock.max(due);
            let input = Input::Timer {
                timer_id: timer_id.clone(),
            };
            let step =
                core::apply(self.lib, self.case(&case_id)?, &input, self.clock).map_err(|r| {
                    format!("timer `{timer_id}` ({event}) of case `{case_id}`: rejected: {r}")
                })?;
            self.commit(step)?;
        }
        Err(format!(
            "more than {MAX_FIRINGS_PER_ADVANCE} timers came due: does a deadline keep re-entering its state at once?"
        ))
    }

    fn expect(&self, expect: &Expect) -> Result<(), String> {
        let id = self.target(&expect.case)?;
        let case = self.case(&id)?;
        let mut problems = Vec::new();
        if let Some(state) = &expect.state
            && case.state != *state
        {
            problems.push(format!("state is `{}`, expected `{state}`", case.state));
        }
        if let Some(outcome) = &expect.outcome
            && case.outcome.as_ref() != Some(outcome)
        {
            problems.push(match &case.outcome {
                Some(o) => format!("outcome is `{o}`, expected `{outcome}`"),
                None => format!("the case has no outcome yet, expected `{outcome}`"),
            });
        }
        let dir = (!self.lib.directory.is_empty()).then_some(&self.lib.directory);
        let wf = self.lib.workflows.get(&case.workflow);
        for (name, ron) in &expect.variables {
            let Some(decl) = wf.and_then(|w| w.variable(name)) else {
                problems.push(format!(
                    "workflow `{}` has no variable `{name}`",
                    case.workflow
                ));
                continue;
            };
            let json = ron_to_json(ron);
            let expected = if json.is_null() {
                Json::Null
            } else {
                match value::check(&json, &decl.ty, dir) {
                    Ok(v) => v,
                    Err(e) => {
                        problems.push(format!("expected value of `{name}`: {e}"));
                        continue;
                    }
                }
            };
            let actual = case.vars.get(name).cloned().unwrap_or(Json::Null);
            if actual != expected {
                problems.push(format!(
                    "variable `{name}` is {actual}, expected {expected}"
                ));
            }
        }
        for (role, agency) in &expect.bindings {
            match case.bindings.get(role) {
                Some(a) if a == agency => {}
                Some(a) => problems.push(format!(
                    "role `{role}` is bound to `{a}`, expected `{agency}`"
                )),
                None => problems.push(format!("role `{role}` is not bound")),
            }
        }
        if let Some(n) = expect.children
            && case.children.len() != n
        {
            problems.push(format!(
                "the case has {}, expected {n}",
                count(case.children.len(), "child", "children")
            ));
        }
        if let Some(workflows) = &expect.child_workflows {
            let actual: Vec<&str> = case.children.iter().map(|c| c.workflow.as_str()).collect();
            if actual != *workflows {
                problems.push(format!(
                    "child workflows are [{}], expected [{}]",
                    actual.join(", "),
                    workflows.join(", ")
                ));
            }
        }
        if let Some(fired) = &expect.fired {
            let actual: Vec<&str> = self
                .fired
                .iter()
                .filter(|(c, _)| *c == id)
                .map(|(_, e)| e.as_str())
                .collect();
            if actual != *fired {
                problems.push(format!(
                    "the engine fired [{}], expected [{}]",
                    actual.join(", "),
                    fired.join(", ")
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testkit;

    const START: &str = r#"start: Start(
        at: "2020-09-21T09:00:00+08:00",
        by: "ent",
        bindings: {"tax": "tax"},
        variables: {"county": "k"},
    )"#;

    fn scenario(name: &str, workflow: &str, start: &str, steps: &str) -> String {
        format!("Scenario(name: \"{name}\", workflow: \"{workflow}\", {start}, steps: [{steps}])")
    }

    const TO_JOINT: &str = r#"
        Fire(event: "submit", by: "ent", payload: {"amount": 150}),
        Expect(Expect(state: "review")),
        Advance(Hours(24)),
        Expect(Expect(state: "review", fired: ["reminder:escalate"])),
        Advance(Hours(24)),
        Expect(Expect(
            state: "review",
            variables: {"level": "city", "amount": 150, "fee": "0.00"},
            bindings: {"county": "c", "city": "c"},
            fired: ["escalate"],
        )),
        Reject(event: "approve", by: "k", reason: "role-not-allowed", mentions: "county"),
        Fire(event: "approve", by: "c"),
    "#;

    fn run_docs(scenarios: &[(&'static str, String)]) -> TestRun {
        let texts: Vec<(String, String)> = scenarios
            .iter()
            .map(|(n, t)| ((*n).to_owned(), t.clone()))
            .collect();
        let mut docs: Vec<(&str, &str)> = testkit::standard_docs();
        docs.extend(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())));
        let sources = testkit::sources(&docs, Some(testkit::CALENDAR));
        assert!(
            sources.diagnostics.is_empty(),
            "scenario texts parse: {:?}",
            sources.diagnostics
        );
        let library = testkit::library_of(&sources);
        run(&sources, &library)
    }

    fn failure(run: &TestRun, i: usize) -> &str {
        run.scenarios[i].failure.as_deref().unwrap_or("")
    }

    #[test]
    fn a_scenario_runs_deadlines_and_a_countersign_on_virtual_time() {
        let steps = format!(
            r#"{TO_JOINT}
            Fire(event: "sign", by: "amr", payload: {{"comment": "同意"}}),
            Expect(Expect(state: "joint", fired: [])),
            Fire(event: "sign", by: "tax"),
            Expect(Expect(state: "approved", outcome: "approved"))"#
        );
        let run = run_docs(&[(
            "approve.ron",
            scenario("joint approval", "permit", START, &steps),
        )]);
        assert_eq!(run.scenarios[0].failure, None);
        assert!(run.passed());
        let permit = run
            .coverage
            .iter()
            .find(|c| c.workflow == "permit")
            .expect("coverage of permit");
        let covered: Vec<&str> = permit.covered.iter().map(String::as_str).collect();
        assert_eq!(
            covered,
            [
                "draft --submit--> review",
                "joint --sign--> approved",
                "review --approve--> joint",
                "review --escalate--> review",
                "review ⏱ escalate",
            ]
        );
        assert!(permit.missing().iter().any(|m| *m == "joint ⏱ timeout"));
        assert!(
            permit
                .missing()
                .iter()
                .any(|m| *m == "waiting --child-settled--> approved")
        );
        assert_eq!(
            permit.covered.len() + permit.missing().len(),
            permit.all.len()
        );
        let expected = 100.0 * 5.0 / permit.all.len() as f64;
        assert!((permit.percent() - expected).abs() < 1e-9);
        let vote = run.coverage.iter().find(|c| c.workflow == "vote");
        assert_eq!(vote.map(Coverage::percent), Some(0.0));
    }

    #[test]
    fn working_days_advance_on_the_calendar() {
        // Joint entered Wednesday 2020-09-23 09:00: the reminder is due at the
        // end of Thursday, the deadline at the end of Friday.
        let steps = format!(
            r#"{TO_JOINT}
            Advance(WorkingDays(1)),
            Expect(Expect(state: "joint", fired: ["reminder:timeout"])),
            Advance(WorkingDays(1)),
            Expect(Expect(state: "refused", outcome: "refused", fired: ["timeout"]))"#
        );
        let run = run_docs(&[("t.ron", scenario("timeout", "permit", START, &steps))]);
        assert_eq!(run.scenarios[0].failure, None);
        let permit = run.coverage.iter().find(|c| c.workflow == "permit");
        let covered = permit.map(|c| c.covered.clone()).unwrap_or_default();
        assert!(covered.contains("joint ⏱ timeout"));
        assert!(covered.contains("joint --timeout--> refused"));
    }

    /// [`START`] with two permits, which `route` spawns as children.
    fn start_with_two_permits() -> String {
        START.replace(
            r#"{"county": "k"}"#,
            r#"{"county": "k", "permits": ["P1", "P2"]}"#,
        )
    }

    #[test]
    fn children_start_settle_and_tell_their_parent() {
        let start = start_with_two_permits();
        let steps = r#"
            Fire(event: "submit", by: "ent", payload: {"amount": 1}),
            Fire(event: "route", by: "k"),
            Expect(Expect(state: "waiting", children: 2, child_workflows: ["child", "filing"],
                fired: ["child-settled"])),
            Expect(Expect(case: Child(1), state: "filed", outcome: "filed")),
            Expect(Expect(case: Child(0), state: "check", bindings: {"dept": "amr", "applicant": "k"},
                variables: {"permit": "P1"})),
            Reject(event: "issue", by: "tax", case: Child(0), reason: "role-not-allowed"),
            Fire(event: "issue", by: "amr", case: Child(0)),
            Expect(Expect(case: Child(0), outcome: "issued", fired: [])),
            Expect(Expect(state: "approved", outcome: "approved", fired: ["child-settled"])),
        "#;
        let run = run_docs(&[("c.ron", scenario("children", "permit", &start, steps))]);
        assert_eq!(run.scenarios[0].failure, None);
        let of = |w: &str| {
            run.coverage
                .iter()
                .find(|c| c.workflow == w)
                .map(|c| c.covered.clone())
                .unwrap_or_default()
        };
        assert!(of("permit").contains("waiting --child-settled--> approved"));
        assert!(of("child").contains("check --issue--> issued"));
    }

    /// Regression: a case withdrawn while its children ran left them
    /// running. Each is told its parent settled, and a child whose state
    /// reacts to that outcome moves; one whose guard does not hold stays.
    #[test]
    fn a_withdrawn_case_tells_its_running_children() {
        let start = start_with_two_permits();
        let steps = r#"
            Fire(event: "submit", by: "ent", payload: {"amount": 1}),
            Fire(event: "route", by: "k"),
            Expect(Expect(case: Child(0), state: "check")),
            Reject(event: "parent-settled", by: "amr", case: Child(0), reason: "role-not-allowed",
                mentions: "fired by the engine when the case's parent settles, never by an agency"),
            Fire(event: "withdraw", by: "ent"),
            Expect(Expect(state: "withdrawn", outcome: "withdrawn")),
            Expect(Expect(case: Child(0), state: "cancelled", outcome: "cancelled",
                fired: ["parent-settled"])),
        "#;
        let run = run_docs(&[("w.ron", scenario("withdrawn", "permit", &start, steps))]);
        assert_eq!(run.scenarios[0].failure, None);
        let child = run.coverage.iter().find(|c| c.workflow == "child");
        let covered = child.map(|c| c.covered.clone()).unwrap_or_default();
        assert!(
            covered.contains("check --parent-settled--> cancelled"),
            "{covered:?}"
        );
    }

    /// Regression: a child whose reaction to its parent settling was refused
    /// (an effect that failed) refused the parent's own step in `govflow
    /// test`, while a server took it: a child's workflow could keep its
    /// parent from being withdrawn. The parent's step stands, as on a
    /// server, and the child's refusal is shown among the events fired.
    #[test]
    fn a_child_refusing_its_parents_settling_does_not_hold_the_parent() {
        let parent = r#"Workflow(name: "top", title: "上级", roles: [Role(name: "clerk", binding: Starter)],
            start: "open", states: [
                State(name: "open", title: "办理", transitions: [
                    Transition(event: "split", to: "waiting", roles: ["clerk"],
                        spawn: Spawn(for_each: "[1]", workflow: "'fussy'", bindings: {"clerk": Starter})),
                ]),
                State(name: "waiting", title: "等待", children: AwaitChildren(wait: All, to: "done"),
                    transitions: [Transition(event: "refuse", to: "refused", roles: ["clerk"])]),
                State(name: "done", title: "完成", outcome: "done"),
                State(name: "refused", title: "不予", outcome: "refused"),
            ])"#;
        let child = r#"Workflow(name: "fussy", title: "下级", roles: [Role(name: "clerk", binding: Given)],
            variables: [Variable(name: "why", type: Enum(["withdrawn"]), title: "原因")],
            start: "working", states: [
                State(name: "working", title: "办理", transitions: [
                    Transition(event: "finish", to: "finished", roles: ["clerk"]),
                    Transition(event: "parent-settled", to: "finished", roles: [],
                        effects: [Set(var: "why", value: "payload.outcome")]),
                ]),
                State(name: "finished", title: "办结", outcome: "finished"),
            ])"#;
        let steps = r#"
            Fire(event: "split", by: "k"),
            Fire(event: "refuse", by: "k"),
            Expect(Expect(state: "refused", outcome: "refused")),
            Expect(Expect(case: Child(0), state: "working",
                fired: ["parent-settled (refused: effect-failed)"])),
        "#;
        let start = r#"start: Start(at: "2020-09-21T09:00:00+08:00", by: "k")"#;
        let run = run_docs(&[
            ("top.ron", parent.to_owned()),
            ("fussy.ron", child.to_owned()),
            ("s.ron", scenario("refused", "top", start, steps)),
        ]);
        assert_eq!(run.scenarios[0].failure, None);
    }

    #[test]
    fn failures_name_the_step_and_the_reason() {
        let guard = r#"
            Fire(event: "submit", by: "ent", payload: {"amount": 150}),
            Fire(event: "approve", by: "k"),
        "#;
        let wrong_code = r#"Reject(event: "submit", by: "k", reason: "guard-false")"#;
        let accepted = r#"Reject(event: "withdraw", by: "ent", reason: "wrong-state")"#;
        let not_a_code = r#"Reject(event: "withdraw", by: "ent", reason: "rong-state")"#;
        let mentions =
            r#"Reject(event: "submit", by: "k", reason: "role-not-allowed", mentions: "mayor")"#;
        let expect = r#"
            Expect(Expect(state: "review", outcome: "approved", variables: {"amount": 3, "colour": 1},
                bindings: {"county": "k2"}, children: 1, fired: ["escalate"])),
        "#;
        let no_child = r#"Fire(event: "issue", by: "amr", case: Child(0))"#;
        let run = run_docs(&[
            ("1.ron", scenario("guard", "permit", START, guard)),
            ("2.ron", scenario("code", "permit", START, wrong_code)),
            ("3.ron", scenario("accepted", "permit", START, accepted)),
            ("4.ron", scenario("not a code", "permit", START, not_a_code)),
            ("5.ron", scenario("mentions", "permit", START, mentions)),
            ("6.ron", scenario("expect", "permit", START, expect)),
            ("7.ron", scenario("no child", "permit", START, no_child)),
            ("8.ron", scenario("unknown", "permitt", START, "")),
            (
                "9.ron",
                scenario(
                    "bad start",
                    "permit",
                    &START.replace("\"k\"", "\"nowhere\""),
                    "",
                ),
            ),
        ]);
        assert!(!run.passed());
        assert!(
            failure(&run, 0).starts_with(
                "step 2 (Fire `approve` by k): rejected: guard-false: `approve` in state `review`"
            ),
            "{}",
            failure(&run, 0)
        );
        assert!(
            failure(&run, 1).starts_with(
                "step 1 (Reject `submit` by k): rejected with `role-not-allowed`, expected `guard-false`"
            ),
            "{}",
            failure(&run, 1)
        );
        assert_eq!(
            failure(&run, 2),
            "step 1 (Reject `withdraw` by ent): was accepted (state `draft` → `withdrawn`), expected a rejection `wrong-state`"
        );
        assert!(
            failure(&run, 3).contains("did you mean `wrong-state`?"),
            "{}",
            failure(&run, 3)
        );
        assert!(
            failure(&run, 4).contains("does not mention `mayor`"),
            "{}",
            failure(&run, 4)
        );
        let f = failure(&run, 5);
        for part in [
            "step 1 (Expect): state is `draft`, expected `review`",
            "the case has no outcome yet, expected `approved`",
            "variable `amount` is 0, expected 3",
            "workflow `permit` has no variable `colour`",
            "role `county` is bound to `k`, expected `k2`",
            "the case has 0 children, expected 1",
            "the engine fired [], expected [escalate]",
        ] {
            assert!(f.contains(part), "{part} in {f}");
        }
        assert_eq!(
            failure(&run, 6),
            "step 1 (Fire `issue` by amr on child 0): the case has no child 0: it has 0 (counted from 0)"
        );
        assert!(
            failure(&run, 7).starts_with("unknown workflow `permitt`"),
            "{}",
            failure(&run, 7)
        );
        assert!(failure(&run, 7).contains("did you mean `permit`?"));
        assert!(
            failure(&run, 8).starts_with("start (by ent): rejected: invalid-start"),
            "{}",
            failure(&run, 8)
        );
        assert_eq!(run.scenarios[7].workflow, "permitt");
        assert_eq!(run.scenarios[0].file, PathBuf::from("1.ron"));
    }

    #[test]
    fn a_rejected_expiry_is_shown_and_not_retried() {
        let start = r#"start: Start(
            at: "2020-09-21T09:00:00+08:00",
            by: "k",
            bindings: {"a": "k", "b": "k2", "c": "amr"},
            variables: {"strict": false},
        )"#;
        let steps = r#"
            Advance(Days(3)),
            Expect(Expect(state: "voting", fired: ["lapse (no transition: guard-false)"])),
            Advance(Days(3)),
            Expect(Expect(state: "voting", fired: [])),
            Fire(event: "agree", by: "k"),
            Fire(event: "disagree", by: "k2"),
            Expect(Expect(state: "voting")),
            Fire(event: "agree", by: "amr"),
            Expect(Expect(state: "passed", outcome: "passed")),
        "#;
        let run = run_docs(&[("v.ron", scenario("lenient", "vote", start, steps))]);
        assert_eq!(run.scenarios[0].failure, None);
        let vote = run.coverage.iter().find(|c| c.workflow == "vote");
        let missing: Vec<String> = vote
            .map(|c| c.missing().into_iter().cloned().collect())
            .unwrap_or_default();
        assert_eq!(
            missing,
            [
                "voting --disagree--> failed",
                "voting --lapse--> failed",
                "voting ⏱ lapse"
            ]
        );
    }

    /// Regression: `govflow test SCENARIO` without its workflow said only
    /// "no such workflow is loaded (loaded: )".
    #[test]
    fn an_unknown_workflow_says_to_pass_the_workflows_too() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let file = root.join("workflows/scenarios/baolian/county_resolves_in_time.ron");
        let sources = crate::lang::load::load(std::slice::from_ref(&file)).expect("loads");
        let library = crate::lang::validate::validate(&sources)
            .library
            .expect("validates");
        assert!(library.workflows.is_empty());
        let run = run(&sources, &library);
        let folder = root.join("workflows");
        assert_eq!(
            failure(&run, 0),
            format!(
                "unknown workflow `baolian_escalation`: no workflow is loaded; pass the workflow \
                 files or folder along with the scenario, e.g. `govflow test {}/` or \
                 `govflow test {} {}`",
                folder.display(),
                folder.join("baolian_escalation.ron").display(),
                file.display()
            )
        );

        // Other workflows loaded, but not this one: they are listed, and the same advice.
        let standard = testkit::library();
        assert_eq!(
            unknown_workflow(&standard, "baolian_escalation", None),
            "unknown workflow `baolian_escalation`: no such workflow is loaded (loaded: child, \
             filing, permit, race, vote); pass its file or folder too, e.g. `govflow test \
             WORKFLOWS/` or `govflow test WORKFLOWS/baolian_escalation.ron SCENARIO`"
        );
        // Regression: a scenario named after its workflow was offered as the
        // workflow's file; the one in the folder above is.
        let scratch = tempfile::tempdir().expect("tempdir");
        let scenarios = scratch.path().join("sc");
        std::fs::create_dir(&scenarios).expect("mkdir");
        let scenario = scenarios.join("vote.ron");
        std::fs::write(&scenario, "").expect("write");
        std::fs::write(scratch.path().join("vote.ron"), "").expect("write");
        assert!(
            unknown_workflow(&library, "vote", Some(&scenario)).ends_with(&format!(
                "e.g. `govflow test {}/` or `govflow test {} {}`",
                scratch.path().display(),
                scratch.path().join("vote.ron").display(),
                scenario.display()
            )),
            "{}",
            unknown_workflow(&library, "vote", Some(&scenario))
        );
        // A near miss is a misspelling, not a missing file.
        assert_eq!(
            unknown_workflow(&standard, "permitt", None),
            "unknown workflow `permitt`: no such workflow is loaded (did you mean `permit`?)"
        );
    }

    #[test]
    fn advancing_working_days_without_the_calendar_says_where_it_goes() {
        let texts = [(
            "w.ron",
            scenario("no calendar", "permit", START, "Advance(WorkingDays(1))"),
        )];
        let mut docs = testkit::standard_docs();
        docs.extend(texts.iter().map(|(n, t)| (*n, t.as_str())));
        let sources = testkit::sources(&docs, None);
        let run = run(&sources, &testkit::library_of(&sources));
        assert_eq!(
            failure(&run, 0),
            "step 1 (Advance 1 working day): working days need the working-day calendar, and \
             none is loaded (calendar/*.csv); add it beside the workflows"
        );
    }

    #[test]
    fn empty_coverage_is_complete() {
        let c = Coverage {
            workflow: "w".into(),
            covered: BTreeSet::new(),
            all: BTreeSet::new(),
        };
        assert_eq!(c.percent(), 100.0);
        assert!(c.missing().is_empty());
    }
}
