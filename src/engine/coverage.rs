//! Which paths of a workflow a history took: the items scenario coverage counts.
//!
//! Item formats (states and events by name):
//!
//! * `"state --event--> target"`: a transition (also a self-transition);
//! * `"state ⏱ event"`: the state's deadline expired and its expiry was accepted;
//! * `"state --sign--> approved"` / `"state --reject--> rejected"`: a countersign
//!   decided (with the state's own sign and reject event names);
//! * `"state --child-settled--> to"`: a wait for children ended.

use std::collections::BTreeSet;

use super::core::{Actor, CHILD_SETTLED_EVENT, Entry, REMINDER_PREFIX, SPENT_KEY};
use crate::lang::model::{State, Workflow};

pub fn transition_item(from: &str, event: &str, to: &str) -> String {
    format!("{from} --{event}--> {to}")
}

pub fn expiry_item(state: &str, event: &str) -> String {
    format!("{state} ⏱ {event}")
}

/// Every item of a workflow.
pub fn items(w: &Workflow) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for s in &w.states {
        for t in &s.transitions {
            all.insert(transition_item(&s.name, &t.event, &t.to));
        }
        if let Some(event) = s.deadline.as_ref().and_then(|d| d.on_expiry.as_ref()) {
            all.insert(expiry_item(&s.name, event));
        }
        if let Some(cs) = &s.countersign {
            all.insert(transition_item(&s.name, &cs.sign_event, &cs.approved));
            all.insert(transition_item(&s.name, &cs.reject_event, &cs.rejected));
        }
        if let Some(wait) = &s.children {
            all.insert(transition_item(&s.name, CHILD_SETTLED_EVENT, &wait.to));
        }
    }
    all
}

/// The items one accepted entry covers. A state waiting for children that the
/// step passed straight through (nothing to wait for) counts as left by
/// `child-settled`.
pub fn taken(w: &Workflow, entry: &Entry) -> Vec<String> {
    let mut out = Vec::new();
    let Some(from) = state(w, &entry.from) else {
        return out;
    };
    // Reminders change nothing, and a spent deadline took no transition.
    if entry.event.starts_with(REMINDER_PREFIX) || entry.payload.get(SPENT_KEY).is_some() {
        return out;
    }
    let expiry = from.deadline.as_ref().and_then(|d| d.on_expiry.as_deref());
    if matches!(entry.actor, Actor::Timer(_)) && expiry == Some(entry.event.as_str()) {
        out.push(expiry_item(&from.name, &entry.event));
    }
    // The first hop of the step, then waits passed through up to `entry.to`.
    let mut firsts: Vec<&str> = Vec::new();
    if let Some(cs) = &from.countersign
        && entry.from != entry.to
    {
        if entry.event == cs.sign_event {
            firsts.push(&cs.approved);
        } else if entry.event == cs.reject_event {
            firsts.push(&cs.rejected);
        }
    }
    if let Some(wait) = &from.children
        && entry.event == CHILD_SETTLED_EVENT
        && entry.from != entry.to
    {
        firsts.push(&wait.to);
    }
    firsts.extend(
        from.transitions
            .iter()
            .filter(|t| t.event == entry.event)
            .map(|t| t.to.as_str()),
    );
    for first in firsts {
        if let Some(chain) = pass_through(w, first, &entry.to) {
            out.push(transition_item(&from.name, &entry.event, first));
            out.extend(chain);
            break;
        }
    }
    out
}

/// The child-settled hops from `first` to `to`, if `to` is reached from it.
fn pass_through(w: &Workflow, first: &str, to: &str) -> Option<Vec<String>> {
    let mut hops = Vec::new();
    let mut at = first;
    for _ in 0..=w.states.len() {
        if at == to {
            return Some(hops);
        }
        let wait = state(w, at)?.children.as_ref()?;
        hops.push(transition_item(at, CHILD_SETTLED_EVENT, &wait.to));
        at = &wait.to;
    }
    None
}

fn state<'w>(w: &'w Workflow, name: &str) -> Option<&'w State> {
    w.states.iter().find(|s| s.name == name)
}
