//! The engine's values as the records of `proto/`, and the canonical encoding
//! that history hashes are computed over.
//!
//! Canonical encoding of a history entry (see docs/hash-chain.md): the entry
//! as a JSON object ([`entry_json`]) without its `hash` member, serialised
//! with keys sorted, no insignificant whitespace and UTF-8 text unescaped —
//! what Python's `json.dumps(obj, sort_keys=True, separators=(",", ":"),
//! ensure_ascii=False)` prints. `hash` = SHA-256 of those bytes, hex-encoded
//! in exports; `previous_hash` is the hash of the entry before (empty for the
//! first), so each entry seals the whole history up to it.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use prost_types::value::Kind;
use serde_json::{Map as JsonMap, Value as Json, json};

use super::proto;
use crate::engine::core::{self, Actor, TimerKind};

use crate::lang::value::MAX_EXACT_INTEGER;

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn from_timestamp(t: Option<&prost_types::Timestamp>) -> DateTime<Utc> {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_default()
}

/// RFC 3339 in UTC, as in exports and the canonical encoding.
/// The case's running deadline: its state's expiry (not a reminder), the
/// soonest if there were several.
pub fn running_deadline(case: &proto::Case) -> Option<&prost_types::Timestamp> {
    case.timers
        .iter()
        .filter(|t| t.kind() == proto::TimerKind::Expiry)
        .filter_map(|t| t.due_time.as_ref())
        .min_by_key(|t| (t.seconds, t.nanos))
}

pub fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    from_timestamp(t).to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub fn to_value(v: &Json) -> prost_types::Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn to_struct(map: &JsonMap<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn btree_struct(map: &BTreeMap<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

/// A protobuf value as JSON; whole numbers within the exact range become integers.
pub fn from_value(v: &prost_types::Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(f)) => {
            if f.fract() == 0.0 && f.abs() <= MAX_EXACT_INTEGER as f64 {
                Json::from(*f as i64)
            } else {
                serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number)
            }
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => Json::Object(from_struct(Some(s))),
    }
}

pub fn from_struct(s: Option<&prost_types::Struct>) -> JsonMap<String, Json> {
    s.map(|s| {
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), from_value(v)))
            .collect()
    })
    .unwrap_or_default()
}

fn timer_kind(kind: TimerKind) -> proto::TimerKind {
    match kind {
        TimerKind::Expiry => proto::TimerKind::Expiry,
        TimerKind::Reminder => proto::TimerKind::Reminder,
    }
}

pub fn timer(t: &core::Timer) -> proto::Timer {
    proto::Timer {
        id: t.id.clone(),
        kind: timer_kind(t.kind) as i32,
        event: t.event.clone(),
        due_time: Some(timestamp(t.due)),
        state: t.state.clone(),
        calendar_version: t.calendar_version.clone(),
    }
}

pub fn from_timer(t: &proto::Timer) -> core::Timer {
    core::Timer {
        id: t.id.clone(),
        kind: match t.kind() {
            proto::TimerKind::Reminder => TimerKind::Reminder,
            _ => TimerKind::Expiry,
        },
        event: t.event.clone(),
        due: from_timestamp(t.due_time.as_ref()),
        state: t.state.clone(),
        calendar_version: t.calendar_version.clone(),
    }
}

/// A core case as its record; `version` and `head_hash` are the store's.
pub fn case(c: &core::Case, version: u32, head_hash: Vec<u8>) -> proto::Case {
    proto::Case {
        id: c.id.clone(),
        workflow: c.workflow.clone(),
        workflow_version: version,
        workflow_digest: c.digest.clone(),
        state: c.state.clone(),
        outcome: c.outcome.clone().unwrap_or_default(),
        variables: Some(btree_struct(&c.vars)),
        bindings: c.bindings.clone(),
        sequence: c.seq,
        signatures: c
            .signatures
            .iter()
            .map(|(role, s)| proto::Signature {
                role: role.clone(),
                agency: s.agency.clone(),
                approved: s.approved,
                sign_time: Some(timestamp(s.at)),
            })
            .collect(),
        children: c
            .children
            .iter()
            .map(|ch| proto::ChildCase {
                case_id: ch.id.clone(),
                workflow: ch.workflow.clone(),
                outcome: ch.outcome.clone().unwrap_or_default(),
            })
            .collect(),
        parent: c.parent.clone().unwrap_or_default(),
        timers: c.timers.iter().map(timer).collect(),
        create_time: Some(timestamp(c.started_at)),
        update_time: Some(timestamp(c.updated_at)),
        head_hash,
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// The text a searchable variable's value is indexed and filtered under: a
/// string as itself, any other value as JSON text; none for an unset one.
pub fn indexed_text(value: Json) -> Option<String> {
    match value {
        Json::Null => None,
        Json::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

pub fn from_case(c: &proto::Case) -> core::Case {
    core::Case {
        id: c.id.clone(),
        workflow: c.workflow.clone(),
        digest: c.workflow_digest.clone(),
        state: c.state.clone(),
        outcome: non_empty(&c.outcome),
        vars: from_struct(c.variables.as_ref()).into_iter().collect(),
        bindings: c.bindings.clone(),
        seq: c.sequence,
        signatures: c
            .signatures
            .iter()
            .map(|s| {
                (
                    s.role.clone(),
                    core::Signature {
                        agency: s.agency.clone(),
                        approved: s.approved,
                        at: from_timestamp(s.sign_time.as_ref()),
                    },
                )
            })
            .collect(),
        children: c
            .children
            .iter()
            .map(|ch| core::ChildRef {
                id: ch.case_id.clone(),
                workflow: ch.workflow.clone(),
                outcome: non_empty(&ch.outcome),
            })
            .collect(),
        parent: non_empty(&c.parent),
        timers: c.timers.iter().map(from_timer).collect(),
        started_at: from_timestamp(c.create_time.as_ref()),
        updated_at: from_timestamp(c.update_time.as_ref()),
    }
}

fn actor(a: &Actor) -> proto::Actor {
    use proto::actor::Kind as K;
    proto::Actor {
        kind: Some(match a {
            Actor::Agency(id) => K::Agency(id.clone()),
            Actor::Timer(id) => K::Timer(id.clone()),
            Actor::Engine => K::Engine(true),
        }),
    }
}

pub fn from_actor(a: Option<&proto::Actor>) -> Actor {
    use proto::actor::Kind as K;
    match a.and_then(|a| a.kind.as_ref()) {
        Some(K::Agency(id)) => Actor::Agency(id.clone()),
        Some(K::Timer(id)) => Actor::Timer(id.clone()),
        _ => Actor::Engine,
    }
}

/// A core entry as its record, chained to `previous_hash` and sealed with its own hash.
pub fn entry(
    case_id: &str,
    e: &core::Entry,
    request_id: &str,
    previous_hash: Vec<u8>,
) -> proto::HistoryEntry {
    let mut record = proto::HistoryEntry {
        case_id: case_id.to_owned(),
        sequence: e.seq,
        time: Some(timestamp(e.at)),
        actor: Some(actor(&e.actor)),
        event: e.event.clone(),
        payload: Some(match &e.payload {
            Json::Object(map) => to_struct(map),
            _ => prost_types::Struct::default(),
        }),
        from_state: e.from.clone(),
        to_state: e.to.clone(),
        variables_changed: Some(btree_struct(&e.vars_changed)),
        bindings_changed: e.bindings_changed.clone(),
        timers_set: e.timers_set.iter().map(timer).collect(),
        timers_cancelled: e.timers_cancelled.clone(),
        calendar_version: e.calendar_version.clone().unwrap_or_default(),
        workflow_digest: e.digest.clone(),
        request_id: request_id.to_owned(),
        previous_hash,
        hash: Vec::new(),
    };
    record.hash = entry_hash(&record).to_vec();
    record
}

/// The record as the core's entry (for replay).
pub fn from_entry(r: &proto::HistoryEntry) -> core::Entry {
    core::Entry {
        seq: r.sequence,
        at: from_timestamp(r.time.as_ref()),
        actor: from_actor(r.actor.as_ref()),
        event: r.event.clone(),
        payload: Json::Object(from_struct(r.payload.as_ref())),
        from: r.from_state.clone(),
        to: r.to_state.clone(),
        vars_changed: from_struct(r.variables_changed.as_ref())
            .into_iter()
            .collect(),
        bindings_changed: r.bindings_changed.clone(),
        timers_set: r.timers_set.iter().map(from_timer).collect(),
        timers_cancelled: r.timers_cancelled.clone(),
        calendar_version: non_empty(&r.calendar_version),
        digest: r.workflow_digest.clone(),
    }
}

fn timer_json(t: &proto::Timer) -> Json {
    json!({
        "id": t.id,
        "kind": match t.kind() {
            proto::TimerKind::Expiry => "expiry",
            proto::TimerKind::Reminder => "reminder",
            proto::TimerKind::Unspecified => "unspecified",
        },
        "event": t.event,
        "due_time": rfc3339(t.due_time.as_ref()),
        "state": t.state,
        "calendar_version": t.calendar_version,
    })
}

/// A history entry as the JSON object of exports and of the canonical encoding.
pub fn entry_json(r: &proto::HistoryEntry) -> Json {
    let actor = match from_actor(r.actor.as_ref()) {
        Actor::Agency(id) => json!({"agency": id}),
        Actor::Timer(id) => json!({"timer": id}),
        Actor::Engine => json!({"engine": true}),
    };
    json!({
        "case_id": r.case_id,
        "sequence": r.sequence,
        "time": rfc3339(r.time.as_ref()),
        "actor": actor,
        "event": r.event,
        "payload": Json::Object(from_struct(r.payload.as_ref())),
        "from_state": r.from_state,
        "to_state": r.to_state,
        "variables_changed": Json::Object(from_struct(r.variables_changed.as_ref())),
        "bindings_changed": r.bindings_changed,
        "timers_set": r.timers_set.iter().map(timer_json).collect::<Vec<_>>(),
        "timers_cancelled": r.timers_cancelled,
        "calendar_version": r.calendar_version,
        "workflow_digest": r.workflow_digest,
        "request_id": r.request_id,
        "previous_hash": hex::encode(&r.previous_hash),
        "hash": hex::encode(&r.hash),
    })
}

/// The canonical bytes of an entry: its JSON without `hash`, keys sorted, compact.
#[cfg(test)]
pub(crate) fn canonical_bytes(r: &proto::HistoryEntry) -> Vec<u8> {
    let mut value = entry_json(r);
    if let Json::Object(map) = &mut value {
        map.remove("hash");
    }
    // serde_json's map is ordered by key, and `to_vec` writes no whitespace.
    serde_json::to_vec(&value).unwrap_or_default()
}

/// SHA-256 of the canonical bytes, written by [`super::canonical::Encoder`]
/// (byte for byte what `canonical_bytes` defines, without building the JSON
/// value).
pub fn entry_hash(r: &proto::HistoryEntry) -> [u8; 32] {
    super::canonical::Encoder::new().hash(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_struct() {
        let v = json!({"a": 1, "b": "县", "c": [true, null, -7], "d": {"e": "12.50"}, "big": MAX_EXACT_INTEGER});
        let Json::Object(map) = &v else {
            unreachable!()
        };
        assert_eq!(Json::Object(from_struct(Some(&to_struct(map)))), v);
    }

    #[test]
    fn canonical_bytes_sort_keys_and_keep_chinese_text() {
        let record = proto::HistoryEntry {
            case_id: "c1".into(),
            sequence: 2,
            event: "classify".into(),
            payload: Some(to_struct(
                json!({"z": 1, "level": "县级"})
                    .as_object()
                    .expect("object"),
            )),
            previous_hash: vec![0xab; 2],
            ..Default::default()
        };
        let text = String::from_utf8(canonical_bytes(&record)).expect("utf-8");
        assert!(text.starts_with(r#"{"actor":{"engine":true},"bindings_changed":{},"calendar_version":"","case_id":"c1","event":"classify","from_state":"","payload":{"level":"县级","z":1},"previous_hash":"abab","#), "{text}");
        assert!(!text.contains("\"hash\""));
        assert!(!text.contains(' '));
        // The hash seals every field: change one, and it changes.
        let mut altered = record.clone();
        altered.sequence = 3;
        assert_ne!(entry_hash(&record), entry_hash(&altered));
    }
}
