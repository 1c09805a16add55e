//! The scenario language.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lang::model::Period;

/// One scenario: start a case, then run steps against it on virtual time.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario shows, in a sentence.
    pub name: String,
    pub workflow: String,
    pub start: Start,
    pub steps: Vec<Step>,
}

/// How the case starts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    /// Virtual time at start, RFC 3339 (e.g. `2020-06-01T09:00:00+08:00`).
    pub at: String,
    /// The agency that starts the case.
    pub by: String,
    /// Agencies for the roles bound `Given`.
    #[serde(default)]
    pub bindings: BTreeMap<String, String>,
    #[serde(default)]
    pub variables: BTreeMap<String, ron::Value>,
}

/// Which case a step acts on: the scenario's own, or one of its children.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub enum Target {
    #[default]
    Main,
    /// The n-th child (0-based, in spawn order) of the main case.
    Child(usize),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub enum Step {
    /// Fire an event as an agency; it must be accepted.
    Fire {
        event: String,
        by: String,
        #[serde(default)]
        payload: BTreeMap<String, ron::Value>,
        #[serde(default)]
        case: Target,
    },
    /// Fire an event that must be rejected with `reason` (a rejection code such
    /// as `guard-false`, `role-not-allowed`, `wrong-state`, `invalid-payload`).
    Reject {
        event: String,
        by: String,
        #[serde(default)]
        payload: BTreeMap<String, ron::Value>,
        reason: String,
        /// Text the rejection message must contain (e.g. the field it names).
        #[serde(default)]
        mentions: Option<String>,
        #[serde(default)]
        case: Target,
    },
    /// Let virtual time pass; deadlines and reminders that come due fire in order.
    Advance(Period),
    /// Check the case.
    Expect(Expect),
}

/// What a case must look like now; unset fields are not checked.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub case: Target,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, ron::Value>,
    #[serde(default)]
    pub bindings: BTreeMap<String, String>,
    /// How many children the case has spawned so far.
    #[serde(default)]
    pub children: Option<usize>,
    /// Child workflows in spawn order.
    #[serde(default)]
    pub child_workflows: Option<Vec<String>>,
    /// Events the engine fired on its own since the previous step (deadline
    /// expiries, reminders, children settling), in order.
    #[serde(default)]
    pub fired: Option<Vec<String>>,
}
