//! The canonical encoding of a history entry, written straight from the
//! record into a reused buffer: what the engine hashes each step with, and
//! what verify and export use.
//!
//! `records::canonical_bytes` (kept for the tests) is the definition: it builds the entry as a `serde_json` value and
//! serialises it. That allocates every map and string of every entry twice,
//! so this module writes the same bytes
//! directly: members in sorted order, strings escaped as `serde_json` (and
//! Python's `json.dumps(..., ensure_ascii=False)`) escape them, numbers
//! formatted as [`records::from_value`](crate::store::records::from_value)
//! turns them into JSON. The tests compare both encoders byte for byte.

use std::io::Write as _;

use chrono::{Datelike, Timelike};
use prost_types::value::Kind;
use sha2::{Digest, Sha256};

use crate::lang::value::MAX_EXACT_INTEGER;
use crate::store::proto;
use crate::store::records;

/// A reusable encoder: one per thread, so that encoding allocates nothing
/// once its buffers have grown to the size of the largest entry.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The canonical bytes of `entry` (its JSON without `hash`), valid until
    /// the next call.
    pub fn canonical(&mut self, entry: &proto::HistoryEntry) -> &[u8] {
        self.buf.clear();
        write_entry(&mut self.buf, entry, false);
        &self.buf
    }

    /// The entry as one export line: exactly `records::entry_json`
    /// serialised compactly (keys sorted, `hash` included), without the newline.
    pub fn export_line(&mut self, entry: &proto::HistoryEntry) -> &[u8] {
        self.buf.clear();
        write_entry(&mut self.buf, entry, true);
        &self.buf
    }

    /// SHA-256 of the canonical bytes: what `records::entry_hash` computes.
    pub fn hash(&mut self, entry: &proto::HistoryEntry) -> [u8; 32] {
        Sha256::digest(self.canonical(entry)).into()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Bytes that a JSON string cannot hold as they are: `"`, `\\` and the
/// control characters.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Whether any of the 8 bytes of `w` needs escaping: most strings need none,
/// so they are scanned a word at a time.
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Some byte of `x` is below `n` (n <= 0x80) exactly when subtracting `n`
    // from every byte borrows into the high bit of a byte that had it clear.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    (below(w, 0x20) | below(quote, 1) | below(backslash, 1)) != 0
}

/// The position of the first byte at or after `from` that needs escaping.
fn next_escape(bytes: &[u8], mut from: usize) -> Option<usize> {
    while let Some(word) = bytes.get(from..from + 8) {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        if word_needs_escape(u64::from_le_bytes(w)) {
            break;
        }
        from += 8;
    }
    bytes[from..]
        .iter()
        .position(|&b| NEEDS_ESCAPE[usize::from(b)])
        .map(|offset| from + offset)
}

/// A JSON string as `serde_json` writes it: `"`, `\` and control characters
/// escaped (short forms where JSON has them, `\u00xx` otherwise), everything
/// else — including non-ASCII text — as is.
fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(i) = next_escape(bytes, start) {
        out.extend_from_slice(&bytes[start..i]);
        let b = bytes[i];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn write_key(out: &mut Vec<u8>, key: &str, first: bool) {
    if !first {
        out.push(b',');
    }
    write_str(out, key);
    out.push(b':');
}

fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
    out.push(b'"');
}

fn write_display(out: &mut Vec<u8>, value: impl std::fmt::Display) {
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{value}");
}

fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn write_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    write_u64(out, n.unsigned_abs());
}

/// `n` (below 10^width) with leading zeros.
fn write_padded(out: &mut Vec<u8>, n: u32, width: usize) {
    let mut digits = [b'0'; 10];
    let mut n = n;
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// `records::rfc3339` (chrono's `to_rfc3339_opts(AutoSi, true)`), without its String.
fn write_time(out: &mut Vec<u8>, t: Option<&prost_types::Timestamp>) {
    let dt = records::from_timestamp(t).naive_utc();
    let year = dt.year();
    out.push(b'"');
    if (0..=9999).contains(&year) {
        write_padded(out, year.unsigned_abs(), 4);
    } else {
        let _ = write!(out, "{year:+05}");
    }
    let (hour, min, mut sec) = (dt.hour(), dt.minute(), dt.second());
    let mut nano = dt.nanosecond();
    if nano >= 1_000_000_000 {
        sec += 1;
        nano -= 1_000_000_000;
    }
    for (sep, n) in [
        (b'-', dt.month()),
        (b'-', dt.day()),
        (b'T', hour),
        (b':', min),
        (b':', sec),
    ] {
        out.push(sep);
        write_padded(out, n, 2);
    }
    if nano != 0 {
        out.push(b'.');
        if nano.is_multiple_of(1_000_000) {
            write_padded(out, nano / 1_000_000, 3);
        } else if nano.is_multiple_of(1_000) {
            write_padded(out, nano / 1_000, 6);
        } else {
            write_padded(out, nano, 9);
        }
    }
    out.extend_from_slice(b"Z\"");
}

/// A protobuf value as `records::from_value` makes it JSON, serialised.
fn write_value(out: &mut Vec<u8>, v: &prost_types::Value) {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => out.extend_from_slice(b"null"),
        Some(Kind::BoolValue(true)) => out.extend_from_slice(b"true"),
        Some(Kind::BoolValue(false)) => out.extend_from_slice(b"false"),
        Some(Kind::NumberValue(f)) => {
            if f.fract() == 0.0 && f.abs() <= MAX_EXACT_INTEGER as f64 {
                write_i64(out, *f as i64);
            } else {
                match serde_json::Number::from_f64(*f) {
                    Some(n) => write_display(out, n),
                    None => out.extend_from_slice(b"null"),
                }
            }
        }
        Some(Kind::StringValue(s)) => write_str(out, s),
        Some(Kind::ListValue(list)) => {
            out.push(b'[');
            for (i, item) in list.values.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Some(Kind::StructValue(s)) => write_struct(out, Some(s)),
    }
}

/// A struct as an object; its fields are a `BTreeMap`, so already in key order.
fn write_struct(out: &mut Vec<u8>, s: Option<&prost_types::Struct>) {
    out.push(b'{');
    if let Some(s) = s {
        for (i, (k, v)) in s.fields.iter().enumerate() {
            write_key(out, k, i == 0);
            write_value(out, v);
        }
    }
    out.push(b'}');
}

fn write_timer(out: &mut Vec<u8>, t: &proto::Timer) {
    out.push(b'{');
    write_key(out, "calendar_version", true);
    write_str(out, &t.calendar_version);
    write_key(out, "due_time", false);
    write_time(out, t.due_time.as_ref());
    write_key(out, "event", false);
    write_str(out, &t.event);
    write_key(out, "id", false);
    write_str(out, &t.id);
    write_key(out, "kind", false);
    write_str(
        out,
        match t.kind() {
            proto::TimerKind::Expiry => "expiry",
            proto::TimerKind::Reminder => "reminder",
            proto::TimerKind::Unspecified => "unspecified",
        },
    );
    write_key(out, "state", false);
    write_str(out, &t.state);
    out.push(b'}');
}

/// The members of `records::entry_json`, in key order.
fn write_entry(out: &mut Vec<u8>, r: &proto::HistoryEntry, with_hash: bool) {
    use proto::actor::Kind as A;
    out.push(b'{');
    write_key(out, "actor", true);
    match r.actor.as_ref().and_then(|a| a.kind.as_ref()) {
        Some(A::Agency(id)) => {
            out.extend_from_slice(b"{\"agency\":");
            write_str(out, id);
            out.push(b'}');
        }
        Some(A::Timer(id)) => {
            out.extend_from_slice(b"{\"timer\":");
            write_str(out, id);
            out.push(b'}');
        }
        _ => out.extend_from_slice(b"{\"engine\":true}"),
    }
    write_key(out, "bindings_changed", false);
    out.push(b'{');
    for (i, (k, v)) in r.bindings_changed.iter().enumerate() {
        write_key(out, k, i == 0);
        write_str(out, v);
    }
    out.push(b'}');
    write_key(out, "calendar_version", false);
    write_str(out, &r.calendar_version);
    write_key(out, "case_id", false);
    write_str(out, &r.case_id);
    write_key(out, "event", false);
    write_str(out, &r.event);
    write_key(out, "from_state", false);
    write_str(out, &r.from_state);
    if with_hash {
        write_key(out, "hash", false);
        write_hex(out, &r.hash);
    }
    write_key(out, "payload", false);
    write_struct(out, r.payload.as_ref());
    write_key(out, "previous_hash", false);
    write_hex(out, &r.previous_hash);
    write_key(out, "request_id", false);
    write_str(out, &r.request_id);
    write_key(out, "sequence", false);
    write_u64(out, r.sequence);
    write_key(out, "time", false);
    write_time(out, r.time.as_ref());
    write_key(out, "timers_cancelled", false);
    out.push(b'[');
    for (i, id) in r.timers_cancelled.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, id);
    }
    out.push(b']');
    write_key(out, "timers_set", false);
    out.push(b'[');
    for (i, t) in r.timers_set.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_timer(out, t);
    }
    out.push(b']');
    write_key(out, "to_state", false);
    write_str(out, &r.to_state);
    write_key(out, "variables_changed", false);
    write_struct(out, r.variables_changed.as_ref());
    write_key(out, "workflow_digest", false);
    write_str(out, &r.workflow_digest);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value as Json, json};

    fn sample() -> proto::HistoryEntry {
        let payload = json!({
            "text": "进展\n\"quoted\" \\ tab\t bell\u{7} del\u{7f} nul\u{0}",
            "n": 12, "neg": -3, "half": 0.5, "big": 1e300, "list": [true, null, "县级", {"z": 1, "a": [] }],
            "nested": {"ü": "é", "A": "b", "a": "c"}
        });
        let mut e = records::entry(
            "case/1",
            &crate::engine::core::Entry {
                seq: 7,
                at: chrono::DateTime::from_timestamp(1_591_000_000, 123_000_000).expect("time"),
                actor: crate::engine::core::Actor::Agency("hebei.sjz".into()),
                event: "note".into(),
                payload: payload.clone(),
                from: "open".into(),
                to: "open".into(),
                vars_changed: [
                    ("notes".to_owned(), json!(3)),
                    ("x".to_owned(), json!("12.50")),
                ]
                .into(),
                bindings_changed: [
                    ("supervisor".to_owned(), "hebei".to_owned()),
                    ("handler".to_owned(), "hebei.sjz".to_owned()),
                ]
                .into(),
                timers_set: vec![crate::engine::core::Timer {
                    id: "7:expiry".into(),
                    kind: crate::engine::core::TimerKind::Expiry,
                    event: "escalate".into(),
                    due: chrono::DateTime::from_timestamp(1_591_100_000, 0).expect("time"),
                    state: "open".into(),
                    calendar_version: "cal.csv@0123456789ab".into(),
                }],
                timers_cancelled: vec!["3:expiry".into(), "3:reminder:0".into()],
                calendar_version: Some("cal.csv@0123456789ab".into()),
                digest: "ab".repeat(32),
            },
            "req-1",
            vec![0x5a; 32],
        );
        e.timers_set.push(proto::Timer {
            kind: 99,
            ..Default::default()
        });
        e
    }

    #[test]
    fn matches_the_reference_encoding_and_hash() {
        let mut enc = Encoder::new();
        for entry in [sample(), proto::HistoryEntry::default()] {
            assert_eq!(
                String::from_utf8_lossy(enc.canonical(&entry)),
                String::from_utf8_lossy(&records::canonical_bytes(&entry))
            );
            assert_eq!(enc.hash(&entry), records::entry_hash(&entry));
            let line = serde_json::to_vec(&records::entry_json(&entry)).expect("json");
            assert_eq!(
                String::from_utf8_lossy(enc.export_line(&entry)),
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn every_control_character_is_escaped_like_serde_json() {
        let mut out = Vec::new();
        let all: String = (0u8..=0x7f).map(char::from).collect::<String>() + "县级€😀\u{2028}";
        write_str(&mut out, &all);
        assert_eq!(out, serde_json::to_vec(&Json::String(all)).expect("json"));
    }

    fn value_strategy() -> impl Strategy<Value = prost_types::Value> {
        let leaf = prop_oneof![
            Just(Kind::NullValue(0)),
            any::<bool>().prop_map(Kind::BoolValue),
            any::<f64>().prop_map(Kind::NumberValue),
            (-1_000_000i64..1_000_000).prop_map(|i| Kind::NumberValue(i as f64)),
            ".*".prop_map(Kind::StringValue),
        ]
        .prop_map(|k| prost_types::Value { kind: Some(k) });
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|values| prost_types::Value {
                    kind: Some(Kind::ListValue(prost_types::ListValue { values }))
                }),
                prop::collection::btree_map(".*", inner, 0..4).prop_map(|fields| {
                    prost_types::Value {
                        kind: Some(Kind::StructValue(prost_types::Struct { fields })),
                    }
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_entry_encodes_like_the_reference(
            case_id in ".*",
            event in ".*",
            sequence in any::<u64>(),
            seconds in -100_000_000_000i64..300_000_000_000,
            nanos in 0i32..1_000_000_000,
            payload in prop::collection::btree_map(".*", value_strategy(), 0..5),
            bindings in prop::collection::btree_map(".*", ".*", 0..3),
            previous in prop::collection::vec(any::<u8>(), 0..40),
            actor in 0u8..4,
        ) {
            use proto::actor::Kind as A;
            let entry = proto::HistoryEntry {
                case_id: case_id.clone(),
                sequence,
                time: Some(prost_types::Timestamp { seconds, nanos }),
                actor: match actor {
                    0 => None,
                    1 => Some(proto::Actor { kind: Some(A::Agency(event.clone())) }),
                    2 => Some(proto::Actor { kind: Some(A::Timer(case_id)) }),
                    _ => Some(proto::Actor { kind: Some(A::Engine(false)) }),
                },
                event,
                payload: Some(prost_types::Struct { fields: payload }),
                bindings_changed: bindings,
                previous_hash: previous.clone(),
                hash: previous,
                ..Default::default()
            };
            let mut enc = Encoder::new();
            prop_assert_eq!(enc.canonical(&entry).to_vec(), records::canonical_bytes(&entry));
            let line = serde_json::to_vec(&records::entry_json(&entry)).expect("json");
            prop_assert_eq!(enc.export_line(&entry).to_vec(), line);
        }
    }
}
