//! The language workflow authors write: serde types read from RON.
//!
//! Every struct rejects unknown fields, so a misspelt key is an error at its
//! own `line:col` rather than a silently ignored setting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One workflow file: a versioned state-machine graph.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Stable identifier, e.g. `baolian_escalation`.
    pub name: String,
    /// Human title (Chinese).
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// Catalogues that guards and effects may look up as `catalogues.<name>`.
    #[serde(default)]
    pub catalogues: Vec<String>,
    pub roles: Vec<Role>,
    #[serde(default)]
    pub variables: Vec<Variable>,
    /// The state a new case starts in.
    pub start: String,
    pub states: Vec<State>,
}

/// A named part in a workflow, bound to an agency when a case starts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub name: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub binding: Binding,
    /// Roles no agency may hold together with this one (separation of
    /// duties): a case in which one agency would hold both is refused at
    /// start, and so is a step that would re-bind it so.
    #[serde(default)]
    pub separate_from: Vec<String>,
    /// The level the agency holding this role must be at (the county
    /// government an enterprise names is a county): a start or a re-binding
    /// that gives it to an agency of another level is refused.
    #[serde(default)]
    pub level: Option<Level>,
}

/// How a role finds its agency: at start, and again when an effect re-binds it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub enum Binding {
    /// Supplied by whoever starts the case.
    #[default]
    Given,
    /// The agency that starts the case.
    Starter,
    /// A fixed agency of the directory.
    Fixed(String),
    /// The agency whose id a case variable holds (e.g. the enterprise's county).
    Variable(String),
    /// The parent, in the directory, of the agency bound to another role.
    ParentOf(String),
    /// The nearest agency at `level` above (or equal to) the agency bound to `role`.
    AncestorOf { role: String, level: Level },
    /// A CEL expression that yields an agency id.
    Expr(String),
}

/// Administrative level of an agency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub enum Level {
    Province,
    City,
    County,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Province => "province",
            Level::City => "city",
            Level::County => "county",
        }
    }
}

/// A typed case variable.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: Type,
    #[serde(default)]
    pub title: String,
    /// Value before anything sets it; without one the variable starts unset (null).
    #[serde(default)]
    pub default: Option<ron::Value>,
    /// Indexed so that cases can be listed by it.
    #[serde(default)]
    pub searchable: bool,
    /// Supplied by whoever starts the case (a department system's start, a
    /// parent's spawn). A start may set no other variable: the rest are the
    /// workflow's own record (its status, ledger, dates), which only its
    /// transitions write.
    #[serde(default)]
    pub given: bool,
}

/// Types of variables and payload fields.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub enum Type {
    String,
    Integer,
    /// Exact decimal for money and rates, written as a string (`"12.50"`).
    Decimal,
    Boolean,
    /// A calendar date, `YYYY-MM-DD`.
    Date,
    /// A moment, RFC 3339.
    Time,
    /// The id of an agency in the directory.
    Agency,
    /// One of a fixed set of strings.
    Enum(Vec<String>),
    List(Box<Type>),
}

/// A field of an event's payload.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: Type,
    #[serde(default)]
    pub title: String,
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// The event name of the entry recording that a child case settled.
pub const CHILD_SETTLED_EVENT: &str = "child-settled";
/// Prefix of the event name of a reminder entry: `reminder:<deadline event>`.
pub const REMINDER_PREFIX: &str = "reminder:";
/// The event the engine fires on each running child of a case that settles:
/// a child workflow reacts to it with transitions on this event (no role
/// fires them), whose payload holds the parent's `outcome`.
pub const PARENT_SETTLED_EVENT: &str = "parent-settled";
/// The payload field of [`PARENT_SETTLED_EVENT`]: the parent's outcome, a
/// string, given to its transitions whether they declare it or not.
pub const PARENT_OUTCOME_FIELD: &str = "outcome";

/// The field a transition on [`PARENT_SETTLED_EVENT`] takes, declared or not.
pub fn parent_outcome_field() -> Field {
    Field {
        name: PARENT_OUTCOME_FIELD.to_owned(),
        ty: Type::String,
        title: "上级案件的结果".to_owned(),
        required: true,
    }
}

/// A state of the graph.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub name: String,
    pub title: String,
    /// Set on terminal states: the case ends here with this outcome.
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub deadline: Option<Deadline>,
    /// Makes this a countersign (会签) state.
    #[serde(default)]
    pub countersign: Option<Countersign>,
    /// Makes this a state that waits for the case's children (see [`AwaitChildren`]).
    #[serde(default)]
    pub children: Option<AwaitChildren>,
    #[serde(default)]
    pub transitions: Vec<Transition>,
}

impl State {
    pub fn is_terminal(&self) -> bool {
        self.outcome.is_some()
    }
}

/// A time limit on a state; on expiry the engine fires `on_expiry`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Deadline {
    pub within: Period,
    pub on_expiry: Option<String>,
    /// Reminders fired this long before expiry (recorded, no state change).
    #[serde(default)]
    pub reminders: Vec<Period>,
}

/// A length of time on the working-day calendar, or a day fixed on it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub enum Period {
    /// Working days (skips weekends and statutory holidays, counts make-up days).
    WorkingDays(Amount),
    /// Calendar days.
    Days(Amount),
    Hours(Amount),
    /// The end (24:00) of day `day` (from 1) of a calendar span, seen from the
    /// step's date in Asia/Shanghai: 每月1日前 is `DayOf(day: 1, of: NextMonth)`.
    /// With `postpone_over_holidays` (节假日顺延) a day that is not a working day
    /// moves to the next working day. Only for `within`, not for reminders.
    DayOf {
        day: u32,
        of: Span,
        #[serde(default)]
        postpone_over_holidays: bool,
    },
    /// The end of the last day of a calendar span: 每季度 is
    /// `LastDayOf(of: ThisQuarter)`, 每半年 `LastDayOf(of: ThisHalfYear)`.
    LastDayOf {
        of: Span,
        #[serde(default)]
        postpone_over_holidays: bool,
    },
}

/// A calendar span an anchored deadline (`DayOf`, `LastDayOf`) points into: the
/// one the step's Shanghai date falls in (`This…`), or the one after it (`Next…`).
/// Quarters start in January, April, July and October; half-years in January and July.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub enum Span {
    ThisMonth,
    NextMonth,
    ThisQuarter,
    NextQuarter,
    ThisHalfYear,
    NextHalfYear,
    ThisYear,
    NextYear,
}

impl Span {
    /// The calendar's span kind, and whether it is the next one.
    pub fn calendar(self) -> (crate::calendar::Span, bool) {
        use crate::calendar::Span as S;
        match self {
            Span::ThisMonth => (S::Month, false),
            Span::NextMonth => (S::Month, true),
            Span::ThisQuarter => (S::Quarter, false),
            Span::NextQuarter => (S::Quarter, true),
            Span::ThisHalfYear => (S::HalfYear, false),
            Span::NextHalfYear => (S::HalfYear, true),
            Span::ThisYear => (S::Year, false),
            Span::NextYear => (S::Year, true),
        }
    }
}

impl Period {
    /// The count of a length; `None` for a day fixed on the calendar.
    pub fn amount(&self) -> Option<&Amount> {
        match self {
            Period::WorkingDays(a) | Period::Days(a) | Period::Hours(a) => Some(a),
            Period::DayOf { .. } | Period::LastDayOf { .. } => None,
        }
    }

    /// The calendar day a `DayOf` or `LastDayOf` names; `None` for a length.
    pub fn anchor(&self) -> Option<crate::calendar::Anchor> {
        use crate::calendar::AnchorDay;
        match self {
            Period::WorkingDays(_) | Period::Days(_) | Period::Hours(_) => None,
            Period::DayOf {
                day,
                of,
                postpone_over_holidays,
            } => Some(anchor(AnchorDay::Nth(*day), *of, *postpone_over_holidays)),
            Period::LastDayOf {
                of,
                postpone_over_holidays,
            } => Some(anchor(AnchorDay::Last, *of, *postpone_over_holidays)),
        }
    }
}

fn anchor(day: crate::calendar::AnchorDay, of: Span, postpone: bool) -> crate::calendar::Anchor {
    let (span, next) = of.calendar();
    crate::calendar::Anchor {
        day,
        span,
        next,
        postpone,
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::calendar::AnchorDay;
        // Singular for exactly one; a variable may hold any count.
        let s = |a: &Amount| if *a == Amount::Fixed(1) { "" } else { "s" };
        match self {
            Period::WorkingDays(a) => write!(f, "{a} working day{}", s(a)),
            Period::Days(a) => write!(f, "{a} day{}", s(a)),
            Period::Hours(a) => write!(f, "{a} hour{}", s(a)),
            Period::DayOf {
                day,
                of,
                postpone_over_holidays,
            } => anchor(AnchorDay::Nth(*day), *of, *postpone_over_holidays).fmt(f),
            Period::LastDayOf {
                of,
                postpone_over_holidays,
            } => anchor(AnchorDay::Last, *of, *postpone_over_holidays).fmt(f),
        }
    }
}

/// A fixed number, or the name of an integer case variable holding it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
#[serde(deny_unknown_fields)]
pub enum Amount {
    Fixed(u32),
    Variable(String),
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Fixed(n) => write!(f, "{n}"),
            Amount::Variable(v) => write!(f, "vars.{v}"),
        }
    }
}

/// A countersign state: each of `roles` signs or rejects.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Countersign {
    pub roles: Vec<String>,
    #[serde(default)]
    pub quorum: Quorum,
    /// Event a role fires to sign (approve).
    #[serde(default = "default_sign_event")]
    pub sign_event: String,
    /// Event a role fires to reject.
    #[serde(default = "default_reject_event")]
    pub reject_event: String,
    /// Target once the quorum has signed.
    pub approved: String,
    /// Target once a rejection decides the countersign.
    pub rejected: String,
    #[serde(default)]
    pub on_reject: RejectRule,
}

fn default_sign_event() -> String {
    "sign".into()
}

fn default_reject_event() -> String {
    "reject".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub enum Quorum {
    /// Every role must sign.
    #[default]
    All,
    /// At least this many of the roles must sign.
    AtLeast(u32),
}

/// What a rejection does to a countersign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub enum RejectRule {
    /// One rejection decides: go to `rejected` at once.
    #[default]
    Veto,
    /// Rejections count against the quorum: go to `rejected` once it can no longer be reached.
    CountAgainst,
}

/// A state that waits for the case's child cases: every child the case has
/// spawned so far, on entering this state or earlier, counts (the wait is
/// over at once for `Any` if one of them has already settled).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwaitChildren {
    pub wait: WaitFor,
    /// Target once the wait is over.
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub enum WaitFor {
    /// Every child has settled (reached a terminal state).
    All,
    /// A child has settled (any of them, also one that settled before the wait began).
    Any,
}

/// An edge of the graph.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    pub event: String,
    pub to: String,
    #[serde(default)]
    pub title: String,
    /// Roles allowed to fire it. A deadline's expiry event is fired by the engine.
    #[serde(default)]
    pub roles: Vec<String>,
    /// CEL; the transition is taken only when it yields `true`.
    #[serde(default)]
    pub guard: Option<String>,
    #[serde(default)]
    pub payload: Vec<Field>,
    #[serde(default)]
    pub effects: Vec<Effect>,
    /// Child cases to start when the transition is taken.
    #[serde(default)]
    pub spawn: Option<Spawn>,
    /// For a transition back to its own state (a progress report, a note):
    /// stay without re-entering it, so its running deadline is not restarted.
    #[serde(default)]
    pub keep_deadline: bool,
}

/// What a transition changes besides the state.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub enum Effect {
    /// Set a case variable to the value of a CEL expression.
    Set { var: String, value: String },
    /// Re-bind a role to another agency (escalation).
    Bind { role: String, to: Binding },
}

/// One child case per item of a list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spawn {
    /// CEL yielding the list; each element is `item` in the expressions below.
    pub for_each: String,
    /// CEL yielding the child's workflow name.
    pub workflow: String,
    /// Child variables, each from a CEL expression.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Child roles, each bound to an agency by the parent.
    #[serde(default)]
    pub bindings: BTreeMap<String, Binding>,
}

/// A named data table in its own file, e.g. the 证照分离 permit list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub name: String,
    pub title: String,
    #[serde(default)]
    pub status: CatalogueStatus,
    #[serde(default)]
    pub source: String,
    /// The first column is the key.
    pub columns: Vec<Column>,
    #[serde(default)]
    pub totals: Option<Totals>,
    pub rows: Vec<Vec<ron::Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub enum CatalogueStatus {
    #[default]
    Official,
    /// Placeholder rows with the right counts, waiting for the official list.
    AwaitingOfficialList,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: Type,
    #[serde(default)]
    pub title: String,
}

/// Declared counts a catalogue must match.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    pub rows: usize,
    #[serde(default)]
    pub by: Vec<CountBy>,
}

/// How many rows hold each value of a column.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CountBy {
    pub column: String,
    pub counts: BTreeMap<String, usize>,
}

/// The agency directory, `workflows/agencies.ron`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Agencies {
    pub agencies: Vec<Agency>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Agency {
    pub id: String,
    pub name: String,
    pub level: Level,
    #[serde(default)]
    pub parent: Option<String>,
    /// An agency through which enterprises act (the enterprise service
    /// platform): it holds only the roles made for it — fixed to it, or the
    /// starter's — never a department's role given at start or bound later,
    /// so that an enterprise cannot review, approve or criticise in its own
    /// cases or any other.
    #[serde(default)]
    pub for_enterprises: bool,
}
