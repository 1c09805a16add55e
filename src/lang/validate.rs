//! Validation: every problem in a set of sources at once, each located, and —
//! when there is none — the compiled [`Library`] the engine runs.
//!
//! Checking and compiling are one pass, so an expression that validated is
//! exactly the program that runs: CEL is parsed here, once, never at run time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cel::Program;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::diag::{Diagnostic, Reporter, hint_for};
use super::expr::{self, Scope, Ty};
use super::load::{SourceFile, Sources};
use super::locate::DocPath;
use super::model::{
    Amount, Binding, Catalogue, Effect, Level, Period, Quorum, Spawn, Type, Variable, Workflow,
};
use super::value::{self, Directory, ron_to_json};
use crate::calendar::{AnchorDay, Calendar};

/// A workflow ready to run: its definition and every CEL program it uses.
#[derive(Debug)]
pub struct CompiledWorkflow {
    pub def: Workflow,
    /// SHA-256 of the source text: identifies exactly which rules a case ran under.
    pub digest: String,
    /// Programs keyed by their source text (the same text compiles to the same program).
    programs: HashMap<String, Arc<Program>>,
    state_index: HashMap<String, usize>,
    /// What its expressions read, so the engine converts nothing else.
    pub reads: Reads,
}

/// The names a workflow's expressions read: whole top-level names (`vars`)
/// and single fields of them (`vars.level`).
#[derive(Debug, Default, Clone)]
pub struct Reads {
    whole: BTreeSet<String>,
    /// root → the fields of it read.
    fields: BTreeMap<String, BTreeSet<String>>,
}

impl Reads {
    fn add(&mut self, uses: impl IntoIterator<Item = (String, Option<String>)>) {
        for (root, field) in uses {
            match field {
                Some(field) => {
                    self.fields.entry(root).or_default().insert(field);
                }
                None => {
                    self.whole.insert(root);
                }
            }
        }
    }

    /// Whether any expression reads `root` or a field of it.
    pub fn name(&self, root: &str) -> bool {
        self.whole.contains(root) || self.fields.contains_key(root)
    }

    /// Whether any expression may read `root.field`.
    pub fn field(&self, root: &str, field: &str) -> bool {
        self.whole.contains(root) || self.fields.get(root).is_some_and(|f| f.contains(field))
    }
}

impl CompiledWorkflow {
    /// The program compiled from `source` at load time.
    pub fn program(&self, source: &str) -> Option<&Arc<Program>> {
        self.programs.get(source)
    }

    pub fn state(&self, name: &str) -> Option<&super::model::State> {
        self.state_index.get(name).map(|&i| &self.def.states[i])
    }

    pub fn variable(&self, name: &str) -> Option<&super::model::Variable> {
        self.def.variables.iter().find(|v| v.name == name)
    }
}

/// A catalogue as data: rows by key, and the same as a CEL value.
#[derive(Debug)]
pub struct CatalogueTable {
    pub def: Catalogue,
    pub rows: BTreeMap<String, Json>,
    pub cel: cel::Value,
}

/// Everything validated and compiled: what the engine runs.
#[derive(Debug, Default)]
pub struct Library {
    /// The current version of each workflow, by name: what new cases start on.
    pub workflows: BTreeMap<String, Arc<CompiledWorkflow>>,
    /// Every version known, by digest: running cases stay on the one they started on.
    pub versions: BTreeMap<String, Arc<CompiledWorkflow>>,
    pub directory: Directory,
    pub catalogues: BTreeMap<String, Arc<CatalogueTable>>,
    pub calendar: Option<Calendar>,
}

impl Library {
    /// Every version known of the workflow `name`, the current one included.
    pub fn versions_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a CompiledWorkflow> {
        self.workflows
            .values()
            .chain(self.versions.values())
            .filter(move |w| w.def.name == name)
            .map(|w| &**w)
    }

    /// The version a case is pinned to, by its digest; the current one only
    /// for a case that names none. A version this library does not hold
    /// (one that no longer compiles, or one a newer govflow deployed) is
    /// none: a case on it must not run under other rules.
    pub fn pinned(&self, name: &str, digest: &str) -> Option<&Arc<CompiledWorkflow>> {
        if digest.is_empty() {
            return self.workflows.get(name);
        }
        self.versions.get(digest).filter(|w| w.def.name == name)
    }
}

/// The outcome of validating a set of sources.
pub struct Validated {
    pub diagnostics: Vec<Diagnostic>,
    /// Present when no diagnostic is an error.
    pub library: Option<Library>,
}

/// The longest workflow name.
const MAX_WORKFLOW_NAME: usize = 64;

/// Whether `name` may name a workflow: 1 to [`MAX_WORKFLOW_NAME`] ASCII
/// letters, digits, `_` or `-`, starting with a letter (so also a plain file
/// name, a key part and a resource-name segment).
pub fn is_workflow_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= MAX_WORKFLOW_NAME
}

/// Validates everything loaded and compiles it.
pub fn validate(sources: &Sources) -> Validated {
    validate_demoting(sources, &[])
}

/// Rules added since workflow versions may have been stored. Each catches
/// something that failed at run time anyway (a deadline refused every time,
/// a spawn or binding that could never be made) or that ran as read (a
/// repeated key's last value), so a stored version that breaks only these
/// still compiles: its running cases must go on moving, and its histories
/// replaying. A new deploy is held to them.
pub const LATER_RULES: [&str; 12] = [
    "reserved-event",
    "parent-settled",
    "spawn-cycle",
    "unset-binding",
    "separated-roles",
    "kept-expiry",
    "spawn-binding",
    "effect-binding",
    "deadline-payload",
    "deadline-too-long",
    "bad-constant",
    "repeated-key",
];

/// [`validate`] for a version already stored: [`LATER_RULES`] only warn.
pub fn validate_stored(sources: &Sources) -> Validated {
    validate_demoting(sources, &LATER_RULES)
}

fn validate_demoting(sources: &Sources, demoted: &[&str]) -> Validated {
    let mut diagnostics = sources.diagnostics.clone();
    let directory = check_agencies(sources, &mut diagnostics);
    let catalogues = check_catalogues(sources, directory.as_ref(), &mut diagnostics);
    let mut workflows = BTreeMap::new();
    let mut seen: HashMap<&str, &SourceFile> = HashMap::new();
    // By name, the first definition of each (a second is a duplicate-name error).
    let mut all_workflows: BTreeMap<&str, &Workflow> = BTreeMap::new();
    for (_, w) in sources.workflows() {
        all_workflows.entry(w.name.as_str()).or_insert(w);
    }
    // A calendar file that failed to load is already an error of its own.
    let calendar_missing =
        sources.calendar.is_none() && !sources.diagnostics.iter().any(|d| d.code == "calendar");
    // A directory file that failed to load is already an error of its own.
    let directory_missing =
        directory.is_none() && !sources.diagnostics.iter().any(Diagnostic::is_error);
    for (file, workflow) in sources.workflows() {
        let mut r = Reporter::new(&file.path, &file.map, &mut diagnostics);
        if let Some(first) = seen.insert(&workflow.name, file) {
            r.error(
                "duplicate-name",
                &DocPath::root().field("name"),
                format!(
                    "workflow `{}` is also defined in {}",
                    workflow.name,
                    first.path.display()
                ),
                None,
            );
            continue;
        }
        let checker = WorkflowChecker {
            w: workflow,
            directory: directory.as_ref(),
            catalogues: &catalogues,
            workflows: &all_workflows,
            programs: HashMap::new(),
            reads: Reads::default(),
            optional_payload: BTreeSet::new(),
        };
        let (programs, reads) = checker.check(&mut r);
        if calendar_missing {
            check_calendar_needed(file, workflow, &mut diagnostics);
        }
        if directory_missing {
            let path = DocPath::root().field("roles");
            let mut d = Diagnostic::at(
                &file.path,
                file.map.locate(&path),
                "missing-directory",
                format!(
                    "no agency directory (an `Agencies(` file such as agencies.ron) was loaded with workflow `{}`, so the agencies it names and the levels of its roles were not checked",
                    workflow.name
                ),
            )
            .with_hint(Some(
                "validate the whole workflows folder (`govflow validate workflows`), or put the directory beside this file: a server refuses a deploy naming an agency it does not know".to_owned(),
            ))
            .warning();
            d.path = path.to_string();
            diagnostics.push(d);
        }
        let state_index = workflow
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        workflows.insert(
            workflow.name.clone(),
            Arc::new(CompiledWorkflow {
                def: workflow.clone(),
                digest: hex::encode(Sha256::digest(file.text.as_bytes())),
                programs,
                state_index,
                reads,
            }),
        );
    }
    check_scenarios(
        sources,
        &all_workflows,
        directory.as_ref(),
        &mut diagnostics,
    );
    diagnostics.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
    diagnostics.dedup();
    for d in diagnostics.iter_mut().filter(|d| demoted.contains(&d.code)) {
        d.severity = super::diag::Severity::Warning;
    }
    // A mistake in a scenario is an error of `validate`, but the workflows
    // compile all the same: `govflow test` runs the other scenarios.
    // (By the name the file starts with, so that one that does not parse
    // counts too.)
    let scenario_files: BTreeSet<String> = sources
        .files
        .iter()
        .filter(|f| f.map.root_name() == Some("Scenario"))
        .map(|f| f.path.display().to_string())
        .collect();
    let library = (!diagnostics
        .iter()
        .any(|d| d.is_error() && !scenario_files.contains(&d.file)))
    .then(|| Library {
        versions: workflows
            .values()
            .map(|w| (w.digest.clone(), Arc::clone(w)))
            .collect(),
        workflows,
        directory: directory.unwrap_or_default(),
        catalogues: catalogues
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
        calendar: sources.calendar.as_ref().map(|(_, c)| c.clone()),
    });
    Validated {
        diagnostics,
        library,
    }
}

/// `n` and the noun for that many: "1 row", "3 rows".
pub fn count<N: std::fmt::Display + PartialEq + From<u8>>(n: N, one: &str, many: &str) -> String {
    let noun = if n == N::from(1) { one } else { many };
    format!("{n} {noun}")
}

/// Warns of each deadline that needs the working-day calendar when none is
/// loaded: one counted in working days (or reminding so many before), or one
/// postponed over holidays. Entering its state would be rejected at run time.
/// A warning rather than an error: the workflow is sound, and where it runs
/// (a server, a test folder) may well have the calendar this folder lacks.
fn check_calendar_needed(file: &SourceFile, w: &Workflow, out: &mut Vec<Diagnostic>) {
    for (i, state) in w.states.iter().enumerate() {
        let Some(deadline) = &state.deadline else {
            continue;
        };
        let dp = DocPath::root().field("states").index(i).field("deadline");
        let within = std::iter::once((dp.field("within"), &deadline.within, false));
        let reminders = (deadline.reminders.iter().enumerate())
            .map(|(j, p)| (dp.field("reminders").index(j), p, true));
        for (path, period, reminder) in within.chain(reminders) {
            let (path, message) = match period {
                Period::WorkingDays(_) if reminder => (
                    path,
                    format!(
                        "a reminder of state `{}` counts {period} before the deadline, and no working-day calendar is loaded",
                        state.name
                    ),
                ),
                Period::WorkingDays(_) => (
                    path,
                    format!(
                        "the deadline of state `{}` counts {period}, and no working-day calendar is loaded",
                        state.name
                    ),
                ),
                // An anchored reminder is an error of its own (`anchored-deadline`).
                Period::DayOf {
                    postpone_over_holidays: true,
                    ..
                }
                | Period::LastDayOf {
                    postpone_over_holidays: true,
                    ..
                } if !reminder => (
                    path.field("postpone_over_holidays"),
                    format!(
                        "the deadline of state `{}` is postponed over holidays, and no working-day calendar is loaded",
                        state.name
                    ),
                ),
                _ => continue,
            };
            let mut d = Diagnostic::at(&file.path, file.map.locate(&path), "missing-calendar", message)
                .with_hint(Some(format!(
                    "add the calendar file (calendar/*.csv) beside the workflows: without it, entering state `{}` is rejected",
                    state.name
                )))
                .warning();
            d.path = path.to_string();
            out.push(d);
        }
    }
}

fn check_agencies(sources: &Sources, out: &mut Vec<Diagnostic>) -> Option<Directory> {
    let (file, agencies) = sources.agencies()?;
    let mut r = Reporter::new(&file.path, &file.map, out);
    let list = DocPath::root().field("agencies");
    let mut ids = HashMap::new();
    for (i, a) in agencies.agencies.iter().enumerate() {
        if ids.insert(a.id.as_str(), i).is_some() {
            r.error(
                "duplicate-name",
                &list.index(i).field("id"),
                format!("agency `{}` is listed twice", a.id),
                None,
            );
        }
    }
    let directory = Directory::new(agencies);
    for (i, a) in agencies.agencies.iter().enumerate() {
        let Some(parent) = &a.parent else { continue };
        let path = list.index(i).field("parent");
        match directory.get(parent) {
            None => r.error(
                "unknown-agency",
                &path,
                format!("agency `{}` has unknown parent `{parent}`", a.id),
                super::diag::did_you_mean(parent, directory.ids()),
            ),
            Some(p) if p.level > a.level => r.error(
                "agency-level",
                &path,
                format!(
                    "agency `{}` ({}) cannot have `{parent}` ({}) as parent: a parent is at the same level or above",
                    a.id,
                    a.level.as_str(),
                    p.level.as_str()
                ),
                None,
            ),
            Some(_) => {
                // Walk up: a cycle would make every binding through it loop.
                let mut current = a.id.as_str();
                for _ in 0..=agencies.agencies.len() {
                    match directory.parent(current) {
                        Some(p) if p.id == a.id => {
                            r.error("agency-cycle", &path, format!("agency `{}` is its own ancestor", a.id), None);
                            break;
                        }
                        Some(p) => current = &p.id,
                        None => break,
                    }
                }
            }
        }
    }
    Some(directory)
}

fn check_catalogues(
    sources: &Sources,
    directory: Option<&Directory>,
    out: &mut Vec<Diagnostic>,
) -> BTreeMap<String, CatalogueTable> {
    let mut tables = BTreeMap::new();
    for (file, c) in sources.catalogues() {
        let mut r = Reporter::new(&file.path, &file.map, out);
        if tables.contains_key(&c.name) {
            r.error(
                "duplicate-name",
                &DocPath::root().field("name"),
                format!("catalogue `{}` is defined twice", c.name),
                None,
            );
            continue;
        }
        let cols = DocPath::root().field("columns");
        let mut names = BTreeSet::new();
        for (i, col) in c.columns.iter().enumerate() {
            check_enum_values(
                &mut r,
                &cols.index(i).field("type"),
                &col.ty,
                &format!("column `{}`", col.name),
            );
            if !names.insert(col.name.as_str()) {
                r.error(
                    "duplicate-name",
                    &cols.index(i).field("name"),
                    format!("column `{}` is declared twice", col.name),
                    None,
                );
            }
        }
        let mut rows = BTreeMap::new();
        let rows_path = DocPath::root().field("rows");
        for (i, row) in c.rows.iter().enumerate() {
            let path = rows_path.index(i);
            if row.len() != c.columns.len() {
                r.error(
                    "catalogue-row",
                    &path,
                    format!(
                        "row {} has {}, the catalogue has {}",
                        i + 1,
                        count(row.len(), "value", "values"),
                        count(c.columns.len(), "column", "columns")
                    ),
                    Some(format!(
                        "columns: {}",
                        c.columns
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                );
                continue;
            }
            let mut object = serde_json::Map::new();
            for (j, (cell, col)) in row.iter().zip(&c.columns).enumerate() {
                match value::check(&ron_to_json(cell), &col.ty, directory) {
                    Ok(v) => {
                        object.insert(col.name.clone(), v);
                    }
                    Err(e) => r.error(
                        "type-mismatch",
                        &path.index(j),
                        format!("column `{}`: {e}", col.name),
                        None,
                    ),
                }
            }
            let key = object
                .get(&c.columns[0].name)
                .map(|k| k.as_str().map_or_else(|| k.to_string(), str::to_owned));
            if let Some(key) = key
                && rows.insert(key.clone(), Json::Object(object)).is_some()
            {
                r.error(
                    "duplicate-name",
                    &path.index(0),
                    format!("key `{key}` appears in two rows"),
                    None,
                );
            }
        }
        if let Some(totals) = &c.totals {
            if totals.rows != c.rows.len() {
                r.error(
                    "catalogue-count",
                    &DocPath::root().field("totals").field("rows"),
                    format!(
                        "catalogue `{}` declares {}, found {}",
                        c.name,
                        count(totals.rows, "row", "rows"),
                        c.rows.len()
                    ),
                    None,
                );
            }
            for (i, by) in totals.by.iter().enumerate() {
                let by_path = DocPath::root().field("totals").field("by").index(i);
                let Some(col) = c.columns.iter().position(|col| col.name == by.column) else {
                    r.error(
                        "unknown-name",
                        &by_path.field("column"),
                        format!("catalogue `{}` has no column `{}`", c.name, by.column),
                        hint_for(
                            &by.column,
                            "columns",
                            c.columns.iter().map(|c| c.name.as_str()),
                        ),
                    );
                    continue;
                };
                let mut found: BTreeMap<String, usize> = BTreeMap::new();
                for row in c.rows.iter().filter(|row| row.len() == c.columns.len()) {
                    let cell = ron_to_json(&row[col]);
                    *found
                        .entry(
                            cell.as_str()
                                .map_or_else(|| cell.to_string(), str::to_owned),
                        )
                        .or_default() += 1;
                }
                let values: BTreeSet<&String> = by.counts.keys().chain(found.keys()).collect();
                for v in values {
                    let declared = by.counts.get(v).copied().unwrap_or(0);
                    let actual = found.get(v).copied().unwrap_or(0);
                    if declared != actual {
                        let at = if by.counts.contains_key(v) {
                            by_path.field("counts").key(v)
                        } else {
                            by_path.field("counts")
                        };
                        r.error(
                            "catalogue-count",
                            &at,
                            format!(
                                "catalogue `{}` declares {} with {} = `{v}`, found {actual}",
                                c.name,
                                count(declared, "row", "rows"),
                                by.column
                            ),
                            None,
                        );
                    }
                }
            }
        }
        let cel_rows: HashMap<String, cel::Value> = rows
            .iter()
            .map(|(k, v)| (k.clone(), row_to_cel(v, c)))
            .collect();
        tables.insert(
            c.name.clone(),
            CatalogueTable {
                def: Catalogue {
                    rows: Vec::new(),
                    ..c.clone()
                },
                rows,
                cel: cel::Value::from(cel_rows),
            },
        );
    }
    tables
}

fn row_to_cel(row: &Json, c: &Catalogue) -> cel::Value {
    let map: HashMap<String, cel::Value> = c
        .columns
        .iter()
        .map(|col| {
            (
                col.name.clone(),
                value::to_cel(row.get(&col.name).unwrap_or(&Json::Null), Some(&col.ty)),
            )
        })
        .collect();
    cel::Value::from(map)
}

/// The CEL type of an agency record in `agencies[...]`.
fn agency_ty() -> Ty {
    Ty::record(["id", "name", "level", "parent"].map(|k| (k.to_owned(), Ty::String)))
}

/// Where a binding is written, which decides whether it may be `Given`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BindingSite<'n> {
    /// A role's declaration: `Given` is supplied when the case starts.
    Role,
    /// A `Bind` effect of this role, made when its transition fires.
    Effect(&'n str),
    /// A spawn's binding of this role of the child, made when the engine starts it.
    Spawn(&'n str),
}

struct WorkflowChecker<'a> {
    w: &'a Workflow,
    directory: Option<&'a Directory>,
    catalogues: &'a BTreeMap<String, CatalogueTable>,
    /// Every workflow loaded, by name: the children a spawn may start.
    workflows: &'a BTreeMap<&'a str, &'a Workflow>,
    programs: HashMap<String, Arc<Program>>,
    reads: Reads,
    /// The optional payload fields of the transition being checked that no
    /// expression before has tested with `has()`: its guard runs first, so
    /// a field the guard tests is there when the effects read it.
    optional_payload: BTreeSet<String>,
}

impl WorkflowChecker<'_> {
    fn check(mut self, r: &mut Reporter) -> (HashMap<String, Arc<Program>>, Reads) {
        let root = DocPath::root();
        self.check_workflow_name(r);
        self.check_plain_names(r);
        self.check_catalogue_names(r);
        self.check_roles(r);
        self.check_variables(r);
        let states: Vec<&str> = self.w.states.iter().map(|s| s.name.as_str()).collect();
        self.check_state_ref(r, &root.field("start"), &self.w.start);
        let mut seen = BTreeSet::new();
        for (i, state) in self.w.states.iter().enumerate() {
            let sp = root.field("states").index(i);
            if !seen.insert(state.name.as_str()) {
                r.error(
                    "duplicate-name",
                    &sp.field("name"),
                    format!("state `{}` is declared twice", state.name),
                    None,
                );
            }
            self.check_state(r, i, &sp);
        }
        if !states.is_empty() {
            self.check_graph(r);
        }
        (self.programs, self.reads)
    }

    /// A workflow's name names files (`graph --draw` writes `{name}.svg`),
    /// store keys and resource names (`workflows/{name}/versions/{n}`): so
    /// no path, no separator, nothing a reader could take two ways.
    fn check_workflow_name(&self, r: &mut Reporter) {
        let name = &self.w.name;
        if !is_workflow_name(name) {
            r.error(
                "bad-name",
                &DocPath::root().field("name"),
                format!(
                    "workflow name `{}` must be 1 to {MAX_WORKFLOW_NAME} ASCII letters, digits, `_` or `-`, starting with a letter",
                    name.escape_debug()
                ),
                Some("it names files, store keys and resource names (`workflows/{name}`); put the Chinese name in `title`".into()),
            );
        }
    }

    /// The names of roles, variables, states and events go into store keys
    /// (whose parts a NUL separates), index entries and every message: none
    /// may be empty or hold a control character.
    fn check_plain_names(&self, r: &mut Reporter) {
        let root = DocPath::root();
        let bad = |name: &str| name.is_empty() || name.chars().any(char::is_control);
        // Paths are built only for names that are reported.
        let mut report = |what: &str, path: DocPath, name: &str| {
            r.error(
                "bad-name",
                &path,
                format!(
                    "{what} name `{}` is empty or holds a control character",
                    name.escape_debug()
                ),
                None,
            );
        };
        let roles = self.w.roles.iter().map(|r| r.name.as_str());
        let variables = self.w.variables.iter().map(|v| v.name.as_str());
        for (what, list, names) in [
            ("role", "roles", roles.collect::<Vec<_>>()),
            ("variable", "variables", variables.collect()),
        ] {
            for (i, name) in names.into_iter().enumerate() {
                if bad(name) {
                    report(what, root.field(list).index(i).field("name"), name);
                }
            }
        }
        for (i, state) in self.w.states.iter().enumerate() {
            let sp = || root.field("states").index(i);
            if bad(&state.name) {
                report("state", sp().field("name"), &state.name);
            }
            for (j, t) in state.transitions.iter().enumerate() {
                if bad(&t.event) {
                    report(
                        "event",
                        sp().field("transitions").index(j).field("event"),
                        &t.event,
                    );
                }
            }
        }
    }

    fn role_names(&self) -> impl Iterator<Item = &str> + Clone {
        self.w.roles.iter().map(|r| r.name.as_str())
    }

    fn has_role(&self, name: &str) -> bool {
        self.w.roles.iter().any(|r| r.name == name)
    }

    fn check_catalogue_names(&self, r: &mut Reporter) {
        for (i, name) in self.w.catalogues.iter().enumerate() {
            if !self.catalogues.contains_key(name) {
                r.error(
                    "unknown-catalogue",
                    &DocPath::root().field("catalogues").index(i),
                    format!("no catalogue `{name}` is loaded"),
                    hint_for(
                        name,
                        "catalogues",
                        self.catalogues.keys().map(String::as_str),
                    ),
                );
            }
        }
    }

    fn check_roles(&mut self, r: &mut Reporter) {
        let mut seen = BTreeSet::new();
        for (i, role) in self.w.roles.iter().enumerate() {
            let path = DocPath::root().field("roles").index(i);
            if !seen.insert(role.name.as_str()) {
                r.error(
                    "duplicate-name",
                    &path.field("name"),
                    format!("role `{}` is declared twice", role.name),
                    None,
                );
            }
            let scope = self.base_scope();
            self.check_binding(
                r,
                &path.field("binding"),
                &role.binding,
                &scope,
                BindingSite::Role,
            );
            for (j, other) in role.separate_from.iter().enumerate() {
                let at = path.field("separate_from").index(j);
                if *other == role.name {
                    r.error(
                        "unknown-role",
                        &at,
                        format!("role `{other}` cannot be kept separate from itself"),
                        Some("name the other roles its agency must not hold".into()),
                    );
                } else if !self.w.roles.iter().any(|o| o.name == *other) {
                    r.error(
                        "unknown-role",
                        &at,
                        format!("no role `{other}` to keep `{}` separate from", role.name),
                        hint_for(other, "roles", self.w.roles.iter().map(|o| o.name.as_str())),
                    );
                }
            }
            self.check_separation_possible(r, &path, role);
            if let Some(level) = role.level {
                self.check_bound_level(r, &path.field("binding"), &role.name, level, &role.binding);
            }
            // A derived binding must not lead back to itself.
            let mut current = &role.binding;
            for _ in 0..=self.w.roles.len() {
                let next = match current {
                    Binding::ParentOf(other) | Binding::AncestorOf { role: other, .. } => other,
                    _ => break,
                };
                if *next == role.name {
                    r.error(
                        "binding-cycle",
                        &path.field("binding"),
                        format!("role `{}` is derived from itself", role.name),
                        Some(
                            "derive it from a role bound at start, a variable or a fixed agency"
                                .into(),
                        ),
                    );
                    break;
                }
                match self.w.roles.iter().find(|r| r.name == *next) {
                    Some(other) => current = &other.binding,
                    None => break,
                }
            }
        }
    }

    /// A binding that can only give a role of `level` an agency of another
    /// level: a fixed agency of the directory, or an ancestor at another level.
    fn check_bound_level(
        &self,
        r: &mut Reporter,
        path: &DocPath,
        role: &str,
        level: Level,
        binding: &Binding,
    ) {
        let found = match binding {
            Binding::Fixed(agency) => self.directory.and_then(|d| d.get(agency)).map(|a| a.level),
            Binding::AncestorOf { level: at, .. } => Some(*at),
            _ => None,
        };
        if let Some(found) = found.filter(|f| *f != level) {
            r.error(
                "role-level",
                path,
                format!(
                    "role `{role}` is held only at the {} level, and this binds it to a {}-level agency: that would be refused every time",
                    level.as_str(),
                    found.as_str()
                ),
                Some(format!("bind a {}-level agency, or change the role's `level`", level.as_str())),
            );
        }
    }

    /// A role kept separate from another fixed to the same agency: no case
    /// could ever start.
    fn check_separation_possible(
        &self,
        r: &mut Reporter,
        path: &DocPath,
        role: &super::model::Role,
    ) {
        let Binding::Fixed(agency) = &role.binding else {
            return;
        };
        for (j, other) in role.separate_from.iter().enumerate() {
            if self.fixed_for_good(other) == Some(agency) {
                r.error(
                    "separated-roles",
                    &path.field("separate_from").index(j),
                    format!(
                        "roles `{}` and `{other}` are both fixed to `{agency}`, and `{}` is kept separate from `{other}`: every start would be refused",
                        role.name, role.name
                    ),
                    Some("fix one of them to another agency, or keep them no longer separate".into()),
                );
            }
        }
    }

    /// The agency a role is fixed to and never re-bound from.
    fn fixed_for_good(&self, role: &str) -> Option<&String> {
        let found = self.w.roles.iter().find(|o| o.name == role)?;
        let Binding::Fixed(agency) = &found.binding else {
            return None;
        };
        let rebound = self.w.states.iter().flat_map(|s| &s.transitions).any(|t| {
            t.effects
                .iter()
                .any(|e| matches!(e, Effect::Bind { role: bound, .. } if bound == role))
        });
        (!rebound).then_some(agency)
    }

    /// A `Bind` to a fixed agency that a role kept separate from the bound
    /// one is fixed to for good: the effect would fail every time.
    fn check_bind_separation(&self, r: &mut Reporter, path: &DocPath, bound: &str, to: &Binding) {
        let Binding::Fixed(agency) = to else {
            return;
        };
        let separated = self.w.roles.iter().filter_map(|role| {
            if role.name == bound {
                Some(
                    role.separate_from
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>(),
                )
            } else if role.separate_from.iter().any(|o| o == bound) {
                Some(vec![role.name.as_str()])
            } else {
                None
            }
        });
        for other in separated.flatten() {
            if self.fixed_for_good(other) == Some(agency) {
                r.error(
                    "separated-roles",
                    &path.field("to"),
                    format!(
                        "this gives `{agency}` role `{bound}`, which is kept separate from role `{other}`, fixed to `{agency}`: the step would be refused every time"
                    ),
                    Some("bind another agency, or keep the roles no longer separate".into()),
                );
                return;
            }
        }
    }

    fn check_binding(
        &mut self,
        r: &mut Reporter,
        path: &DocPath,
        binding: &Binding,
        scope: &Scope,
        site: BindingSite,
    ) {
        match binding {
            Binding::Given => {
                // Only a start gives agencies; a binding made later has no one to give one.
                let (code, message) = match site {
                    BindingSite::Role => return,
                    BindingSite::Effect(role) => (
                        "effect-binding",
                        format!(
                            "a `Bind` effect cannot bind role `{role}` as `Given`: a role is given only when the case starts, so the effect would fail every time its transition fires"
                        ),
                    ),
                    BindingSite::Spawn(role) => (
                        "spawn-binding",
                        format!(
                            "a spawn cannot bind role `{role}` as `Given`: no one gives it when the child starts"
                        ),
                    ),
                };
                r.error(
                    code,
                    path,
                    message,
                    Some("bind it to an agency: Starter, Fixed(\"agency id\"), Expr(\"roles.some_role\"), …".to_owned()),
                );
            }
            Binding::Starter => {}
            Binding::Fixed(id) => known_agency(r, path, self.directory, id),
            Binding::Variable(var) => match self.w.variables.iter().find(|v| v.name == *var) {
                None => self.unknown_variable(r, path, var, None),
                Some(v) if v.ty != Type::Agency => r.error(
                    "type-mismatch",
                    path,
                    format!(
                        "a role is bound from variable `{var}`, which is {} and not an agency",
                        value::type_name(&v.ty)
                    ),
                    Some(format!("declare `{var}` with `type: Agency`")),
                ),
                // A role's binding is made once, when the case starts, from
                // the variables it starts with: those given and defaulted.
                Some(v) if site == BindingSite::Role && !v.given && v.default.is_none() => r.error(
                    "unset-binding",
                    path,
                    format!(
                        "a role is bound from variable `{var}` when a case starts, but `{var}` is neither `given` nor has a `default`, so it is unset then and every start would be refused (a later `Set` of it does not bind the role)"
                    ),
                    Some(format!(
                        "declare `{var}` with `given: true`, or bind the role to an agency now (Starter, Fixed(\"…\")) and re-bind it when `{var}` is known with a `Bind(role: …, to: Variable(\"{var}\"))` effect"
                    )),
                ),
                Some(_) => {}
            },
            Binding::ParentOf(role) | Binding::AncestorOf { role, .. } => {
                if !self.has_role(role) {
                    r.error(
                        "unknown-role",
                        path,
                        format!("binding refers to unknown role `{role}`"),
                        hint_for(role, "roles", self.role_names()),
                    );
                }
            }
            Binding::Expr(source) => {
                self.compile_expr(r, path, source, scope, Some(&Ty::String));
            }
        }
    }

    /// A variable that this workflow, or the `child` a spawn starts, lacks.
    fn unknown_variable(
        &self,
        r: &mut Reporter,
        path: &DocPath,
        var: &str,
        child: Option<&Workflow>,
    ) {
        let message = match child {
            Some(child) => format!("workflow `{}` has no variable `{var}`", child.name),
            None => format!("unknown variable `{var}`"),
        };
        let declared = child.unwrap_or(self.w).variables.iter();
        r.error(
            "unknown-variable",
            path,
            message,
            hint_for(var, "variables", declared.map(|v| v.name.as_str())),
        );
    }

    fn check_variables(&self, r: &mut Reporter) {
        let mut seen = BTreeSet::new();
        for (i, v) in self.w.variables.iter().enumerate() {
            let path = DocPath::root().field("variables").index(i);
            if !seen.insert(v.name.as_str()) {
                r.error(
                    "duplicate-name",
                    &path.field("name"),
                    format!("variable `{}` is declared twice", v.name),
                    None,
                );
            }
            check_enum_values(
                r,
                &path.field("type"),
                &v.ty,
                &format!("variable `{}`", v.name),
            );
            if let Some(default) = &v.default
                && let Err(e) = value::check(&ron_to_json(default), &v.ty, self.directory)
            {
                r.error(
                    "type-mismatch",
                    &path.field("default"),
                    format!("default of `{}`: {e}", v.name),
                    None,
                );
            }
        }
    }

    fn check_state_ref(&self, r: &mut Reporter, path: &DocPath, name: &str) {
        if !self.w.states.iter().any(|s| s.name == name) {
            r.error(
                "unknown-state",
                path,
                format!("unknown state `{name}`"),
                hint_for(
                    name,
                    "states",
                    self.w.states.iter().map(|s| s.name.as_str()),
                ),
            );
        }
    }

    /// A day on the calendar (`DayOf`, `LastDayOf`) must exist in every span of
    /// its kind, and can only be a deadline's `within`: a reminder is a length
    /// of time before the deadline.
    fn check_anchor(&self, r: &mut Reporter, path: &DocPath, period: &Period, reminder: bool) {
        let Some(anchor) = period.anchor() else {
            return;
        };
        if reminder {
            r.error(
                "anchored-deadline",
                path,
                format!("a reminder is a length of time before the deadline, and `{period}` is a day on the calendar"),
                Some("remind with `WorkingDays(n)`, `Days(n)` or `Hours(n)` before the deadline".into()),
            );
        }
        if let AnchorDay::Nth(day) = anchor.day {
            let span = anchor.span.name();
            let shortest = anchor.span.shortest();
            if day == 0 {
                r.error(
                    "anchored-deadline",
                    &path.field("day"),
                    format!("there is no day 0 of a {span}: days are counted from 1"),
                    Some("the first day is `day: 1`".into()),
                );
            } else if day > shortest {
                r.error(
                    "anchored-deadline",
                    &path.field("day"),
                    format!("day {day} does not exist in every {span} (the shortest has {shortest} days)"),
                    Some(format!("for the last day of the {span} write `LastDayOf(of: …)`")),
                );
            }
        }
    }

    fn check_amount(&self, r: &mut Reporter, path: &DocPath, period: &Period) {
        // A century: past it a length is a slip of the keyboard, and far
        // enough past it the deadline would not fit a timestamp at all.
        let longest = match period {
            Period::Hours(_) => 876_600,
            Period::Days(_) => 36_525,
            _ => 25_000,
        };
        if let Some(Amount::Fixed(n)) = period.amount()
            && *n > longest
        {
            r.error(
                "deadline-too-long",
                path,
                format!("`{period}` is more than a hundred years"),
                Some(format!("at most {longest} of this unit")),
            );
        }
        if let Some(Amount::Variable(var)) = period.amount() {
            match self.w.variables.iter().find(|v| v.name == *var) {
                None => self.unknown_variable(r, path, var, None),
                Some(v) if v.ty != Type::Integer => r.error(
                    "type-mismatch",
                    path,
                    format!(
                        "a period is counted from `{var}`, which is {} and not an integer",
                        value::type_name(&v.ty)
                    ),
                    None,
                ),
                Some(_) => {}
            }
        }
    }

    fn check_state(&mut self, r: &mut Reporter, i: usize, sp: &DocPath) {
        let state = &self.w.states[i];
        if state.is_terminal() {
            for (what, present, field) in [
                ("transitions", !state.transitions.is_empty(), "transitions"),
                ("a deadline", state.deadline.is_some(), "deadline"),
                ("a countersign", state.countersign.is_some(), "countersign"),
                ("children to wait for", state.children.is_some(), "children"),
            ] {
                if present {
                    r.error(
                        "terminal-with-transitions",
                        &sp.field(field),
                        format!("terminal state `{}` (outcome `{}`) has {what}", state.name, state.outcome.as_deref().unwrap_or("")),
                        Some("a terminal state ends the case: remove its `outcome` or what leaves it".into()),
                    );
                }
            }
        }
        if state.countersign.is_some() && state.children.is_some() {
            r.error(
                "conflicting-kinds",
                &sp.field("children"),
                format!(
                    "state `{}` is both a countersign and a wait for children",
                    state.name
                ),
                Some("split it into two states".into()),
            );
        }
        let mut events: Vec<&str> = state.transitions.iter().map(|t| t.event.as_str()).collect();
        if let Some(cs) = &state.countersign {
            let cp = sp.field("countersign");
            let mut seen = BTreeSet::new();
            for (j, role) in cs.roles.iter().enumerate() {
                if !self.has_role(role) {
                    r.error(
                        "unknown-role",
                        &cp.field("roles").index(j),
                        format!("countersign role `{role}` is not declared by the workflow"),
                        hint_for(role, "roles", self.role_names()),
                    );
                }
                if !seen.insert(role.as_str()) {
                    r.error(
                        "duplicate-name",
                        &cp.field("roles").index(j),
                        format!("countersign role `{role}` is listed twice"),
                        None,
                    );
                }
            }
            if let Quorum::AtLeast(n) = cs.quorum {
                let roles = cs.roles.len();
                let message = if n == 0 {
                    Some("a quorum of 0 is no quorum: at least 1 countersign is needed".to_owned())
                } else if n as usize > roles {
                    Some(format!(
                        "quorum of {n} cannot be met by {}",
                        count(roles, "countersign role", "countersign roles")
                    ))
                } else {
                    None
                };
                if let Some(message) = message {
                    let hint = match roles {
                        0 => "list the roles that countersign in `roles`".to_owned(),
                        1 => "use `AtLeast(1)`, or `All`: there is one countersign role".to_owned(),
                        _ => format!("use a number from 1 to {roles}"),
                    };
                    r.error("quorum", &cp.field("quorum"), message, Some(hint));
                }
            }
            if cs.sign_event == cs.reject_event {
                r.error(
                    "duplicate-name",
                    &cp.field("reject_event"),
                    format!("sign and reject are both `{}`", cs.sign_event),
                    None,
                );
            }
            reserved_event(r, &cp.field("sign_event"), &cs.sign_event, false);
            reserved_event(r, &cp.field("reject_event"), &cs.reject_event, false);
            self.check_state_ref(r, &cp.field("approved"), &cs.approved);
            self.check_state_ref(r, &cp.field("rejected"), &cs.rejected);
            for (j, t) in state.transitions.iter().enumerate() {
                if t.event == cs.sign_event || t.event == cs.reject_event {
                    r.error(
                        "ambiguous-transition",
                        &sp.field("transitions").index(j).field("event"),
                        format!(
                            "event `{}` is already the countersign's own in state `{}`",
                            t.event, state.name
                        ),
                        None,
                    );
                }
            }
            events.push(&cs.sign_event);
            events.push(&cs.reject_event);
        }
        if let Some(children) = &state.children {
            self.check_state_ref(r, &sp.field("children").field("to"), &children.to);
        }
        for (j, t) in state.transitions.iter().enumerate() {
            reserved_event(
                r,
                &sp.field("transitions").index(j).field("event"),
                &t.event,
                true,
            );
        }
        if let Some(deadline) = &state.deadline {
            let dp = sp.field("deadline");
            if let Some(event) = &deadline.on_expiry {
                reserved_event(r, &dp.field("on_expiry"), event, false);
            }
            self.check_amount(r, &dp.field("within"), &deadline.within);
            self.check_anchor(r, &dp.field("within"), &deadline.within, false);
            // `Days(0)` and `WorkingDays(0)` are the end of the day the
            // state is entered (当场, 当日), not its moment.
            if matches!(&deadline.within, Period::Hours(Amount::Fixed(0))) {
                r.error(
                    "zero-deadline",
                    &dp.field("within"),
                    format!(
                        "a deadline of `{}` expires the moment state `{}` is entered",
                        deadline.within, state.name
                    ),
                    Some("give it a length; to move on at once, send the transition that enters this state to the next state directly".into()),
                );
            }
            for (j, reminder) in deadline.reminders.iter().enumerate() {
                let path = dp.field("reminders").index(j);
                self.check_amount(r, &path, reminder);
                self.check_anchor(r, &path, reminder, true);
                if deadline.reminders[..j].contains(reminder) {
                    r.warning(
                        "duplicate-reminder",
                        &path,
                        format!(
                            "the reminder `{reminder}` before the deadline of state `{}` is listed twice",
                            state.name
                        ),
                        Some("remove one: each listed reminder fires, so this one reminds twice at the same moment".into()),
                    );
                } else if reminder_never_fires(&deadline.within, reminder) {
                    r.warning(
                        "reminder-never-fires",
                        &path,
                        format!(
                            "the reminder `{reminder}` before the deadline of state `{}` can never fire: the deadline (`{}`) is never that far from the moment the state is entered",
                            state.name, deadline.within
                        ),
                        Some("a reminder must be shorter than its deadline: shorten it, or remove it".into()),
                    );
                }
            }
            match &deadline.on_expiry {
                None => r.error(
                    "deadline-without-expiry",
                    &dp,
                    format!("deadline of state `{}` fires no event on expiry", state.name),
                    Some("add `on_expiry: \"<event>\"` and a transition on that event".into()),
                ),
                Some(event) if !events.contains(&event.as_str()) => r.error(
                    "unknown-event",
                    &dp.field("on_expiry"),
                    format!("deadline of state `{}` fires `{event}`, but the state has no transition on it", state.name),
                    hint_for(event, "events of this state", events.iter().copied()),
                ),
                Some(_) => {}
            }
        }
        let expiry = state.deadline.as_ref().and_then(|d| d.on_expiry.as_deref());
        // A deadline fires its event with no payload: when every transition
        // on it requires a field, the deadline can never be taken.
        let on_expiry: Vec<(usize, &crate::lang::model::Transition)> = state
            .transitions
            .iter()
            .enumerate()
            .filter(|(_, t)| expiry == Some(t.event.as_str()))
            .collect();
        if !on_expiry.is_empty()
            && on_expiry
                .iter()
                .all(|(_, t)| t.payload.iter().any(|f| f.required))
        {
            for (j, t) in &on_expiry {
                if let Some((k, field)) = t.payload.iter().enumerate().find(|(_, f)| f.required) {
                    r.error(
                        "deadline-payload",
                        &sp.field("transitions").index(*j).field("payload").index(k),
                        format!(
                            "`{}` is the deadline's expiry event, which comes with no payload, but payload field `{}` is required: the deadline would be refused every time",
                            t.event, field.name
                        ),
                        Some("make the field `required: false` (test it with `has(payload.x)`), or give the event a transition without required fields".into()),
                    );
                }
            }
        }
        let mut unguarded: HashMap<&str, usize> = HashMap::new();
        for (j, t) in state.transitions.iter().enumerate() {
            let tp = sp.field("transitions").index(j);
            self.check_state_ref(r, &tp.field("to"), &t.to);
            for (k, role) in t.roles.iter().enumerate() {
                if !self.has_role(role) {
                    r.error(
                        "unknown-role",
                        &tp.field("roles").index(k),
                        format!("unknown role `{role}`"),
                        hint_for(role, "roles", self.role_names()),
                    );
                }
            }
            if t.keep_deadline && t.to == state.name && expiry == Some(t.event.as_str()) {
                r.error(
                    "kept-expiry",
                    &tp.field("keep_deadline"),
                    format!(
                        "`{}` is the expiry of state `{}`'s deadline, and keeping that deadline keeps the timer that has just fired: it would fire again at once, in a loop",
                        t.event, state.name
                    ),
                    Some("leave out `keep_deadline` (the deadline starts again), or record the lateness in a state of its own".into()),
                );
            }
            if t.keep_deadline && t.to != state.name {
                r.error(
                    "keep-deadline",
                    &tp.field("keep_deadline"),
                    format!("`keep_deadline` keeps the deadline of state `{}`, but this transition leaves it for `{}`", state.name, t.to),
                    Some("only a transition back to its own state can keep the deadline".into()),
                );
            }
            let on_parent_settled = t.event == super::model::PARENT_SETTLED_EVENT;
            if on_parent_settled {
                check_parent_settled(r, &tp, t);
            }
            if t.roles.is_empty() && expiry != Some(t.event.as_str()) && !on_parent_settled {
                r.error(
                    "unfireable-transition",
                    &tp.field("event"),
                    format!(
                        "no role may fire `{}` and it is not the deadline's expiry event",
                        t.event
                    ),
                    Some("list the roles allowed to fire it in `roles`".into()),
                );
            }
            if t.guard.is_none()
                && let Some(first) = unguarded.insert(&t.event, j)
            {
                {
                    r.error(
                        "ambiguous-transition",
                        &tp.field("event"),
                        format!(
                            "state `{}` has two unguarded transitions on `{}` (to `{}` and to `{}`)",
                            state.name, t.event, state.transitions[first].to, t.to
                        ),
                        Some("give one of them a guard, or merge them".into()),
                    );
                }
            }
            let mut fields = BTreeSet::new();
            for (k, f) in t.payload.iter().enumerate() {
                check_enum_values(
                    r,
                    &tp.field("payload").index(k).field("type"),
                    &f.ty,
                    &format!("payload field `{}`", f.name),
                );
                if !fields.insert(f.name.as_str()) {
                    r.error(
                        "duplicate-name",
                        &tp.field("payload").index(k).field("name"),
                        format!("payload field `{}` is declared twice", f.name),
                        None,
                    );
                }
            }
            let scope = self.transition_scope(t);
            self.optional_payload = t
                .payload
                .iter()
                .filter(|f| !f.required)
                .map(|f| f.name.clone())
                .collect();
            if let Some(guard) = &t.guard {
                self.compile_expr(r, &tp.field("guard"), guard, &scope, Some(&Ty::Bool));
            }
            for (k, effect) in t.effects.iter().enumerate() {
                let ep = tp.field("effects").index(k);
                match effect {
                    Effect::Set { var, value } => {
                        match self.w.variables.iter().find(|v| v.name == *var).cloned() {
                            None => self.unknown_variable(r, &ep.field("var"), var, None),
                            Some(v) => {
                                self.check_assignment(r, &ep.field("value"), value, &scope, &v)
                            }
                        }
                    }
                    Effect::Bind { role, to } => {
                        if !self.has_role(role) {
                            r.error(
                                "unknown-role",
                                &ep.field("role"),
                                format!("unknown role `{role}`"),
                                hint_for(role, "roles", self.role_names()),
                            );
                        }
                        self.check_binding(
                            r,
                            &ep.field("to"),
                            to,
                            &scope,
                            BindingSite::Effect(role),
                        );
                        self.check_bind_separation(r, &ep, role, to);
                        if let Some(level) = self
                            .w
                            .roles
                            .iter()
                            .find(|o| o.name == *role)
                            .and_then(|o| o.level)
                        {
                            self.check_bound_level(r, &ep.field("to"), role, level, to);
                        }
                    }
                }
            }
            if let Some(spawn) = &t.spawn {
                let spp = tp.field("spawn");
                let list = self.compile_expr(
                    r,
                    &spp.field("for_each"),
                    &spawn.for_each,
                    &scope,
                    Some(&Ty::List(Box::new(Ty::Dyn))),
                );
                let item = match list {
                    Some(Ty::List(elem)) => *elem,
                    _ => Ty::Dyn,
                };
                let item_scope = scope.clone().with("item", item);
                self.compile_expr(
                    r,
                    &spp.field("workflow"),
                    &spawn.workflow,
                    &item_scope,
                    Some(&Ty::String),
                );
                let child = string_literal(&spawn.workflow).and_then(|name| {
                    let child = self.workflows.get(name.as_str()).copied();
                    if child.is_none() {
                        r.error(
                            "unknown-workflow",
                            &spp.field("workflow"),
                            format!("no workflow `{name}` is loaded"),
                            hint_for(&name, "workflows", self.workflows.keys().copied()),
                        );
                    }
                    child
                });
                // A loop an agency drives (handing a case down a level at a
                // time) ends when it stops; one that deadlines drive does not.
                if let Some(child) = child
                    && t.roles.is_empty()
                    && let Some(cycle) = spawn_cycle(child, &self.w.name, self.workflows)
                {
                    r.error(
                        "spawn-cycle",
                        &spp.field("workflow"),
                        if child.name == self.w.name {
                            format!(
                                "this spawn, on a step no agency takes (a deadline's, or the engine's), starts a case of `{}` itself, which will spawn again: each case starts more, without end",
                                child.name
                            )
                        } else {
                            format!(
                                "this spawn, on a step no agency takes (a deadline's, or the engine's), starts a case of `{}`, and such spawns go round to `{}` again ({}): each case of the loop starts another, without end",
                                child.name,
                                self.w.name,
                                cycle.join(" → ")
                            )
                        },
                        Some("end the loop: let an agency's step spawn (a `roles:` list), or spawn a workflow whose deadlines do not spawn this one back".to_owned()),
                    );
                }
                self.check_spawn(r, &spp, spawn, child, &item_scope);
            }
            self.optional_payload.clear();
        }
    }

    /// A spawn's variables and bindings, against the `child` workflow it
    /// starts when that is known (a literal name): what the child's start
    /// would refuse, every time the transition fires, is an error here.
    fn check_spawn(
        &mut self,
        r: &mut Reporter,
        spp: &DocPath,
        spawn: &Spawn,
        child: Option<&Workflow>,
        item_scope: &Scope,
    ) {
        for (name, source) in &spawn.variables {
            let path = spp.field("variables").key(name);
            let declared = child.map(|c| c.variables.iter().find(|v| v.name == *name));
            match declared {
                Some(Some(var)) => {
                    if !var.given {
                        r.error(
                            "spawn-binding",
                            &path,
                            format!(
                                "variable `{name}` of workflow `{}` is kept by that workflow, so a spawn cannot set it",
                                child.map_or("", |c| c.name.as_str())
                            ),
                            Some(format!(
                                "declare it `given: true` in `{}` if its starter supplies it",
                                child.map_or("", |c| c.name.as_str())
                            )),
                        );
                    }
                    self.check_assignment(r, &path, source, item_scope, var)
                }
                Some(None) => {
                    self.unknown_variable(r, &path, name, child);
                    self.compile_expr(r, &path, source, item_scope, None);
                }
                None => {
                    self.compile_expr(r, &path, source, item_scope, None);
                }
            }
        }
        for (name, binding) in &spawn.bindings {
            let path = spp.field("bindings").key(name);
            if let Some(child) = child {
                match child.roles.iter().find(|role| role.name == *name) {
                    None => r.error(
                        "unknown-role",
                        &path,
                        format!("workflow `{}` has no role `{name}`", child.name),
                        hint_for(name, "roles", child.roles.iter().map(|r| r.name.as_str())),
                    ),
                    Some(role) if role.binding != Binding::Given => r.error(
                        "spawn-binding",
                        &path,
                        format!(
                            "role `{name}` of workflow `{}` is bound by that workflow, so a spawn cannot bind it",
                            child.name
                        ),
                        Some(format!("remove `{name}` from the spawn's bindings")),
                    ),
                    Some(_) => {}
                }
            }
            self.check_binding(r, &path, binding, item_scope, BindingSite::Spawn(name));
        }
        for role in child.iter().flat_map(|c| &c.roles) {
            if role.binding == Binding::Given && !spawn.bindings.contains_key(&role.name) {
                r.error(
                    "spawn-binding",
                    &spp.field("bindings"),
                    format!(
                        "workflow `{}` needs role `{}` given when it starts, and this spawn does not bind it",
                        child.map_or("", |c| c.name.as_str()),
                        role.name
                    ),
                    Some(format!(
                        "add `\"{}\": …` (Starter, Fixed(\"agency id\"), …) to the spawn's bindings",
                        role.name
                    )),
                );
            }
        }
    }

    /// A CEL value assigned to a variable (a `Set` effect, a child's
    /// variable in a spawn): of the variable's type, and one of its values
    /// when it is an enumeration and the value a literal.
    fn check_assignment(
        &mut self,
        r: &mut Reporter,
        path: &DocPath,
        source: &str,
        scope: &Scope,
        var: &Variable,
    ) {
        self.compile_expr(r, path, source, scope, Some(&Ty::of(&var.ty)));
        // A quoted constant is checked as the engine will check the value:
        // an enum's member, an agency of the directory, a real date.
        let checked = matches!(var.ty, Type::Enum(_) | Type::Agency | Type::Date);
        if checked
            && let Some(literal) = string_literal(source)
            && let Err(problem) =
                value::check(&Json::String(literal.clone()), &var.ty, self.directory)
        {
            // An enum's member has always been checked; agencies and dates
            // are checked since, under a rule stored versions only warn of.
            let (code, hint) = match &var.ty {
                Type::Enum(allowed) => (
                    "type-mismatch",
                    super::diag::did_you_mean(&literal, allowed.iter().map(String::as_str)),
                ),
                _ => ("bad-constant", None),
            };
            r.error(code, path, problem, hint);
        }
    }

    /// Compiles an expression, reporting its problems inside the RON string.
    fn compile_expr(
        &mut self,
        r: &mut Reporter,
        path: &DocPath,
        source: &str,
        scope: &Scope,
        want: Option<&Ty>,
    ) -> Option<Ty> {
        match expr::compile(source, scope) {
            Ok(compiled) => {
                if let Some(want) = want
                    && !want.accepts(&compiled.ty)
                {
                    r.error(
                        "type-mismatch",
                        path,
                        format!("expression yields {} where {want} is needed", compiled.ty),
                        None,
                    );
                }
                for (_, field) in compiled.untested.iter().filter(|(root, field)| {
                    root == "payload" && self.optional_payload.contains(field)
                }) {
                    r.warning(
                        "optional-payload",
                        path,
                        format!(
                            "the optional payload field `{field}` is read without `has(payload.{field})`: whenever it is left out, this expression fails and the step is refused"
                        ),
                        Some(format!(
                            "test it first, e.g. `has(payload.{field}) ? payload.{field} : …`, or make the field required"
                        )),
                    );
                }
                for (_, field) in compiled.tested.iter().filter(|(root, _)| root == "payload") {
                    self.optional_payload.remove(field);
                }
                self.programs.insert(source.to_owned(), compiled.program);
                self.reads.add(compiled.uses);
                Some(compiled.ty)
            }
            Err(issues) => {
                for issue in issues {
                    let at = r.map().locate_in_string(path, issue.line, issue.col);
                    r.push_at(at, issue.code, path, issue.message, issue.hint);
                }
                None
            }
        }
    }

    fn base_scope(&self) -> Scope {
        let vars = Ty::record(
            self.w
                .variables
                .iter()
                .map(|v| (v.name.clone(), Ty::of(&v.ty))),
        );
        let catalogues = Ty::record(self.w.catalogues.iter().map(|name| {
            let row = match self.catalogues.get(name) {
                Some(t) => Ty::record(
                    t.def
                        .columns
                        .iter()
                        .map(|c| (c.name.clone(), Ty::of(&c.ty))),
                ),
                None => Ty::Dyn,
            };
            (name.clone(), Ty::Map(Box::new(row)))
        }));
        Scope::default()
            .with("vars", vars)
            .with(
                "roles",
                Ty::record(self.role_names().map(|r| (r.to_owned(), Ty::String))),
            )
            .with("catalogues", catalogues)
            .with("agencies", Ty::Map(Box::new(agency_ty())))
            .with("now", Ty::Timestamp)
            .with(
                "actor",
                Ty::record([
                    ("agency".to_owned(), Ty::String),
                    ("level".to_owned(), Ty::String),
                    ("roles".to_owned(), Ty::List(Box::new(Ty::String))),
                ]),
            )
    }

    fn transition_scope(&self, t: &super::model::Transition) -> Scope {
        let mut fields: Vec<(String, Ty)> = t
            .payload
            .iter()
            .map(|f| (f.name.clone(), Ty::of(&f.ty)))
            .collect();
        // The parent's outcome, given whether declared or not.
        if t.event == super::model::PARENT_SETTLED_EVENT
            && !fields
                .iter()
                .any(|(name, _)| name == super::model::PARENT_OUTCOME_FIELD)
        {
            let outcome = super::model::parent_outcome_field();
            fields.push((outcome.name, Ty::of(&outcome.ty)));
        }
        self.base_scope().with("payload", Ty::record(fields))
    }

    fn check_graph(&self, r: &mut Reporter) {
        let mut graph: DiGraph<usize, ()> = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..self.w.states.len())
            .map(|i| graph.add_node(i))
            .collect();
        let mut index: HashMap<&str, NodeIndex> = HashMap::new();
        for (s, n) in self.w.states.iter().zip(&nodes) {
            index.entry(s.name.as_str()).or_insert(*n);
        }
        for (i, state) in self.w.states.iter().enumerate() {
            let targets = state
                .transitions
                .iter()
                .map(|t| t.to.as_str())
                .chain(
                    state
                        .countersign
                        .iter()
                        .flat_map(|c| [c.approved.as_str(), c.rejected.as_str()]),
                )
                .chain(state.children.iter().map(|c| c.to.as_str()));
            for target in targets {
                if let Some(&to) = index.get(target) {
                    graph.add_edge(nodes[i], to, ());
                }
            }
        }
        let Some(&start) = index.get(self.w.start.as_str()) else {
            return;
        };
        // An edge to an unknown state is already reported; reachability
        // through a broken graph would only echo it.
        if self
            .w
            .states
            .iter()
            .flat_map(|s| s.transitions.iter().map(|t| t.to.as_str()))
            .any(|to| !index.contains_key(to))
        {
            return;
        }
        let mut reachable = vec![false; nodes.len()];
        let mut dfs = Dfs::new(&graph, start);
        while let Some(n) = dfs.next(&graph) {
            reachable[graph[n]] = true;
        }
        let terminals: Vec<NodeIndex> = nodes
            .iter()
            .copied()
            .filter(|n| self.w.states[graph[*n]].is_terminal())
            .collect();
        if terminals.is_empty() {
            r.error(
                "no-terminal-reachable",
                &DocPath::root().field("states"),
                format!("workflow `{}` has no terminal state", self.w.name),
                Some("give at least one state an `outcome`".into()),
            );
            return;
        }
        let mut finishes = vec![false; nodes.len()];
        let reversed = Reversed(&graph);
        for &t in &terminals {
            let mut dfs = Dfs::new(reversed, t);
            while let Some(n) = dfs.next(reversed) {
                finishes[graph[n]] = true;
            }
        }
        for (i, state) in self.w.states.iter().enumerate() {
            let path = DocPath::root().field("states").index(i).field("name");
            if index.get(state.name.as_str()) != Some(&nodes[i]) {
                continue; // a duplicate, reported as such
            }
            if !reachable[i] {
                r.error(
                    "unreachable-state",
                    &path,
                    format!(
                        "state `{}` cannot be reached from the start state `{}`",
                        state.name, self.w.start
                    ),
                    Some("add a transition into it, or remove it".into()),
                );
            }
            if !finishes[i] {
                r.error(
                    "no-terminal-reachable",
                    &path,
                    format!("no terminal state can be reached from state `{}`: a case there could never end", state.name),
                    Some("add a transition that leads towards a state with an `outcome`".into()),
                );
            }
        }
    }
}

/// Whether a reminder `before` the deadline of `within` comes, wherever the
/// state is entered, at or before the moment it is entered: the engine sets
/// only reminders still to come, so such a reminder never fires. Only fixed
/// lengths whose units compare whatever the calendar: hours with hours, hours
/// with calendar days, which end at midnight (n days from a moment are
/// between 24n hours, entered at midnight, and 24(n+1) hours away, and n
/// days before that end leave the end of the day entered), and working days
/// with working days (the n-th working day back from the n-th after the day
/// entered is at the latest that day, so one more is before it). A zero
/// length is an error of its own (`zero-deadline`), not echoed here.
fn reminder_never_fires(within: &Period, before: &Period) -> bool {
    use Amount::Fixed;
    let hours = |n: &u32| u64::from(*n);
    match (within, before) {
        (_, _) if within.amount() == Some(&Fixed(0)) => false,
        (Period::Hours(Fixed(n)), Period::Hours(Fixed(m))) => m >= n,
        (Period::Hours(Fixed(n)), Period::Days(Fixed(m))) => 24 * hours(m) >= hours(n),
        (Period::Days(Fixed(n)), Period::Hours(Fixed(m))) => hours(m) >= 24 * (hours(n) + 1),
        (Period::Days(Fixed(n)), Period::Days(Fixed(m)))
        | (Period::WorkingDays(Fixed(n)), Period::WorkingDays(Fixed(m))) => m > n,
        _ => false,
    }
}

/// Warns of an enumeration no value can ever be set to (`Enum([])`), and of
/// a value listed twice in one, wherever a type is declared (`path`, for
/// `what`: "variable `level`"). Warnings, not errors: a duplicate changes
/// nothing at run time (a value is one of the list or not), and stored
/// versions that have one must still compile for their running cases and
/// the audit's replay.
fn check_enum_values(r: &mut Reporter, path: &DocPath, ty: &Type, what: &str) {
    match ty {
        Type::List(inner) => check_enum_values(r, &path.index(0), inner, what),
        Type::Enum(values) if values.is_empty() => r.warning(
            "enum-values",
            path,
            format!("the enumeration of {what} has no values, so no value can ever be set"),
            Some("list the values it may take: `Enum([\"a\", \"b\"])`".into()),
        ),
        Type::Enum(values) => {
            for (i, value) in values.iter().enumerate() {
                if values[..i].contains(value) {
                    r.warning(
                        "enum-values",
                        &path.index(0).index(i),
                        format!("value `{value}` is listed twice in the enumeration of {what}"),
                        Some(format!("remove the second `{value}`")),
                    );
                }
            }
        }
        _ => {}
    }
}

/// The text of a CEL string literal (`'city'` or `"city"`), if `source` is just one.
/// An agency id written in a file must be in the directory, when one is loaded.
fn known_agency(r: &mut Reporter, path: &DocPath, directory: Option<&Directory>, id: &str) {
    if let Some(dir) = directory
        && !dir.contains(id)
    {
        r.error(
            "unknown-agency",
            path,
            format!("no agency `{id}` in the directory"),
            super::diag::did_you_mean(id, dir.ids()),
        );
    }
}

/// Checks the names a scenario uses against its workflow and the directory,
/// so that a misspelt event, state, role, variable or agency is told at its
/// place by `govflow validate`, not by `govflow test` as a failure of some
/// step. Steps on a child case are not checked (its workflow may be chosen
/// at run time), nor the event of a `Reject` expecting `unknown-event`.
/// Scenarios whose workflow is not loaded are left to `govflow test`, which
/// says how to pass it.
fn check_scenarios(
    sources: &Sources,
    workflows: &BTreeMap<&str, &Workflow>,
    directory: Option<&Directory>,
    out: &mut Vec<Diagnostic>,
) {
    use crate::scenario::model::{Step, Target};
    for (file, scenario) in sources.scenarios() {
        let mut r = Reporter::new(&file.path, &file.map, out);
        let Some(w) = workflows.get(scenario.workflow.as_str()) else {
            if !workflows.is_empty() {
                r.error(
                    "unknown-workflow",
                    &DocPath::root().field("workflow"),
                    format!("no workflow `{}` is loaded", scenario.workflow),
                    hint_for(&scenario.workflow, "workflows", workflows.keys().copied()),
                );
            }
            continue;
        };
        let mut events: BTreeSet<&str> = w
            .states
            .iter()
            .flat_map(|s| s.transitions.iter().map(|t| t.event.as_str()))
            .collect();
        for cs in w.states.iter().filter_map(|s| s.countersign.as_ref()) {
            events.insert(&cs.sign_event);
            events.insert(&cs.reject_event);
        }
        let agency =
            |r: &mut Reporter, path: &DocPath, id: &str| known_agency(r, path, directory, id);
        let start = DocPath::root().field("start");
        agency(&mut r, &start.field("by"), &scenario.start.by);
        for (role, id) in &scenario.start.bindings {
            let path = start.field("bindings").key(role);
            if !w.roles.iter().any(|x| x.name == *role) {
                r.error(
                    "unknown-role",
                    &path,
                    format!("workflow `{}` has no role `{role}`", w.name),
                    hint_for(role, "roles", w.roles.iter().map(|x| x.name.as_str())),
                );
            }
            agency(&mut r, &path, id);
        }
        let variable = |r: &mut Reporter, path: &DocPath, name: &str| {
            if !w.variables.iter().any(|v| v.name == *name) {
                r.error(
                    "unknown-variable",
                    path,
                    format!("workflow `{}` has no variable `{name}`", w.name),
                    hint_for(
                        name,
                        "variables",
                        w.variables.iter().map(|v| v.name.as_str()),
                    ),
                );
            }
        };
        for name in scenario.start.variables.keys() {
            variable(&mut r, &start.field("variables").key(name), name);
        }
        for (i, step) in scenario.steps.iter().enumerate() {
            let sp = DocPath::root().field("steps").index(i);
            let (event, by, case, unknown_expected) = match step {
                Step::Fire {
                    event, by, case, ..
                } => (event, by, case, false),
                Step::Reject {
                    event,
                    by,
                    case,
                    reason,
                    ..
                } => (event, by, case, reason == "unknown-event"),
                Step::Expect(expect) => {
                    if expect.case != Target::Main {
                        continue;
                    }
                    if let Some(state) = &expect.state
                        && !w.states.iter().any(|s| s.name == *state)
                    {
                        r.error(
                            "unknown-state",
                            &sp.field("state"),
                            format!("workflow `{}` has no state `{state}`", w.name),
                            hint_for(state, "states", w.states.iter().map(|s| s.name.as_str())),
                        );
                    }
                    for name in expect.variables.keys() {
                        variable(&mut r, &sp.field("variables").key(name), name);
                    }
                    continue;
                }
                Step::Advance(_) => continue,
            };
            agency(&mut r, &sp.field("by"), by);
            if *case == Target::Main && !unknown_expected && !events.contains(event.as_str()) {
                r.error(
                    "unknown-event",
                    &sp.field("event"),
                    format!("workflow `{}` has no event `{event}`", w.name),
                    hint_for(event, "events", events.iter().copied()),
                );
            }
        }
    }
}

/// An event named as the engine names its own steps: `child-settled` and
/// `reminder:…` only the engine records, and `parent-settled` only the
/// engine fires (a transition on it is allowed where `on_transition`, and
/// checked apart). A countersign or a deadline firing one would put steps in
/// histories that an auditor reads as the engine's.
fn reserved_event(r: &mut Reporter, path: &DocPath, event: &str, on_transition: bool) {
    use super::model::{CHILD_SETTLED_EVENT, PARENT_SETTLED_EVENT, REMINDER_PREFIX};
    let reserved = event == CHILD_SETTLED_EVENT
        || event.starts_with(REMINDER_PREFIX)
        || (event == PARENT_SETTLED_EVENT && !on_transition);
    if reserved {
        r.error(
            "reserved-event",
            path,
            format!(
                "`{event}` names the engine's own steps (`child-settled`, `parent-settled`, `reminder:…`): an event of this workflow cannot be called that"
            ),
            Some("give the event a name of its own".to_owned()),
        );
    }
}

/// A transition on [`super::model::PARENT_SETTLED_EVENT`]: the engine takes
/// it, with the parent's outcome as its only payload field.
fn check_parent_settled(r: &mut Reporter, tp: &DocPath, t: &super::model::Transition) {
    use super::model::{PARENT_OUTCOME_FIELD, PARENT_SETTLED_EVENT};
    if !t.roles.is_empty() {
        r.error(
            "parent-settled",
            &tp.field("roles"),
            format!(
                "`{PARENT_SETTLED_EVENT}` is taken by the engine when the case's parent settles: no role fires it"
            ),
            Some("write `roles: []`".into()),
        );
    }
    for (k, f) in t.payload.iter().enumerate() {
        if f.name != PARENT_OUTCOME_FIELD || f.ty != super::model::Type::String {
            r.error(
                "parent-settled",
                &tp.field("payload").index(k),
                if f.name == PARENT_OUTCOME_FIELD {
                    format!(
                        "`{PARENT_OUTCOME_FIELD}` of `{PARENT_SETTLED_EVENT}` is the parent's outcome, a String, not {}",
                        super::value::type_name(&f.ty)
                    )
                } else {
                    format!(
                        "`{PARENT_SETTLED_EVENT}` carries one payload field, `{PARENT_OUTCOME_FIELD}` (String, the parent's outcome): `{}` would never be given",
                        f.name
                    )
                },
                Some(format!(
                    "leave `payload` out: `payload.{PARENT_OUTCOME_FIELD}` is there without it"
                )),
            );
        }
    }
}

/// The workflows `w` spawns by name (a literal `workflow:`) on transitions
/// no agency fires: those its deadlines fire, which run by themselves.
fn automatic_spawns(w: &Workflow) -> impl Iterator<Item = String> + '_ {
    w.states
        .iter()
        .flat_map(|s| &s.transitions)
        .filter(|t| t.roles.is_empty())
        .filter_map(|t| t.spawn.as_ref())
        .filter_map(|spawn| string_literal(&spawn.workflow))
}

/// The chain of spawns no agency fires from `parent` through `child` back
/// to `parent`, if there is one (`[parent, child, …, parent]`).
fn spawn_cycle(
    child: &Workflow,
    parent: &str,
    workflows: &BTreeMap<&str, &Workflow>,
) -> Option<Vec<String>> {
    // Breadth first from the child, remembering how each was reached.
    let mut reached: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([child.name.clone()]);
    reached.insert(child.name.clone(), parent.to_owned());
    while let Some(name) = queue.pop_front() {
        if name == parent {
            let mut chain = vec![parent.to_owned()];
            let mut at = reached.get(parent).cloned();
            while let Some(step) = at {
                chain.push(step.clone());
                if step == parent || chain.len() > reached.len() + 1 {
                    break;
                }
                at = reached.get(&step).cloned();
            }
            chain.reverse();
            return Some(chain);
        }
        let Some(w) = workflows.get(name.as_str()) else {
            continue;
        };
        for next in automatic_spawns(w) {
            if !reached.contains_key(&next) {
                reached.insert(next.clone(), name.clone());
                queue.push_back(next);
            }
        }
    }
    None
}

fn string_literal(source: &str) -> Option<String> {
    let s = source.trim();
    let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let inner = s.strip_prefix(quote)?.strip_suffix(quote)?;
    (!inner.contains(quote) && !inner.contains('\\')).then(|| inner.to_owned())
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration, TimeZone, Utc};

    use super::*;
    use crate::calendar::Unit;

    /// Whether a reminder `before` a deadline `within`, entered at `now`,
    /// is set, counted as the engine counts it (`engine::core::set_timers`).
    fn fires(calendar: &Calendar, within: &Period, before: &Period, now: DateTime<Utc>) -> bool {
        let unit_count = |p: &Period| match p {
            Period::WorkingDays(Amount::Fixed(n)) => (Unit::WorkingDays, *n),
            Period::Days(Amount::Fixed(n)) => (Unit::Days, *n),
            Period::Hours(Amount::Fixed(n)) => (Unit::Hours, *n),
            other => panic!("not a fixed length: {other}"),
        };
        let (unit, n) = unit_count(within);
        let due = calendar.add(now, unit, n).expect("in the calendar's years");
        let (unit, m) = unit_count(before);
        calendar
            .subtract(due, unit, m)
            .expect("in the calendar's years")
            > now
    }

    /// `reminder_never_fires` says "never" exactly when no moment of entry
    /// sets the reminder, on the real calendar: every half hour (midnights
    /// included) of five weeks around the 2020 National Day holiday, with
    /// its weekends, holidays and make-up working days.
    #[test]
    fn a_reminder_is_said_never_to_fire_exactly_when_it_never_does() {
        let text = include_str!("../../workflows/calendar/cn_holidays.csv");
        let calendar = Calendar::parse("cn_holidays.csv", text).expect("calendar parses");
        let first = chrono::FixedOffset::east_opt(8 * 3600)
            .expect("offset")
            .with_ymd_and_hms(2020, 9, 14, 0, 0, 0)
            .single()
            .expect("a moment")
            .with_timezone(&Utc);
        let entries: Vec<DateTime<Utc>> = (0..5 * 7 * 48)
            .map(|i| first + Duration::minutes(30 * i))
            .collect();
        let lengths = |n: u32| {
            [
                Period::Hours(Amount::Fixed(n)),
                Period::Days(Amount::Fixed(n)),
                Period::WorkingDays(Amount::Fixed(n)),
            ]
        };
        for within in [1, 2, 5, 23, 24, 25, 48].into_iter().flat_map(lengths) {
            for before in [0, 1, 2, 4, 5, 6, 23, 24, 47, 48, 72, 73]
                .into_iter()
                .flat_map(lengths)
            {
                let said = reminder_never_fires(&within, &before);
                let never = !entries
                    .iter()
                    .any(|&now| fires(&calendar, &within, &before, now));
                let compared = !matches!(
                    (&within, &before),
                    (Period::WorkingDays(_), Period::Hours(_) | Period::Days(_))
                        | (Period::Hours(_) | Period::Days(_), Period::WorkingDays(_))
                );
                if compared {
                    assert_eq!(said, never, "`{before}` before `{within}`");
                } else {
                    assert!(!said, "`{before}` before `{within}` is not compared");
                }
            }
        }
    }

    /// Regression: a workflow whose deadline spawned cases of itself (or of
    /// a workflow whose deadline spawned it back) validated, and each case
    /// started more without end until the disk was full. Such a loop is
    /// refused; one an agency drives is not.
    #[test]
    fn spawns_that_deadlines_fire_may_not_loop() {
        let workflow = |name: &str, child: &str, roles: &str| {
            format!(
                r#"Workflow(name: "{name}", title: "派生", roles: [Role(name: "clerk", binding: Starter)], start: "open", states: [
                    State(name: "open", title: "受理", deadline: Deadline(within: Hours(1), on_expiry: "fork"), transitions: [
                        Transition(event: "fork", to: "waiting", roles: [{roles}], spawn: Spawn(for_each: "[1]", workflow: "'{child}'", bindings: {{"clerk": Fixed("k")}})),
                    ]),
                    State(name: "waiting", title: "等待", children: AwaitChildren(wait: All, to: "done")),
                    State(name: "done", title: "完成", outcome: "done"),
                ])"#
            )
        };
        let cycles = |texts: Vec<(String, String)>| {
            let mut all = vec![(
                "agencies.ron".to_owned(),
                "Agencies(agencies: [Agency(id: \"k\", name: \"县\", level: County)])".to_owned(),
            )];
            all.extend(texts);
            let sources = crate::lang::load::from_texts(
                all.into_iter().map(|(f, t)| (f.into(), t)).collect(),
                None,
            );
            validate(&sources)
                .diagnostics
                .into_iter()
                .filter(|d| d.code == "spawn-cycle")
                .map(|d| d.message)
                .collect::<Vec<_>>()
        };
        let both = cycles(vec![
            ("a.ron".into(), workflow("a", "b", "")),
            ("b.ron".into(), workflow("b", "a", "")),
        ]);
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(both[0].contains("(a → b → a)"), "{both:?}");
        // The same loop with an agency firing one of its spawns.
        let driven = cycles(vec![
            ("a.ron".into(), workflow("a", "b", "\"clerk\"")),
            ("b.ron".into(), workflow("b", "a", "")),
        ]);
        assert_eq!(driven, Vec::<String>::new());
    }

    /// A version stored before a rule was added still compiles (its cases
    /// must go on moving and replaying); a new deploy of it is refused.
    /// (`unset-binding` is one: versions stored before starts could set only
    /// `given` variables bound roles from variables their starts set.)
    #[test]
    fn a_stored_version_breaking_only_later_rules_still_compiles() {
        for (file, rule) in [
            ("deadline_payload.ron", "deadline-payload"),
            ("unset_binding.ron", "unset-binding"),
        ] {
            let source = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/data/invalid")
                    .join(file),
            )
            .expect("read");
            let agencies = "Agencies(agencies: [Agency(id: \"k\", name: \"县\", level: County)])";
            let sources = crate::lang::load::from_texts(
                vec![
                    ("agencies.ron".into(), agencies.to_owned()),
                    (file.into(), source),
                ],
                None,
            );
            let strict = validate(&sources);
            assert!(strict.library.is_none(), "{file}");
            assert!(
                strict
                    .diagnostics
                    .iter()
                    .any(|d| d.code == rule && d.is_error())
            );
            let stored = validate_stored(&sources);
            assert!(stored.library.is_some(), "{:?}", stored.diagnostics);
            assert!(
                stored
                    .diagnostics
                    .iter()
                    .any(|d| d.code == rule && !d.is_error())
            );
        }
    }
}
