//! The pure core: (compiled workflow, case, input, time) → accepted step or rejection.
//!
//! Nothing here reads a clock, touches a file or draws a random number, and no
//! hash-map order reaches a result: every map that is stored or compared is a
//! `BTreeMap`. [`start`] and [`apply`] are therefore deterministic, and replay
//! is the same functions run over a stored history ([`Entry::input`]).
//!
//! A rejection changes nothing: both functions take the case by reference and
//! return a new one only inside an accepted [`Step`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};

use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map as JsonMap, Value as Json};

use crate::calendar::Unit;
use crate::lang::diag::did_you_mean;
use crate::lang::model::{
    Amount, Binding, Countersign, Field, Period, Quorum, RejectRule, State, Transition, Type,
    WaitFor,
};
use crate::lang::validate::{CatalogueTable, CompiledWorkflow, Library};
use crate::lang::value::{self, Directory, ron_to_json};

/// The event name of the first entry of every case.
pub const START_EVENT: &str = "start";
use crate::lang::model::parent_outcome_field;
pub use crate::lang::model::{
    CHILD_SETTLED_EVENT, PARENT_OUTCOME_FIELD, PARENT_SETTLED_EVENT, REMINDER_PREFIX,
};
/// Payload key of the entry recording a deadline that came due when no
/// transition applied: the rejection that stopped it.
pub const SPENT_KEY: &str = "no_transition";

/// One running instance of a workflow, pinned to the version it started on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub id: String,
    pub workflow: String,
    /// [`CompiledWorkflow::digest`] of the version the case started on.
    pub digest: String,
    pub state: String,
    /// Set once the case reaches a terminal state; the case is then closed.
    pub outcome: Option<String>,
    /// Every declared variable, normalised by [`value::check`]; `null` when unset.
    pub vars: BTreeMap<String, Json>,
    /// Role → agency id.
    pub bindings: BTreeMap<String, String>,
    /// Number of accepted steps (the start is step 1).
    pub seq: u64,
    /// Signatures collected in the current countersign state, by role.
    pub signatures: BTreeMap<String, Signature>,
    pub children: Vec<ChildRef>,
    /// The id of the parent case, for a child case.
    pub parent: Option<String>,
    /// Timers of the current state (leaving a state cancels all of them).
    pub timers: Vec<Timer>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    pub agency: String,
    pub approved: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildRef {
    pub id: String,
    pub workflow: String,
    pub outcome: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    /// `"{seq}:expiry"` or `"{seq}:reminder:{i}"`, seq being the step that set it.
    pub id: String,
    pub kind: TimerKind,
    /// The deadline's expiry event (also for reminders).
    pub event: String,
    pub due: DateTime<Utc>,
    /// The state whose deadline set it.
    pub state: String,
    /// [`crate::calendar::Calendar::version`] of the calendar loaded when it was
    /// computed; empty when none was loaded.
    pub calendar_version: String,
}

/// Whether two sets of timers are the same deadlines, whichever calendar
/// version counted them: a calendar extended since (next year's holidays
/// appended, as every winter) counts the same deadlines under a new version,
/// and that is no difference in what the rules did.
pub fn same_deadlines(a: &[Timer], b: &[Timer]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (&x.id, x.kind, &x.event, x.due, &x.state) == (&y.id, y.kind, &y.event, y.due, &y.state)
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerKind {
    Expiry,
    Reminder,
}

/// Who caused a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Actor {
    Agency(String),
    /// A timer of the case, by id.
    Timer(String),
    /// The engine itself (a child settled; a case started by no agency).
    Engine,
}

/// What can happen to a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Input {
    Fire {
        event: String,
        agency: String,
        payload: JsonMap<String, Json>,
    },
    Timer {
        timer_id: String,
    },
    ChildSettled {
        child_id: String,
        outcome: String,
    },
    /// The case's parent settled with `outcome` (see [`tell_child`]).
    ParentSettled {
        outcome: String,
    },
}

/// An accepted input: the case after it, and what to record and do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The case after the step.
    pub case: Case,
    pub entry: Entry,
    /// Child cases to start (see [`start_child`]).
    pub spawn: Vec<SpawnRequest>,
    /// `Some(outcome)` when the case reached a terminal state in this step: the
    /// parent (if any) must be sent [`Input::ChildSettled`].
    pub settled: Option<String>,
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub actor: Actor,
    pub event: String,
    /// The normalised payload (start: `{"bindings": …, "variables": …}` as given;
    /// child settled: `{"child": id, "outcome": o}`; timers: `{}`).
    pub payload: Json,
    /// State before (empty for the start entry).
    pub from: String,
    /// State after (equal to `from` when the case stayed).
    pub to: String,
    pub vars_changed: BTreeMap<String, Json>,
    pub bindings_changed: BTreeMap<String, String>,
    pub timers_set: Vec<Timer>,
    /// Every timer removed from the case, including the one that fired.
    pub timers_cancelled: Vec<String>,
    /// Calendar version used for the timers set, when a calendar is loaded.
    pub calendar_version: Option<String>,
    /// Digest of the workflow version that computed the step.
    pub digest: String,
}

/// A child case to start: see [`start_child`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// `"{parent id}/{n}"`, n the index among all the parent's children.
    pub child_id: String,
    pub workflow: String,
    pub vars: BTreeMap<String, Json>,
    pub bindings: BTreeMap<String, String>,
}

/// Why an input was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

/// Machine-readable rejection reasons; [`RejectCode::as_str`] is their stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectCode {
    /// No state of the workflow knows the event.
    UnknownEvent,
    /// The event exists, but not in the current state (or the signer already signed).
    WrongState,
    /// The case has an outcome.
    CaseClosed,
    /// The agency holds none of the roles that may fire the event.
    RoleNotAllowed,
    /// No guard of the candidate transitions holds.
    GuardFalse,
    /// Missing, unknown or mistyped payload field.
    InvalidPayload,
    /// `start` was given unknown or mistyped variables or bindings.
    InvalidStart,
    /// The timer is not (or no longer) set on the case.
    UnknownTimer,
    /// A `Set`, `Bind` or `spawn` could not be computed.
    EffectFailed,
    /// A deadline could not be computed on the working-day calendar.
    Calendar,
    /// `ChildSettled` names a case that is not a child of this one.
    UnknownChild,
    /// The workflow is not in the library.
    UnknownWorkflow,
    /// A timer was fired before it is due.
    TimerNotDue,
    /// The case's workflow version is not one this library can run.
    VersionUnavailable,
}

impl RejectCode {
    pub const ALL: [RejectCode; 14] = [
        RejectCode::UnknownEvent,
        RejectCode::WrongState,
        RejectCode::CaseClosed,
        RejectCode::RoleNotAllowed,
        RejectCode::GuardFalse,
        RejectCode::InvalidPayload,
        RejectCode::InvalidStart,
        RejectCode::UnknownTimer,
        RejectCode::EffectFailed,
        RejectCode::Calendar,
        RejectCode::UnknownChild,
        RejectCode::UnknownWorkflow,
        RejectCode::TimerNotDue,
        RejectCode::VersionUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::UnknownEvent => "unknown-event",
            RejectCode::WrongState => "wrong-state",
            RejectCode::CaseClosed => "case-closed",
            RejectCode::RoleNotAllowed => "role-not-allowed",
            RejectCode::GuardFalse => "guard-false",
            RejectCode::InvalidPayload => "invalid-payload",
            RejectCode::InvalidStart => "invalid-start",
            RejectCode::UnknownTimer => "unknown-timer",
            RejectCode::EffectFailed => "effect-failed",
            RejectCode::Calendar => "calendar",
            RejectCode::UnknownChild => "unknown-child",
            RejectCode::UnknownWorkflow => "unknown-workflow",
            RejectCode::TimerNotDue => "timer-not-due",
            RejectCode::VersionUnavailable => "version-unavailable",
        }
    }

    /// The code named by [`RejectCode::as_str`].
    pub fn parse(name: &str) -> Option<RejectCode> {
        RejectCode::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) fn reject(code: RejectCode, message: impl Into<String>) -> Rejection {
    Rejection {
        code,
        message: message.into(),
    }
}

impl Entry {
    /// The input that produced this entry, for replay; `None` for the start
    /// entry (replay it with [`Entry::start_args`]).
    pub fn input(&self) -> Option<Input> {
        if self.seq <= 1 && self.event == START_EVENT {
            return None;
        }
        match &self.actor {
            Actor::Agency(agency) => Some(Input::Fire {
                event: self.event.clone(),
                agency: agency.clone(),
                payload: self.payload.as_object().cloned().unwrap_or_default(),
            }),
            Actor::Timer(id) => Some(Input::Timer {
                timer_id: id.clone(),
            }),
            Actor::Engine if self.event == PARENT_SETTLED_EVENT => Some(Input::ParentSettled {
                outcome: self.payload.get(PARENT_OUTCOME_FIELD)?.as_str()?.to_owned(),
            }),
            Actor::Engine => Some(Input::ChildSettled {
                child_id: self.payload.get("child")?.as_str()?.to_owned(),
                outcome: self.payload.get("outcome")?.as_str()?.to_owned(),
            }),
        }
    }

    /// For the start entry: the arguments [`start`] was called with.
    pub fn start_args(&self) -> Option<StartArgs> {
        if self.seq != 1 || self.event != START_EVENT {
            return None;
        }
        let starter = match &self.actor {
            Actor::Agency(a) => a.clone(),
            Actor::Engine => String::new(),
            Actor::Timer(_) => return None,
        };
        let bindings = self
            .payload
            .get("bindings")
            .and_then(Json::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let variables = self
            .payload
            .get("variables")
            .and_then(Json::as_object)
            .cloned()
            .unwrap_or_default();
        Some(StartArgs {
            starter,
            bindings,
            variables,
        })
    }
}

/// What a case was started with (see [`Entry::start_args`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartArgs {
    /// Empty when the engine started the case.
    pub starter: String,
    pub bindings: BTreeMap<String, String>,
    pub variables: JsonMap<String, Json>,
}

// ───────────────────────────── start ─────────────────────────────

/// Starts a case: binds its roles, checks and normalises its variables, and
/// enters the start state. The entry is seq 1, event `start`.
///
/// * `given` binds the roles declared `Given` (all of them are required); a
///   value for a role bound any other way is rejected.
/// * `starter` is the agency starting the case; an empty starter means the
///   engine (roles bound `Starter` then cannot be bound).
/// * A variable given as `null` counts as not given.
pub fn start(
    lib: &Library,
    workflow: &str,
    case_id: &str,
    starter: &str,
    given: &BTreeMap<String, String>,
    vars: &JsonMap<String, Json>,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    start_version(
        lib,
        compiled(lib, workflow)?,
        case_id,
        starter,
        given,
        vars,
        now,
    )
}

/// [`start`] on a given version of a workflow (replay uses the one a case
/// was pinned to, not the current one).
pub fn start_version(
    lib: &Library,
    wf: &Arc<CompiledWorkflow>,
    case_id: &str,
    starter: &str,
    given: &BTreeMap<String, String>,
    vars: &JsonMap<String, Json>,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let def = &wf.def;
    let workflow = def.name.as_str();
    let dir = directory(lib);
    let invalid = |m: String| reject(RejectCode::InvalidStart, m);
    if !starter.is_empty() && !known_agency(lib, starter) {
        return Err(invalid(format!(
            "the starter: {}",
            lib.directory.unknown(starter)
        )));
    }

    let mut case_vars = BTreeMap::new();
    for (name, v) in vars {
        let Some(decl) = wf.variable(name) else {
            let names = def.variables.iter().map(|v| v.name.as_str());
            return Err(invalid(format!(
                "unknown variable `{name}` for workflow `{workflow}`{}",
                hint(did_you_mean(name, names.clone()), names)
            )));
        };
        if v.is_null() {
            continue;
        }
        let normal = value::check(v, &decl.ty, dir)
            .map_err(|e| invalid(format!("variable `{name}`: {e}")))?;
        case_vars.insert(name.clone(), normal);
    }
    for decl in &def.variables {
        if case_vars.contains_key(&decl.name) {
            continue;
        }
        let v = match &decl.default {
            Some(d) => value::check(&ron_to_json(d), &decl.ty, dir)
                .map_err(|e| invalid(format!("default of variable `{}`: {e}", decl.name)))?,
            None => Json::Null,
        };
        case_vars.insert(decl.name.clone(), v);
    }

    for (role, agency) in given {
        let Some(r) = def.roles.iter().find(|r| r.name == *role) else {
            let names = def.roles.iter().map(|r| r.name.as_str());
            return Err(invalid(format!(
                "unknown role `{role}` for workflow `{workflow}`{}",
                hint(did_you_mean(role, names.clone()), names)
            )));
        };
        if r.binding != Binding::Given {
            return Err(invalid(format!(
                "role `{role}` is bound by the workflow ({}); it cannot be given",
                describe_binding(&r.binding)
            )));
        }
        if !known_agency(lib, agency) {
            return Err(invalid(format!(
                "role `{role}`: {}",
                lib.directory.unknown(agency)
            )));
        }
    }
    let mut bindings = BTreeMap::new();
    for r in &def.roles {
        if r.binding == Binding::Given {
            match given.get(&r.name) {
                Some(a) => {
                    bindings.insert(r.name.clone(), a.clone());
                }
                None => {
                    return Err(invalid(format!(
                        "role `{}`{} must be given an agency when the case starts",
                        r.name,
                        title(&r.title)
                    )));
                }
            }
        }
    }

    // Derived roles, in dependency order: repeat passes until none progresses.
    let slot = SharedSlot::new(lib, wf);
    let mut cel = Cel::new(lib, wf, &slot, now, &case_vars, &BTreeMap::new());
    let mut pending: Vec<&crate::lang::model::Role> = def
        .roles
        .iter()
        .filter(|r| r.binding != Binding::Given)
        .collect();
    while !pending.is_empty() {
        cel.set_roles(&bindings);
        let actor_roles = roles_held(wf, &bindings, starter);
        cel.set_actor(starter, &actor_roles);
        let mut waiting = Vec::new();
        let mut last_error = String::new();
        for r in pending.iter().copied() {
            match resolve_binding(
                lib, &mut cel, &r.binding, &case_vars, &bindings, starter, None,
            ) {
                Ok(id) => {
                    bindings.insert(r.name.clone(), id);
                }
                Err(BindError::Pending(e)) => {
                    last_error = format!("role `{}`: {e}", r.name);
                    waiting.push(r);
                }
                Err(BindError::Failed(e)) => {
                    return Err(invalid(format!("role `{}`: {e}", r.name)));
                }
            }
        }
        if waiting.len() == pending.len() {
            return Err(invalid(last_error));
        }
        pending = waiting;
    }

    if let Some(problem) = binding_problem(lib, wf, &bindings) {
        return Err(invalid(problem));
    }

    let mut case = Case {
        id: case_id.to_owned(),
        workflow: workflow.to_owned(),
        digest: wf.digest.clone(),
        state: String::new(),
        outcome: None,
        vars: case_vars,
        bindings,
        seq: 1,
        signatures: BTreeMap::new(),
        children: Vec::new(),
        parent: None,
        timers: Vec::new(),
        started_at: now,
        updated_at: now,
    };
    let mut fx = Effects::default();
    enter(lib, wf, &mut case, &def.start, now, 1, &mut fx)?;
    let given_json: JsonMap<String, Json> = given
        .iter()
        .map(|(k, v)| (k.clone(), Json::String(v.clone())))
        .collect();
    let mut payload = JsonMap::new();
    payload.insert("bindings".into(), Json::Object(given_json));
    payload.insert("variables".into(), Json::Object(vars.clone()));
    let entry = Entry {
        seq: 1,
        at: now,
        actor: if starter.is_empty() {
            Actor::Engine
        } else {
            Actor::Agency(starter.to_owned())
        },
        event: START_EVENT.to_owned(),
        payload: Json::Object(payload),
        from: String::new(),
        to: case.state.clone(),
        vars_changed: case.vars.clone(),
        bindings_changed: case.bindings.clone(),
        timers_set: fx.timers_set,
        timers_cancelled: Vec::new(),
        calendar_version: fx.calendar_version,
        digest: wf.digest.clone(),
    };
    Ok(Step {
        case,
        entry,
        spawn: Vec::new(),
        settled: fx.settled,
    })
}

/// What is wrong with `bindings`, at start or after a re-binding: two roles
/// kept separate held by one agency, or a role held by an agency it may not
/// have.
fn binding_problem(
    lib: &Library,
    wf: &CompiledWorkflow,
    bindings: &BTreeMap<String, String>,
) -> Option<String> {
    shared_duties(wf, bindings).or_else(|| misplaced(lib, wf, bindings))
}

/// The first pair of roles the workflow keeps separate (`separate_from`)
/// that `bindings` gives to one agency, described.
fn shared_duties(wf: &CompiledWorkflow, bindings: &BTreeMap<String, String>) -> Option<String> {
    wf.def.roles.iter().find_map(|role| {
        let agency = bindings.get(&role.name)?;
        let other = role
            .separate_from
            .iter()
            .find(|other| bindings.get(*other) == Some(agency))?;
        Some(format!(
            "`{agency}` would hold both role `{}` and role `{other}`, which workflow `{}` keeps separate",
            role.name, wf.def.name
        ))
    })
}

/// The first role bound to an agency it may not have, described: one of
/// another level than the role asks for (`level`), or an agency acting for
/// enterprises (`for_enterprises`) in a role not made for it (not fixed to
/// it, nor the starter's). Agencies outside the directory (there is none
/// loaded) are not judged.
fn misplaced(
    lib: &Library,
    wf: &CompiledWorkflow,
    bindings: &BTreeMap<String, String>,
) -> Option<String> {
    wf.def.roles.iter().find_map(|role| {
        let agency = bindings.get(&role.name)?;
        let found = lib.directory.get(agency)?;
        let made_for_it = match &role.binding {
            Binding::Fixed(fixed) => fixed == agency,
            Binding::Starter => true,
            _ => false,
        };
        if found.for_enterprises && !made_for_it {
            return Some(format!(
                "`{agency}` acts for enterprises and cannot hold role `{}` of workflow `{}`, which is a department's (it holds only the roles fixed to it)",
                role.name, wf.def.name
            ));
        }
        let wanted = role.level?;
        (found.level != wanted).then(|| {
            format!(
                "`{agency}` is a {}-level agency and role `{}` of workflow `{}` is held only at the {} level",
                found.level.as_str(),
                role.name,
                wf.def.name,
                wanted.as_str()
            )
        })
    })
}

/// What a start from outside the workflow (a department system, a
/// scenario) must also satisfy: it sets only variables the workflow
/// declares `given`, and its starter holds a role in the new case, since
/// otherwise any agency could put work in others' inboxes under a case it
/// could not even read. Kept out of [`start_version`], which replays also
/// run: histories recorded before these rules must still replay.
pub fn admit_start(
    lib: &Library,
    step: &Step,
    starter: &str,
    vars: &JsonMap<String, Json>,
) -> Result<(), Rejection> {
    let case = &step.case;
    given_only(lib, case, vars.keys())?;
    if !starter.is_empty() && !case.bindings.values().any(|a| a == starter) {
        return Err(reject(
            RejectCode::RoleNotAllowed,
            format!(
                "`{starter}` would hold no role in this `{}` case, so it may not start it: an agency starts only cases in which it holds a role (its bindings: {})",
                case.workflow,
                case.bindings
                    .iter()
                    .map(|(role, agency)| format!("{role} = {agency}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(())
}

/// What a spawn must also satisfy, as a start from outside does: it sets
/// only variables the child's workflow declares `given` (checked where a
/// spawn is made, not in [`start_child`], which replays also run).
pub fn admit_spawn(lib: &Library, child: &Step, request: &SpawnRequest) -> Result<(), Rejection> {
    given_only(lib, &child.case, request.vars.keys()).map_err(|r| {
        reject(
            RejectCode::EffectFailed,
            format!("child `{}` cannot start: {}", request.child_id, r.message),
        )
    })
}

/// Refuses a start that names a variable its workflow keeps (not `given`).
fn given_only<'n>(
    lib: &Library,
    case: &Case,
    names: impl Iterator<Item = &'n String>,
) -> Result<(), Rejection> {
    let wf = pinned(lib, case)?;
    let kept: Vec<&str> = names
        .filter(|name| wf.variable(name).is_some_and(|v| !v.given))
        .map(String::as_str)
        .collect();
    if !kept.is_empty() {
        let given: Vec<&str> = wf
            .def
            .variables
            .iter()
            .filter(|v| v.given)
            .map(|v| v.name.as_str())
            .collect();
        return Err(reject(
            RejectCode::InvalidStart,
            format!(
                "{} `{}` {} kept by workflow `{}` and cannot be given at start; a start may set only the variables declared `given: true` ({})",
                if kept.len() == 1 {
                    "variable"
                } else {
                    "variables"
                },
                kept.join("`, `"),
                if kept.len() == 1 { "is" } else { "are" },
                case.workflow,
                if given.is_empty() {
                    "none".to_owned()
                } else {
                    given.join(", ")
                }
            ),
        ));
    }
    Ok(())
}

/// Starts the child case a parent's step asked for, and links it to the
/// parent. `starter` is the agency that fired the parent's step (empty when a
/// timer or the engine did).
pub fn start_child(
    lib: &Library,
    parent: &Case,
    request: &SpawnRequest,
    starter: &str,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let vars: JsonMap<String, Json> = request
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut step = start(
        lib,
        &request.workflow,
        &request.child_id,
        starter,
        &request.bindings,
        &vars,
        now,
    )?;
    step.case.parent = Some(parent.id.clone());
    Ok(step)
}

/// The agency that starts the children spawned by a step of this actor.
pub fn spawn_starter(actor: &Actor) -> &str {
    match actor {
        Actor::Agency(a) => a,
        Actor::Timer(_) | Actor::Engine => "",
    }
}

// ───────────────────────────── apply ─────────────────────────────

/// Applies one input to a case. On `Err` the caller keeps the case unchanged.
///
/// The case is run under the library's workflow of the same name; its pinned
/// `digest` is not compared (pick the library of the right version), and each
/// entry records the digest that computed it.
pub fn apply(
    lib: &Library,
    case: &Case,
    input: &Input,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let wf = pinned(lib, case)?;
    if let Some(outcome) = &case.outcome {
        return Err(reject(
            RejectCode::CaseClosed,
            format!(
                "case `{}` is closed: it ended in state `{}` with outcome `{outcome}`",
                case.id, case.state
            ),
        ));
    }
    let state = current_state(wf, case)?;
    match input {
        Input::Fire {
            event,
            agency,
            payload,
        } => fire(lib, wf, case, state, event, agency, payload, now),
        Input::Timer { timer_id } => timer(lib, wf, case, state, timer_id, now),
        Input::ChildSettled { child_id, outcome } => {
            child_settled(lib, wf, case, state, child_id, outcome, now)
        }
        Input::ParentSettled { outcome } => parent_settled(lib, wf, case, state, outcome, now),
    }
}

/// The step a running child takes when its parent settles with
/// `parent_outcome`: `None` when it takes none (it is closed, or its state
/// has no transition on [`PARENT_SETTLED_EVENT`]: it goes on as it was).
pub fn tell_child(
    lib: &Library,
    child: &Case,
    parent_outcome: &str,
    now: DateTime<Utc>,
) -> Option<Result<Step, Rejection>> {
    if child.outcome.is_some() {
        return None;
    }
    let input = Input::ParentSettled {
        outcome: parent_outcome.to_owned(),
    };
    match apply(lib, child, &input, now) {
        // No transition on the event, or none whose guard holds for this
        // outcome: the child is not concerned.
        Err(r) if matches!(r.code, RejectCode::UnknownEvent | RejectCode::GuardFalse) => None,
        other => Some(other),
    }
}

/// The ids of the children of `case` that have not settled.
pub fn running_children(case: &Case) -> impl Iterator<Item = &str> {
    case.children
        .iter()
        .filter(|c| c.outcome.is_none())
        .map(|c| c.id.as_str())
}

/// [`Input::ParentSettled`]: the state's transitions on
/// [`PARENT_SETTLED_EVENT`], each taking the parent's outcome as its
/// `outcome` field whether or not it declares one (the entry records it, so
/// that replay gives it again).
fn parent_settled(
    lib: &Library,
    wf: &Arc<CompiledWorkflow>,
    case: &Case,
    state: &State,
    outcome: &str,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let candidates: Vec<Transition> = state
        .transitions
        .iter()
        .filter(|t| t.event == PARENT_SETTLED_EVENT)
        .map(|t| {
            let mut t = t.clone();
            if !t.payload.iter().any(|f| f.name == PARENT_OUTCOME_FIELD) {
                t.payload.push(parent_outcome_field());
            }
            t
        })
        .collect();
    if candidates.is_empty() {
        return Err(reject(
            RejectCode::UnknownEvent,
            format!(
                "state `{}` has no transition on `{PARENT_SETTLED_EVENT}`",
                state.name
            ),
        ));
    }
    let mut payload = JsonMap::new();
    payload.insert(
        PARENT_OUTCOME_FIELD.to_owned(),
        Json::String(outcome.to_owned()),
    );
    let candidates: Vec<&Transition> = candidates.iter().collect();
    transition_path(
        lib,
        wf,
        case,
        state,
        &candidates,
        Actor::Engine,
        PARENT_SETTLED_EVENT,
        &payload,
        &[],
        now,
    )
}

#[allow(clippy::too_many_arguments)]
fn fire(
    lib: &Library,
    wf: &Arc<CompiledWorkflow>,
    case: &Case,
    state: &State,
    event: &str,
    agency: &str,
    payload: &JsonMap<String, Json>,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    if let Some(cs) = &state.countersign
        && (event == cs.sign_event || event == cs.reject_event)
    {
        return countersign(lib, wf, case, state, cs, event, agency, payload, now);
    }
    let candidates: Vec<&Transition> = state
        .transitions
        .iter()
        .filter(|t| t.event == event)
        .collect();
    if candidates.is_empty() {
        return Err(no_transition(wf, state, event));
    }
    let actor_roles = roles_held(wf, &case.bindings, agency);
    let held: Vec<&Transition> = candidates
        .iter()
        .copied()
        .filter(|t| t.roles.iter().any(|r| actor_roles.contains(r)))
        .collect();
    if held.is_empty() {
        let mut allowed: Vec<&str> = Vec::new();
        for t in &candidates {
            for r in &t.roles {
                if !allowed.contains(&r.as_str()) {
                    allowed.push(r);
                }
            }
        }
        let holds = describe_held(agency, &actor_roles);
        let message = if event == PARENT_SETTLED_EVENT {
            format!(
                "`{event}` is fired by the engine when the case's parent settles, never by an agency; {holds}"
            )
        } else if allowed.is_empty() {
            format!(
                "`{event}` in state `{}` is fired only by the state's deadline; {holds}",
                state.name
            )
        } else {
            format!(
                "`{agency}` may not fire `{event}` in state `{}`: only {} may; {holds}",
                state.name,
                describe_roles(&allowed, &case.bindings)
            )
        };
        return Err(reject(RejectCode::RoleNotAllowed, message));
    }
    transition_path(
        lib,
        wf,
        case,
        state,
        &held,
        Actor::Agency(agency.to_owned()),
        event,
        payload,
        &actor_roles,
        now,
    )
}

/// Payload check, guards, effects, spawn and the move, for the given candidates
/// (already filtered by role).
#[allow(clippy::too_many_arguments)]
fn transition_path(
    lib: &Library,
    wf: &Arc<CompiledWorkflow>,
    case: &Case,
    state: &State,
    candidates: &[&Transition],
    actor: Actor,
    event: &str,
    payload: &JsonMap<String, Json>,
    actor_roles: &[String],
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let dir = directory(lib);
    let mut checked = Vec::new();
    let mut first_error = None;
    for &t in candidates {
        match check_payload(&t.payload, payload, dir) {
            Ok(p) => checked.push((t, p)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if checked.is_empty() {
        return Err(reject(
            RejectCode::InvalidPayload,
            format!(
                "`{event}`: {}",
                first_error.unwrap_or_else(|| "invalid payload".into())
            ),
        ));
    }
    let agency = spawn_starter(&actor).to_owned();
    let slot = SharedSlot::new(lib, wf);
    let mut cel = Cel::new(lib, wf, &slot, now, &case.vars, &case.bindings);
    cel.set_actor(&agency, actor_roles);
    let mut failures = Vec::new();
    let mut chosen = None;
    for (t, p) in checked {
        cel.set_payload(&p, &t.payload);
        let Some(guard) = &t.guard else {
            chosen = Some((t, p));
            break;
        };
        match cel.eval(guard, None) {
            Ok(cel::Value::Bool(true)) => {
                chosen = Some((t, p));
                break;
            }
            Ok(cel::Value::Bool(false)) => failures.push(format!("`{guard}` is false")),
            Ok(other) => failures.push(format!(
                "`{guard}` yields {}, not a boolean",
                describe_cel(&other)
            )),
            Err(e) => failures.push(format!("`{guard}` could not be evaluated: {e}")),
        }
    }
    let Some((t, payload)) = chosen else {
        let message = if failures.len() == 1 {
            format!(
                "`{event}` in state `{}`: guard {}",
                state.name,
                failures.join("")
            )
        } else {
            format!(
                "`{event}` in state `{}`: no guard holds: {}",
                state.name,
                failures.join("; ")
            )
        };
        return Err(reject(RejectCode::GuardFalse, message));
    };

    let seq = case.seq.saturating_add(1);
    let mut new = case.clone();
    let mut fx = Effects::default();
    let failed = |m: String| reject(RejectCode::EffectFailed, m);
    // Expressions see each effect's result, but converting the variables
    // for CEL is costly: it is redone only before the next expression, and
    // only when a variable some expression reads has changed.
    let mut vars_stale = false;
    for effect in &t.effects {
        if std::mem::take(&mut vars_stale) {
            cel.set_vars(&new.vars);
        }
        match effect {
            crate::lang::model::Effect::Set { var, value: source } => {
                let decl = wf
                    .variable(var)
                    .ok_or_else(|| failed(format!("effect sets unknown variable `{var}`")))?;
                let v = cel
                    .eval(source, None)
                    .map_err(|e| failed(format!("`{var} = {source}`: {e}")))?;
                let json = value::from_cel(&v, &decl.ty, dir)
                    .map_err(|e| failed(format!("`{var} = {source}`: {e}")))?;
                new.vars.insert(var.clone(), json);
                vars_stale = wf.reads.field("vars", var);
            }
            crate::lang::model::Effect::Bind { role, to } => {
                let id =
                    resolve_binding(lib, &mut cel, to, &new.vars, &new.bindings, &agency, None)
                        .map_err(|e| {
                            failed(format!("re-binding role `{role}`: {}", e.message()))
                        })?;
                new.bindings.insert(role.clone(), id);
                if let Some(problem) = binding_problem(lib, wf, &new.bindings) {
                    return Err(failed(format!("re-binding role `{role}`: {problem}")));
                }
                cel.set_roles(&new.bindings);
            }
        }
    }
    let mut spawn = Vec::new();
    if let Some(s) = &t.spawn {
        if vars_stale {
            cel.set_vars(&new.vars);
        }
        let list = cel
            .eval(&s.for_each, None)
            .map_err(|e| failed(format!("spawn `for_each: {}`: {e}", s.for_each)))?;
        let cel::Value::List(items) = list else {
            return Err(failed(format!(
                "spawn `for_each: {}` yields {}, not a list",
                s.for_each,
                describe_cel(&list)
            )));
        };
        for item in items.iter() {
            let child_id = format!("{}/{}", case.id, new.children.len());
            let workflow = match cel.eval(&s.workflow, Some(item)) {
                Ok(cel::Value::String(w)) => w.to_string(),
                Ok(other) => {
                    return Err(failed(format!(
                        "child {child_id}: `workflow: {}` yields {}, not a workflow name",
                        s.workflow,
                        describe_cel(&other)
                    )));
                }
                Err(e) => {
                    return Err(failed(format!(
                        "child {child_id}: `workflow: {}`: {e}",
                        s.workflow
                    )));
                }
            };
            let mut vars = BTreeMap::new();
            for (name, source) in &s.variables {
                let v = cel
                    .eval(source, Some(item))
                    .map_err(|e| failed(format!("child {child_id}: variable `{name}`: {e}")))?;
                let json = cel_to_json(&v)
                    .map_err(|e| failed(format!("child {child_id}: variable `{name}`: {e}")))?;
                vars.insert(name.clone(), json);
            }
            let mut bindings = BTreeMap::new();
            for (role, b) in &s.bindings {
                let id = resolve_binding(
                    lib,
                    &mut cel,
                    b,
                    &new.vars,
                    &new.bindings,
                    &agency,
                    Some(item),
                )
                .map_err(|e| failed(format!("child {child_id}: role `{role}`: {}", e.message())))?;
                bindings.insert(role.clone(), id);
            }
            let request = SpawnRequest {
                child_id: child_id.clone(),
                workflow: workflow.clone(),
                vars,
                bindings,
            };
            // The child must be able to start, or the parent's step is refused.
            start_child(lib, &new, &request, &agency, now).map_err(|r| {
                failed(format!(
                    "child {child_id} (workflow `{workflow}`) cannot start: {r}"
                ))
            })?;
            new.children.push(ChildRef {
                id: child_id,
                workflow,
                outcome: None,
            });
            spawn.push(request);
        }
    }
    // A transition that keeps its deadline stays in the state without
    // re-entering it: its timers and signatures run on.
    if !t.keep_deadline {
        leave(&mut new, &mut fx);
        enter(lib, wf, &mut new, &t.to, now, seq, &mut fx)?;
    }
    Ok(finish(
        wf,
        case,
        new,
        fx,
        actor,
        event,
        Json::Object(payload),
        spawn,
        now,
    ))
}

#[allow(clippy::too_many_arguments)]
fn countersign(
    lib: &Library,
    wf: &CompiledWorkflow,
    case: &Case,
    state: &State,
    cs: &Countersign,
    event: &str,
    agency: &str,
    payload: &JsonMap<String, Json>,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let actor_roles = roles_held(wf, &case.bindings, agency);
    let held: Vec<&String> = cs
        .roles
        .iter()
        .filter(|r| actor_roles.contains(r))
        .collect();
    if held.is_empty() {
        let allowed: Vec<&str> = cs.roles.iter().map(String::as_str).collect();
        return Err(reject(
            RejectCode::RoleNotAllowed,
            format!(
                "`{agency}` may not `{event}` in countersign state `{}`: only {} may; {}",
                state.name,
                describe_roles(&allowed, &case.bindings),
                describe_held(agency, &actor_roles)
            ),
        ));
    }
    let Some(role) = held
        .iter()
        .find(|r| !case.signatures.contains_key(r.as_str()))
    else {
        let names: Vec<String> = held.iter().map(|r| format!("`{r}`")).collect();
        return Err(reject(
            RejectCode::WrongState,
            if names.len() == 1 {
                format!(
                    "role {} has already signed in state `{}`",
                    names[0], state.name
                )
            } else {
                format!(
                    "roles {} have already signed in state `{}`",
                    names.join(", "),
                    state.name
                )
            },
        ));
    };
    let payload = check_payload(&countersign_fields(), payload, directory(lib))
        .map_err(|e| reject(RejectCode::InvalidPayload, format!("`{event}`: {e}")))?;
    let approve = event == cs.sign_event;
    let mut new = case.clone();
    new.signatures.insert(
        (*role).clone(),
        Signature {
            agency: agency.to_owned(),
            approved: approve,
            at: now,
        },
    );
    let quorum = match cs.quorum {
        Quorum::All => cs.roles.len(),
        Quorum::AtLeast(n) => n as usize,
    };
    let signed: Vec<&Signature> = cs
        .roles
        .iter()
        .filter_map(|r| new.signatures.get(r))
        .collect();
    let approvals = signed.iter().filter(|s| s.approved).count();
    let unsigned = cs.roles.len().saturating_sub(signed.len());
    let target = if approvals >= quorum {
        Some(&cs.approved)
    } else if !approve {
        match cs.on_reject {
            RejectRule::Veto => Some(&cs.rejected),
            RejectRule::CountAgainst if approvals + unsigned < quorum => Some(&cs.rejected),
            RejectRule::CountAgainst => None,
        }
    } else {
        None
    };
    let mut fx = Effects::default();
    if let Some(target) = target {
        leave(&mut new, &mut fx);
        enter(
            lib,
            wf,
            &mut new,
            target,
            now,
            case.seq.saturating_add(1),
            &mut fx,
        )?;
    }
    Ok(finish(
        wf,
        case,
        new,
        fx,
        Actor::Agency(agency.to_owned()),
        event,
        Json::Object(payload),
        Vec::new(),
        now,
    ))
}

/// The payload of a countersign's sign and reject events: a comment
/// (审批意见), optional, and nothing else.
pub fn countersign_fields() -> [Field; 1] {
    [Field {
        name: "comment".into(),
        ty: Type::String,
        title: "意见".into(),
        required: false,
    }]
}

fn timer(
    lib: &Library,
    wf: &Arc<CompiledWorkflow>,
    case: &Case,
    state: &State,
    timer_id: &str,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let Some(timer) = case
        .timers
        .iter()
        .find(|t| t.id == timer_id && t.state == case.state)
    else {
        return Err(reject(
            RejectCode::UnknownTimer,
            format!(
                "no timer `{timer_id}` is set on case `{}` (it fired, or its state was left)",
                case.id
            ),
        ));
    };
    if now < timer.due {
        return Err(reject(
            RejectCode::TimerNotDue,
            format!(
                "timer `{timer_id}` is due at {}, not yet at {}",
                timer.due.to_rfc3339(),
                now.to_rfc3339()
            ),
        ));
    }
    let actor = Actor::Timer(timer.id.clone());
    match timer.kind {
        TimerKind::Reminder => {
            let mut new = case.clone();
            new.timers.retain(|t| t.id != timer.id);
            let fx = Effects {
                timers_cancelled: vec![timer.id.clone()],
                ..Effects::default()
            };
            let event = format!("{REMINDER_PREFIX}{}", timer.event);
            Ok(finish(
                wf,
                case,
                new,
                fx,
                actor,
                &event,
                Json::Object(JsonMap::new()),
                Vec::new(),
                now,
            ))
        }
        TimerKind::Expiry => {
            let candidates: Vec<&Transition> = state
                .transitions
                .iter()
                .filter(|t| t.event == timer.event)
                .collect();
            let taken = if candidates.is_empty() {
                Err(no_transition(wf, state, &timer.event))
            } else {
                transition_path(
                    lib,
                    wf,
                    case,
                    state,
                    &candidates,
                    actor.clone(),
                    &timer.event,
                    &JsonMap::new(),
                    &[],
                    now,
                )
            };
            // A deadline that comes due when no transition applies (none in
            // this state, or no guard holds) is still spent, and the history
            // says why: otherwise it would stay due and fire again forever.
            // Any other refusal (a day past the calendar, an effect that
            // cannot be computed) is a fault to be mended, not a decision: the
            // deadline stays due, and the caller tries it again later.
            taken.or_else(|rejection| {
                if !matches!(
                    rejection.code,
                    RejectCode::UnknownEvent | RejectCode::WrongState | RejectCode::GuardFalse
                ) {
                    return Err(rejection);
                }
                Ok(spend(wf, case, timer, &rejection, now))
            })
        }
    }
}

/// The step that spends deadline `timer` without a transition, recording
/// why (`rejection`) under [`SPENT_KEY`].
fn spend(
    wf: &CompiledWorkflow,
    case: &Case,
    timer: &Timer,
    rejection: &Rejection,
    now: DateTime<Utc>,
) -> Step {
    let mut new = case.clone();
    new.timers.retain(|t| t.id != timer.id);
    let fx = Effects {
        timers_cancelled: vec![timer.id.clone()],
        ..Effects::default()
    };
    let mut payload = JsonMap::new();
    payload.insert(
        SPENT_KEY.to_owned(),
        Json::String(format!(
            "{}: {}",
            rejection.code.as_str(),
            rejection.message
        )),
    );
    finish(
        wf,
        case,
        new,
        fx,
        Actor::Timer(timer.id.clone()),
        &timer.event,
        Json::Object(payload),
        Vec::new(),
        now,
    )
}

/// A deadline spent on `rejection` by a govflow before 2026-11-27, which
/// spent a deadline on any refusal of its step (now only when no transition
/// applies): replay reproduces such a stored step when its timer is due and
/// the rules still refuse it with the same code.
pub fn spent_as_before(
    lib: &Library,
    case: &Case,
    timer_id: &str,
    rejection: &Rejection,
    now: DateTime<Utc>,
) -> Option<Step> {
    let wf = lib.pinned(&case.workflow, &case.digest)?;
    let timer = case.timers.iter().find(|t| {
        t.id == timer_id && t.state == case.state && t.kind == TimerKind::Expiry && t.due <= now
    })?;
    Some(spend(wf, case, timer, rejection, now))
}

fn child_settled(
    lib: &Library,
    wf: &CompiledWorkflow,
    case: &Case,
    state: &State,
    child_id: &str,
    outcome: &str,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    let Some(index) = case.children.iter().position(|c| c.id == child_id) else {
        return Err(reject(
            RejectCode::UnknownChild,
            format!("case `{}` has no child `{child_id}`", case.id),
        ));
    };
    if let Some(previous) = &case.children[index].outcome {
        return Err(reject(
            RejectCode::WrongState,
            format!("child `{child_id}` has already settled with outcome `{previous}`"),
        ));
    }
    let mut new = case.clone();
    new.children[index].outcome = Some(outcome.to_owned());
    let mut fx = Effects::default();
    if let Some(wait) = &state.children
        && children_done(&new, wait.wait)
    {
        leave(&mut new, &mut fx);
        enter(
            lib,
            wf,
            &mut new,
            &wait.to,
            now,
            case.seq.saturating_add(1),
            &mut fx,
        )?;
    }
    let mut payload = JsonMap::new();
    payload.insert("child".into(), Json::String(child_id.to_owned()));
    payload.insert("outcome".into(), Json::String(outcome.to_owned()));
    Ok(finish(
        wf,
        case,
        new,
        fx,
        Actor::Engine,
        CHILD_SETTLED_EVENT,
        Json::Object(payload),
        Vec::new(),
        now,
    ))
}

// ───────────────────────────── states and timers ─────────────────────────────

/// What a step did besides changing the case's fields.
#[derive(Default)]
struct Effects {
    timers_set: Vec<Timer>,
    timers_cancelled: Vec<String>,
    calendar_version: Option<String>,
    settled: Option<String>,
}

/// Leaves the current state: its timers are cancelled and signatures cleared.
fn leave(case: &mut Case, fx: &mut Effects) {
    fx.timers_cancelled
        .extend(case.timers.drain(..).map(|t| t.id));
    case.signatures.clear();
}

/// Enters `target`: sets its deadline timers, or its outcome if terminal. A
/// state waiting for children whose wait is already over (e.g. none were
/// spawned) is passed through to its `to` at once.
fn enter(
    lib: &Library,
    wf: &CompiledWorkflow,
    case: &mut Case,
    target: &str,
    now: DateTime<Utc>,
    seq: u64,
    fx: &mut Effects,
) -> Result<(), Rejection> {
    let mut target = target;
    let hops = wf.def.states.len();
    for hop in 0..=hops {
        let state = wf.state(target).ok_or_else(|| {
            reject(
                RejectCode::WrongState,
                format!(
                    "state `{target}` is not in workflow `{}` (version {})",
                    wf.def.name, wf.digest
                ),
            )
        })?;
        case.state = state.name.clone();
        if let Some(outcome) = &state.outcome {
            case.outcome = Some(outcome.clone());
            fx.settled = Some(outcome.clone());
            return Ok(());
        }
        if let Some(wait) = &state.children
            && hop < hops
            && children_done(case, wait.wait)
        {
            target = &wait.to;
            continue;
        }
        return set_timers(lib, state, case, now, seq, fx);
    }
    Ok(())
}

/// Whether a wait for children is over: All: no child is unsettled; Any: some
/// child has settled, or there are none.
fn children_done(case: &Case, wait: WaitFor) -> bool {
    match wait {
        WaitFor::All => case.children.iter().all(|c| c.outcome.is_some()),
        WaitFor::Any => {
            case.children.is_empty() || case.children.iter().any(|c| c.outcome.is_some())
        }
    }
}

fn set_timers(
    lib: &Library,
    state: &State,
    case: &mut Case,
    now: DateTime<Utc>,
    seq: u64,
    fx: &mut Effects,
) -> Result<(), Rejection> {
    let Some(deadline) = &state.deadline else {
        return Ok(());
    };
    let Some(event) = &deadline.on_expiry else {
        return Ok(());
    };
    let at_state = |e: String| {
        reject(
            RejectCode::Calendar,
            format!("deadline of state `{}`: {e}", state.name),
        )
    };
    let due = deadline_due(lib, now, &deadline.within, &case.vars).map_err(at_state)?;
    let version = lib
        .calendar
        .as_ref()
        .map(|c| c.version().to_owned())
        .unwrap_or_default();
    let mut timers = vec![Timer {
        id: format!("{seq}:expiry"),
        kind: TimerKind::Expiry,
        event: event.clone(),
        due,
        state: state.name.clone(),
        calendar_version: version.clone(),
    }];
    for (i, reminder) in deadline.reminders.iter().enumerate() {
        let (unit, n) = period(reminder, &case.vars).map_err(at_state)?;
        let at = subtract_period(lib, due, unit, n)
            .map_err(|e| at_state(format!("reminder {}: {e}", i + 1)))?;
        if at > now {
            timers.push(Timer {
                id: format!("{seq}:reminder:{i}"),
                kind: TimerKind::Reminder,
                event: event.clone(),
                due: at,
                state: state.name.clone(),
                calendar_version: version.clone(),
            });
        }
    }
    timers.sort_by(|a, b| (a.due, &a.id).cmp(&(b.due, &b.id)));
    fx.calendar_version = lib.calendar.as_ref().map(|c| c.version().to_owned());
    case.timers.extend(timers.iter().cloned());
    fx.timers_set.extend(timers);
    Ok(())
}

/// When a deadline of `within` entered at `now` comes due: a length counted on
/// the calendar ([`period`], [`add_period`]), or the day an anchored period
/// names ([`anchored_period`]).
pub fn deadline_due(
    lib: &Library,
    now: DateTime<Utc>,
    within: &Period,
    vars: &BTreeMap<String, Json>,
) -> Result<DateTime<Utc>, String> {
    let due = match within.anchor() {
        Some(anchor) => anchored_period(lib, now, anchor)?,
        None => {
            let (unit, n) = period(within, vars)?;
            add_period(lib, now, unit, n)?
        }
    };
    // Clients read deadlines as `google.protobuf.Timestamp`s, and exports
    // as RFC 3339: neither can carry a later moment.
    let last = DateTime::<Utc>::from_timestamp(LAST_TIMESTAMP_SECONDS, 0)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if due > last {
        return Err(format!(
            "`{within}` from {now} would end in the year {}: a deadline must end by 9999-12-31, the last day a timestamp can carry",
            chrono::Datelike::year(&due)
        ));
    }
    Ok(due)
}

/// 9999-12-31T23:59:59Z, the last second a `google.protobuf.Timestamp` holds.
const LAST_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// The unit and count of a length of time, reading a variable amount from
/// `vars`. A day fixed on the calendar (`DayOf`, `LastDayOf`) is no length: an
/// error (validation allows it only as a deadline's `within`).
pub fn period(p: &Period, vars: &BTreeMap<String, Json>) -> Result<(Unit, u32), String> {
    let (unit, amount) = match p {
        Period::WorkingDays(a) => (Unit::WorkingDays, a),
        Period::Days(a) => (Unit::Days, a),
        Period::Hours(a) => (Unit::Hours, a),
        Period::DayOf { .. } | Period::LastDayOf { .. } => {
            return Err(format!(
                "`{p}` is a day on the calendar, not a length of time"
            ));
        }
    };
    let n = match amount {
        Amount::Fixed(n) => *n,
        Amount::Variable(v) => match vars.get(v) {
            Some(Json::Number(n)) => {
                n.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        format!("the period is counted from `{v}`, which is {n}: not a count")
                    })?
            }
            Some(Json::Null) | None => {
                return Err(format!("the period is counted from `{v}`, which is unset"));
            }
            Some(other) => {
                return Err(format!(
                    "the period is counted from `{v}`, which is {other}: not an integer"
                ));
            }
        },
    };
    Ok((unit, n))
}

/// `start` + n units, per [`crate::calendar::Calendar::add`]; without a loaded
/// calendar hours and calendar days follow the same rules, working days fail.
pub fn add_period(
    lib: &Library,
    start: DateTime<Utc>,
    unit: Unit,
    n: u32,
) -> Result<DateTime<Utc>, String> {
    on_calendar(
        lib,
        |cal| cal.add(start, unit, n),
        || crate::calendar::add_without_holidays(start, unit, n),
    )
}

/// Asks the library's calendar, or without one the rules that need no
/// holiday data.
fn on_calendar(
    lib: &Library,
    with: impl FnOnce(
        &crate::calendar::Calendar,
    ) -> Result<DateTime<Utc>, crate::calendar::CalendarError>,
    without: impl FnOnce() -> Result<DateTime<Utc>, crate::calendar::CalendarError>,
) -> Result<DateTime<Utc>, String> {
    match &lib.calendar {
        Some(cal) => with(cal),
        None => without(),
    }
    .map_err(|e| e.to_string())
}

/// The end of the day `anchor` names, seen from `start`, per
/// [`crate::calendar::Calendar::anchored`]; without a loaded calendar only an
/// anchor that does not postpone over holidays can be computed.
pub fn anchored_period(
    lib: &Library,
    start: DateTime<Utc>,
    anchor: crate::calendar::Anchor,
) -> Result<DateTime<Utc>, String> {
    on_calendar(
        lib,
        |cal| cal.anchored(start, anchor),
        || crate::calendar::anchored_without_holidays(start, anchor),
    )
}

/// `due` − n units, per [`crate::calendar::Calendar::subtract`].
pub fn subtract_period(
    lib: &Library,
    due: DateTime<Utc>,
    unit: Unit,
    n: u32,
) -> Result<DateTime<Utc>, String> {
    on_calendar(
        lib,
        |cal| cal.subtract(due, unit, n),
        || crate::calendar::subtract_without_holidays(due, unit, n),
    )
}

/// Builds the step from the old and new case.
#[allow(clippy::too_many_arguments)]
fn finish(
    wf: &CompiledWorkflow,
    old: &Case,
    mut new: Case,
    fx: Effects,
    actor: Actor,
    event: &str,
    payload: Json,
    spawn: Vec<SpawnRequest>,
    now: DateTime<Utc>,
) -> Step {
    let seq = old.seq.saturating_add(1);
    new.seq = seq;
    new.updated_at = now;
    let vars_changed = new
        .vars
        .iter()
        .filter(|(k, v)| old.vars.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bindings_changed = new
        .bindings
        .iter()
        .filter(|(k, v)| old.bindings.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let entry = Entry {
        seq,
        at: now,
        actor,
        event: event.to_owned(),
        payload,
        from: old.state.clone(),
        to: new.state.clone(),
        vars_changed,
        bindings_changed,
        timers_set: fx.timers_set,
        timers_cancelled: fx.timers_cancelled,
        calendar_version: fx.calendar_version,
        digest: wf.digest.clone(),
    };
    Step {
        case: new,
        entry,
        spawn,
        settled: fx.settled,
    }
}

// ───────────────────────────── helpers ─────────────────────────────

/// The rules `case` runs on: the version it is pinned to, never another.
fn pinned<'l>(lib: &'l Library, case: &Case) -> Result<&'l Arc<CompiledWorkflow>, Rejection> {
    if let Some(wf) = lib.pinned(&case.workflow, &case.digest) {
        return Ok(wf);
    }
    compiled(lib, &case.workflow)?;
    Err(reject(
        RejectCode::VersionUnavailable,
        format!(
            "case `{}` runs on a version of workflow `{}` (digest {}) that this server cannot run: it no longer validates here, or a newer govflow deployed it (the server's log names it); the case cannot move until that version runs again",
            case.id, case.workflow, case.digest
        ),
    ))
}

/// The current version of workflow `name`, or why there is none.
pub fn compiled<'l>(lib: &'l Library, name: &str) -> Result<&'l Arc<CompiledWorkflow>, Rejection> {
    lib.workflows.get(name).ok_or_else(|| {
        let names = lib.workflows.keys().map(String::as_str);
        reject(
            RejectCode::UnknownWorkflow,
            format!(
                "no workflow `{name}` is loaded{}",
                hint(did_you_mean(name, names.clone()), names)
            ),
        )
    })
}

fn current_state<'w>(wf: &'w CompiledWorkflow, case: &Case) -> Result<&'w State, Rejection> {
    wf.state(&case.state).ok_or_else(|| {
        reject(
            RejectCode::WrongState,
            format!(
                "case `{}` is in state `{}`, which workflow `{}` (version {}) does not have",
                case.id, case.state, wf.def.name, wf.digest
            ),
        )
    })
}

/// "; did you mean …" or "; declared: a, b".
fn hint<'a>(close: Option<String>, all: impl Iterator<Item = &'a str>) -> String {
    match close {
        Some(h) => format!(" ({h})"),
        None => {
            let all: Vec<&str> = all.collect();
            if all.is_empty() {
                String::new()
            } else {
                format!(" (known: {})", all.join(", "))
            }
        }
    }
}

fn title(t: &str) -> String {
    if t.is_empty() {
        String::new()
    } else {
        format!(" ({t})")
    }
}

fn directory(lib: &Library) -> Option<&Directory> {
    (!lib.directory.is_empty()).then_some(&lib.directory)
}

fn known_agency(lib: &Library, id: &str) -> bool {
    lib.directory.is_empty() || lib.directory.contains(id)
}

/// Roles (in declaration order) bound to `agency`.
fn roles_held(
    wf: &CompiledWorkflow,
    bindings: &BTreeMap<String, String>,
    agency: &str,
) -> Vec<String> {
    if agency.is_empty() {
        return Vec::new();
    }
    wf.def
        .roles
        .iter()
        .filter(|r| bindings.get(&r.name).is_some_and(|a| a == agency))
        .map(|r| r.name.clone())
        .collect()
}

fn describe_held(agency: &str, roles: &[String]) -> String {
    if roles.is_empty() {
        format!("`{agency}` holds no role in this case")
    } else {
        format!("`{agency}` holds {}", roles.join(", "))
    }
}

fn describe_roles(roles: &[&str], bindings: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = roles
        .iter()
        .map(|r| match bindings.get(*r) {
            Some(a) => format!("{r} (bound to {a})"),
            None => (*r).to_owned(),
        })
        .collect();
    parts.join(", ")
}

fn describe_binding(b: &Binding) -> String {
    match b {
        Binding::Given => "Given".into(),
        Binding::Starter => "Starter".into(),
        Binding::Fixed(id) => format!("Fixed(\"{id}\")"),
        Binding::Variable(v) => format!("Variable(\"{v}\")"),
        Binding::ParentOf(r) => format!("ParentOf(\"{r}\")"),
        Binding::AncestorOf { role, level } => {
            format!("AncestorOf(role: \"{role}\", level: {level:?})")
        }
        Binding::Expr(e) => format!("Expr(\"{e}\")"),
    }
}

/// WrongState when another state knows the event, else UnknownEvent.
fn no_transition(wf: &CompiledWorkflow, state: &State, event: &str) -> Rejection {
    let knows = |s: &State, e: &str| {
        s.transitions.iter().any(|t| t.event == e)
            || s.countersign
                .as_ref()
                .is_some_and(|c| c.sign_event == e || c.reject_event == e)
    };
    let elsewhere: Vec<&str> = wf
        .def
        .states
        .iter()
        .filter(|s| knows(s, event))
        .map(|s| s.name.as_str())
        .collect();
    if !elsewhere.is_empty() {
        return reject(
            RejectCode::WrongState,
            format!(
                "`{event}` cannot happen in state `{}` ({}); it can in: {}",
                state.name,
                state.title,
                elsewhere.join(", ")
            ),
        );
    }
    let mut all: Vec<&str> = Vec::new();
    for s in &wf.def.states {
        let own = s.transitions.iter().map(|t| t.event.as_str()).chain(
            s.countersign
                .iter()
                .flat_map(|c| [c.sign_event.as_str(), c.reject_event.as_str()]),
        );
        for e in own {
            if !all.contains(&e) {
                all.push(e);
            }
        }
    }
    let mut now: Vec<&str> = state.transitions.iter().map(|t| t.event.as_str()).collect();
    if let Some(c) = &state.countersign {
        now.extend([c.sign_event.as_str(), c.reject_event.as_str()]);
    }
    now.dedup();
    let close = did_you_mean(event, all.iter().copied())
        .map(|h| format!(" ({h})"))
        .unwrap_or_default();
    let possible = if now.is_empty() {
        String::new()
    } else {
        format!(
            "; in state `{}` the events are: {}",
            state.name,
            now.join(", ")
        )
    };
    reject(
        RejectCode::UnknownEvent,
        format!(
            "workflow `{}` has no event `{event}`{close}{possible}",
            wf.def.name
        ),
    )
}

/// Checks a payload against the declared fields; returns it normalised.
fn check_payload(
    fields: &[Field],
    payload: &JsonMap<String, Json>,
    dir: Option<&Directory>,
) -> Result<JsonMap<String, Json>, String> {
    for key in payload.keys() {
        if !fields.iter().any(|f| f.name == *key) {
            let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
            return Err(if names.is_empty() {
                format!("unknown field `{key}`: the event takes no payload")
            } else {
                format!(
                    "unknown field `{key}`{}",
                    hint(did_you_mean(key, names.iter().copied()), names.into_iter())
                )
            });
        }
    }
    let mut out = JsonMap::new();
    for f in fields {
        match payload.get(&f.name) {
            None | Some(Json::Null) => {
                if f.required {
                    return Err(format!(
                        "missing required field `{}`{} ({})",
                        f.name,
                        title(&f.title),
                        value::type_name(&f.ty)
                    ));
                }
            }
            Some(v) => {
                let normal =
                    value::check(v, &f.ty, dir).map_err(|e| format!("field `{}`: {e}", f.name))?;
                out.insert(f.name.clone(), normal);
            }
        }
    }
    Ok(out)
}

enum BindError {
    /// Depends on something not yet known (another role): retry later.
    Pending(String),
    Failed(String),
}

impl BindError {
    fn message(self) -> String {
        match self {
            BindError::Pending(m) | BindError::Failed(m) => m,
        }
    }
}

/// The agency a binding yields now.
fn resolve_binding(
    lib: &Library,
    cel: &mut Cel,
    binding: &Binding,
    vars: &BTreeMap<String, Json>,
    bindings: &BTreeMap<String, String>,
    actor_agency: &str,
    item: Option<&cel::Value>,
) -> Result<String, BindError> {
    let id = match binding {
        Binding::Given => {
            return Err(BindError::Failed(
                "a role bound `Given` is given when the case starts; it cannot be derived".into(),
            ));
        }
        Binding::Starter => {
            if actor_agency.is_empty() {
                return Err(BindError::Failed(
                    "bound to the starter, but no agency started this (a timer or the engine did)"
                        .into(),
                ));
            }
            actor_agency.to_owned()
        }
        Binding::Fixed(id) => id.clone(),
        Binding::Variable(v) => match vars.get(v) {
            Some(Json::String(id)) => id.clone(),
            Some(Json::Null) | None => {
                return Err(BindError::Failed(format!(
                    "bound from variable `{v}`, which is unset"
                )));
            }
            Some(other) => {
                return Err(BindError::Failed(format!(
                    "bound from variable `{v}`, which holds {other}, not an agency id"
                )));
            }
        },
        Binding::ParentOf(role) => {
            let Some(of) = bindings.get(role) else {
                return Err(BindError::Pending(format!(
                    "role `{role}` it derives from is not bound"
                )));
            };
            match lib.directory.parent(of) {
                Some(p) => p.id.clone(),
                None => {
                    return Err(BindError::Failed(format!(
                        "agency `{of}` (role `{role}`) has no parent in the directory"
                    )));
                }
            }
        }
        Binding::AncestorOf { role, level } => {
            let Some(of) = bindings.get(role) else {
                return Err(BindError::Pending(format!(
                    "role `{role}` it derives from is not bound"
                )));
            };
            match lib.directory.ancestor_at(of, *level) {
                Some(a) => a.id.clone(),
                None => {
                    return Err(BindError::Failed(format!(
                        "agency `{of}` (role `{role}`) has no {} above it in the directory",
                        level.as_str()
                    )));
                }
            }
        }
        Binding::Expr(source) => match cel.eval(source, item) {
            Ok(cel::Value::String(s)) => s.to_string(),
            Ok(other) => {
                return Err(BindError::Failed(format!(
                    "`{source}` yields {}, not an agency id",
                    describe_cel(&other)
                )));
            }
            Err(e) => return Err(BindError::Pending(format!("`{source}`: {e}"))),
        },
    };
    if !known_agency(lib, &id) {
        return Err(BindError::Failed(lib.directory.unknown(&id)));
    }
    Ok(id)
}

// ───────────────────────────── CEL ─────────────────────────────

/// The names guards and effects see, built once per call. `catalogues` and
/// `agencies` come from [`Shared`], converted at most once per workflow.
struct Cel<'l> {
    lib: &'l Library,
    wf: &'l CompiledWorkflow,
    ctx: cel::Context<'l, 'l>,
}

impl<'l> Cel<'l> {
    fn new(
        lib: &'l Library,
        wf: &'l CompiledWorkflow,
        shared: &'l SharedSlot<'l>,
        now: DateTime<Utc>,
        vars: &BTreeMap<String, Json>,
        bindings: &BTreeMap<String, String>,
    ) -> Self {
        // The environment the checker's list of functions is tested against.
        let mut ctx = cel::Context::with_env(crate::lang::expr::environment());
        ctx.set_variable_resolver(shared);
        ctx.add_variable_from_value("now", cel::Value::Timestamp(now.fixed_offset()));
        ctx.add_variable_from_value("payload", empty_map());
        let mut cel = Cel { lib, wf, ctx };
        cel.set_actor("", &[]);
        cel.set_roles(bindings);
        cel.set_vars(vars);
        cel
    }

    fn set_vars(&mut self, vars: &BTreeMap<String, Json>) {
        // Only what the workflow's expressions read is converted.
        let reads = &self.wf.reads;
        let map: HashMap<String, cel::Value> = self
            .wf
            .def
            .variables
            .iter()
            .filter(|v| reads.field("vars", &v.name))
            .map(|v| {
                (
                    v.name.clone(),
                    value::to_cel(vars.get(&v.name).unwrap_or(&Json::Null), Some(&v.ty)),
                )
            })
            .collect();
        self.ctx.add_variable_from_value("vars", map);
    }

    fn set_roles(&mut self, bindings: &BTreeMap<String, String>) {
        let reads = &self.wf.reads;
        let map: HashMap<String, cel::Value> = bindings
            .iter()
            .filter(|(k, _)| reads.field("roles", k))
            .map(|(k, v)| (k.clone(), cel::Value::from(v.clone())))
            .collect();
        self.ctx.add_variable_from_value("roles", map);
    }

    fn set_actor(&mut self, agency: &str, roles: &[String]) {
        if !self.wf.reads.name("actor") {
            return;
        }
        let level = self
            .lib
            .directory
            .get(agency)
            .map(|a| a.level.as_str())
            .unwrap_or("");
        let mut map: HashMap<String, cel::Value> = HashMap::new();
        map.insert("agency".into(), agency.into());
        map.insert("level".into(), level.into());
        map.insert(
            "roles".into(),
            cel::Value::from(roles.iter().map(|r| r.as_str()).collect::<Vec<_>>()),
        );
        self.ctx.add_variable_from_value("actor", map);
    }

    /// The payload; an optional field left out is absent, so that
    /// `has(payload.x)` tells.
    fn set_payload(&mut self, payload: &JsonMap<String, Json>, fields: &[Field]) {
        let reads = &self.wf.reads;
        let map: HashMap<String, cel::Value> = fields
            .iter()
            .filter(|f| reads.field("payload", &f.name))
            .filter_map(|f| {
                let value = payload.get(&f.name).filter(|v| !v.is_null())?;
                Some((f.name.clone(), value::to_cel(value, Some(&f.ty))))
            })
            .collect();
        self.ctx.add_variable_from_value("payload", map);
    }

    fn eval(&mut self, source: &str, item: Option<&cel::Value>) -> Result<cel::Value, String> {
        let wf = self.wf;
        let Some(program) = wf.program(source) else {
            return Err(format!(
                "`{source}` was not compiled when workflow `{}` loaded",
                wf.def.name
            ));
        };
        let ctx = &self.ctx;
        // The interpreter is third-party code: a panic inside it must not take
        // the engine down, it only fails this expression.
        let result = catch_unwind(AssertUnwindSafe(|| match item {
            Some(item) => {
                let mut inner = ctx.new_inner_scope();
                inner.add_variable_from_value("item", item.clone());
                program.execute(&inner)
            }
            None => program.execute(ctx),
        }));
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the expression failed inside the CEL interpreter".into()),
        }
    }
}

/// `catalogues` (those the workflow declares) and `agencies` as CEL values.
///
/// Converting a catalogue of hundreds of rows into the interpreter's values
/// takes about a millisecond, so it is done once per workflow and library
/// and shared by every call after it (a memo: it never changes a result).
struct Shared {
    catalogues: Option<Box<dyn Val>>,
    agencies: Option<Box<dyn Val>>,
}

impl Shared {
    fn build(lib: &Library, wf: &CompiledWorkflow) -> Shared {
        let catalogues: HashMap<String, cel::Value> = wf
            .def
            .catalogues
            .iter()
            .filter_map(|name| {
                lib.catalogues
                    .get(name)
                    .map(|t| (name.clone(), t.cel.clone()))
            })
            .collect();
        let dir = &lib.directory;
        let agencies: HashMap<String, cel::Value> = dir
            .ids()
            .filter_map(|id| dir.get(id))
            .map(|a| {
                let mut rec: HashMap<String, cel::Value> = HashMap::new();
                rec.insert("id".into(), a.id.clone().into());
                rec.insert("name".into(), a.name.clone().into());
                rec.insert("level".into(), a.level.as_str().into());
                rec.insert("parent".into(), a.parent.clone().unwrap_or_default().into());
                (a.id.clone(), cel::Value::from(rec))
            })
            .collect();
        Shared {
            catalogues: cel::Value::from(catalogues).try_into().ok(),
            agencies: cel::Value::from(agencies).try_into().ok(),
        }
    }
}

/// What a [`Shared`] was built from: the workflow, its catalogues, and the
/// directory (by address and size: it has no identity of its own).
struct SharedKey {
    workflow: Weak<CompiledWorkflow>,
    catalogues: Vec<Weak<CatalogueTable>>,
    directory: (usize, usize),
}

type SharedCache = Vec<(SharedKey, Arc<Shared>)>;

/// Entries whose workflow is gone are dropped; at most this many are kept.
const SHARED_CACHE_SIZE: usize = 64;

fn shared_for(lib: &Library, wf: &Arc<CompiledWorkflow>) -> Arc<Shared> {
    static CACHE: LazyLock<Mutex<SharedCache>> = LazyLock::new(|| Mutex::new(Vec::new()));
    let tables: Vec<&Arc<CatalogueTable>> = wf
        .def
        .catalogues
        .iter()
        .filter_map(|name| lib.catalogues.get(name))
        .collect();
    let directory = (
        std::ptr::from_ref(&lib.directory) as usize,
        lib.directory.len(),
    );
    let matches = |key: &SharedKey| {
        Weak::ptr_eq(&key.workflow, &Arc::downgrade(wf))
            && key.directory == directory
            && key.catalogues.len() == tables.len()
            && key
                .catalogues
                .iter()
                .zip(&tables)
                .all(|(k, t)| Weak::ptr_eq(k, &Arc::downgrade(t)))
    };
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, shared)) = cache.iter().find(|(key, _)| matches(key)) {
        return Arc::clone(shared);
    }
    let shared = Arc::new(Shared::build(lib, wf));
    cache.retain(|(key, _)| key.workflow.strong_count() > 0);
    if cache.len() >= SHARED_CACHE_SIZE {
        cache.remove(0);
    }
    cache.push((
        SharedKey {
            workflow: Arc::downgrade(wf),
            catalogues: tables.iter().map(|t| Arc::downgrade(t)).collect(),
            directory,
        },
        Arc::clone(&shared),
    ));
    shared
}

/// Resolves `catalogues` and `agencies`, fetching the [`Shared`] values only
/// when an expression first refers to one of them.
struct SharedSlot<'l> {
    lib: &'l Library,
    wf: &'l Arc<CompiledWorkflow>,
    shared: OnceLock<Arc<Shared>>,
}

impl<'l> SharedSlot<'l> {
    fn new(lib: &'l Library, wf: &'l Arc<CompiledWorkflow>) -> Self {
        SharedSlot {
            lib,
            wf,
            shared: OnceLock::new(),
        }
    }
}

impl VariableResolver for SharedSlot<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        if variable != "catalogues" && variable != "agencies" {
            return None;
        }
        let shared = self.shared.get_or_init(|| shared_for(self.lib, self.wf));
        let value = if variable == "catalogues" {
            shared.catalogues.as_deref()
        } else {
            shared.agencies.as_deref()
        };
        value.map(CowVal::Borrowed)
    }
}

fn empty_map() -> cel::Value {
    cel::Value::from(HashMap::<String, cel::Value>::new())
}

/// A short description of a CEL value for messages.
fn describe_cel(v: &cel::Value) -> String {
    match cel_to_json(v) {
        Ok(j) => {
            let text = j.to_string();
            if text.chars().count() > 60 {
                format!("{}…", text.chars().take(60).collect::<String>())
            } else {
                text
            }
        }
        Err(_) => format!("{:?}", v.type_of()),
    }
}

/// A CEL value as JSON, before its type is known (child variables): the
/// child's `start` checks it against the declared type. Map keys are sorted.
pub fn cel_to_json(v: &cel::Value) -> Result<Json, String> {
    Ok(match v {
        cel::Value::Null => Json::Null,
        cel::Value::Bool(b) => Json::Bool(*b),
        cel::Value::Int(i) => Json::from(*i),
        cel::Value::UInt(u) => Json::from(*u),
        cel::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("{f} is not a finite number"))?,
        cel::Value::String(s) => Json::String(s.to_string()),
        cel::Value::Bytes(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        cel::Value::Timestamp(t) => Json::String(
            t.to_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
        cel::Value::Duration(d) => Json::String(format!("{}s", d.num_seconds())),
        cel::Value::List(items) => Json::Array(
            items
                .iter()
                .map(cel_to_json)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        cel::Value::Map(m) => {
            let mut sorted = BTreeMap::new();
            for (k, v) in m.map.iter() {
                let key = match k {
                    cel::objects::Key::String(s) => s.to_string(),
                    cel::objects::Key::Int(i) => i.to_string(),
                    cel::objects::Key::Uint(u) => u.to_string(),
                    cel::objects::Key::Bool(b) => b.to_string(),
                };
                sorted.insert(key, cel_to_json(v)?);
            }
            Json::Object(sorted.into_iter().collect())
        }
        other => return Err(format!("a {} value cannot be stored", other.type_of())),
    })
}

#[cfg(test)]
mod tests;
