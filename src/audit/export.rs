//! Histories as JSON Lines: one entry per line, exactly
//! `records::entry_json` serialised compactly (keys sorted, hashes included),
//! cases in id order and each case's entries in sequence order, so that an
//! outside tool can recompute every hash and chain (tools/verify_export.py).
//! Each case's entries end with its head line, and the export ends with one
//! end line that counts what came before it and seals it with SHA-256, so
//! that an export cut short, or with whole cases taken out, is seen.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::source::{CaseEvent, RecordSource, visit_case};
use super::{AuditError, Result};
use crate::store::canonical::Encoder;
use crate::store::{proto, records};

/// Which entries to export. Every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFilter {
    /// Only this case.
    pub case: Option<String>,
    /// Only cases of this workflow.
    pub workflow: Option<String>,
    /// Only cases in which this agency holds (or held) a role, or acted.
    pub agency: Option<String>,
    /// Only cases whose current state is this one.
    pub state: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only entries before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only cases in which this agency holds a role now: what the gRPC
    /// server lets an agency see. Records that cannot be read are then left
    /// out without a word, since nothing tells whose they are.
    pub visible_to: Option<String>,
}

impl ExportFilter {
    fn filters_cases(&self) -> bool {
        self.workflow.is_some()
            || self.agency.is_some()
            || self.state.is_some()
            || self.visible_to.is_some()
    }

    fn keeps_time(&self, entry: &proto::HistoryEntry) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let t = records::from_timestamp(entry.time.as_ref());
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }
}

/// A record left out of an export because it could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRecord {
    pub case_id: String,
    /// The sequence number it is stored under; `None` for a case record or
    /// an unknown position.
    pub sequence: Option<u64>,
    pub reason: String,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportSummary {
    /// Cases with at least one entry written.
    pub cases: u64,
    /// Lines written.
    pub entries: u64,
    /// Records that could not be exported (they do not decode).
    pub skipped: Vec<SkippedRecord>,
    /// SHA-256 (hex) of every byte of the export before its end line, which
    /// carries it too: kept apart from the file (printed by `govflow audit
    /// export`), it shows whether the file is still the one written.
    pub sha256: String,
}

/// Whether the entry shows `agency` acting or being bound to a role.
fn involves(entry: &proto::HistoryEntry, agency: &str) -> bool {
    let acted = matches!(
        entry.actor.as_ref().and_then(|a| a.kind.as_ref()),
        Some(proto::actor::Kind::Agency(a)) if a == agency
    );
    acted || entry.bindings_changed.values().any(|a| a == agency)
}

/// Whether a case's lines are written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Yes,
    No,
    /// Only if one of its entries involves the agency of the filter: its
    /// lines wait in a buffer until the case ends.
    IfInvolved,
}

/// The line that closes a case's entries: the sequence and hash of the
/// last entry its record seals (`head_hash`), so that an export shows
/// entries removed from, rewritten at or added to the end of a history.
fn head_line(case_id: &str, (sequence, hash): &(u64, Vec<u8>)) -> Vec<u8> {
    let mut line = serde_json::to_vec(&serde_json::json!({
        "case_id": case_id,
        "head_sequence": sequence,
        "head_hash": hex::encode(hash),
    }))
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// The line that ends an export: what it holds and the digest of every byte
/// before this line, so that an export cut short (even at a case boundary)
/// or with whole cases removed does not pass for a complete one.
fn end_line(summary: &ExportSummary) -> Vec<u8> {
    let mut line = serde_json::to_vec(&serde_json::json!({
        "end_of_export": true,
        "cases": summary.cases,
        "entries": summary.entries,
        "left_out": summary.skipped.len(),
        "sha256": summary.sha256,
    }))
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// A writer that hashes every byte it passes on.
struct Digesting<W> {
    inner: W,
    digest: Sha256,
}

impl<W: Write> Write for Digesting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.digest.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the histories selected by `filter` to `out` as JSON Lines,
/// streaming case by case (one sweep of the store for a whole export).
/// Records that do not decode are left out and listed in the summary; the
/// export goes on.
pub fn export(
    source: &dyn RecordSource,
    filter: &ExportFilter,
    out: &mut dyn Write,
) -> Result<ExportSummary> {
    if let Some(workflow) = &filter.workflow {
        super::known_workflow(source, workflow)?;
    }
    if let Some(state) = &filter.state {
        super::known_state(source, filter.workflow.as_deref(), state)?;
    }
    let mut out = Digesting {
        inner: std::io::BufWriter::with_capacity(1 << 16, out),
        digest: Sha256::new(),
    };
    let mut summary = ExportSummary::default();
    let mut encoder = Encoder::new();
    let mut id = String::new();
    let mut keep = Keep::No;
    let mut involved = false;
    let mut pending: Vec<u8> = Vec::new();
    let mut written = 0u64;
    // The sequence and hash the case record seals; its line is made only
    // for a case that is exported.
    let mut head: Option<(u64, Vec<u8>)> = None;
    let mut failure: Option<std::io::Error> = None;
    let mut visit = |event: CaseEvent<'_>| match event {
        CaseEvent::Begin { id: begun, record } => {
            id.clear();
            id.push_str(begun);
            written = 0;
            involved = false;
            pending.clear();
            head = match &record {
                Some(Ok(case)) => Some((case.sequence, case.head_hash.clone())),
                _ => None,
            };
            keep = match record {
                Some(Ok(case)) => {
                    if filter
                        .workflow
                        .as_ref()
                        .is_some_and(|w| case.workflow != *w)
                        || filter.state.as_ref().is_some_and(|s| case.state != *s)
                        || filter
                            .visible_to
                            .as_ref()
                            .is_some_and(|a| !case.bindings.values().any(|b| b == a))
                    {
                        Keep::No
                    } else {
                        match &filter.agency {
                            Some(a) if !case.bindings.values().any(|b| b == a) => Keep::IfInvolved,
                            _ => Keep::Yes,
                        }
                    }
                }
                Some(Err(_)) if filter.visible_to.is_some() => Keep::No,
                Some(Err(message)) => {
                    summary.skipped.push(SkippedRecord {
                        case_id: id.clone(),
                        sequence: None,
                        reason: format!("the case record {message}"),
                    });
                    if filter.filters_cases() {
                        Keep::No
                    } else {
                        Keep::Yes
                    }
                }
                // History without a case record: exported only unfiltered.
                None => {
                    if filter.filters_cases() {
                        Keep::No
                    } else {
                        Keep::Yes
                    }
                }
            };
        }
        CaseEvent::Entry(raw) => match raw.entry {
            Ok(entry) => {
                if keep == Keep::No || failure.is_some() {
                    return;
                }
                if keep == Keep::IfInvolved
                    && let Some(agency) = &filter.agency
                {
                    involved |= involves(entry, agency);
                }
                if !filter.keeps_time(entry) {
                    return;
                }
                let line = encoder.export_line(entry);
                written += 1;
                if keep == Keep::IfInvolved {
                    pending.extend_from_slice(line);
                    pending.push(b'\n');
                } else if let Err(e) = out.write_all(line).and_then(|()| out.write_all(b"\n")) {
                    failure = Some(e);
                }
            }
            Err(message) => {
                if keep != Keep::No {
                    summary.skipped.push(SkippedRecord {
                        case_id: id.clone(),
                        sequence: raw.slot,
                        reason: format!("the history record {message}"),
                    });
                }
            }
        },
        CaseEvent::End => {
            if keep == Keep::IfInvolved && !involved {
                return;
            }
            if keep != Keep::No && written > 0 {
                if let Some(head) = &head {
                    pending.extend_from_slice(&head_line(&id, head));
                }
                if let Err(e) = out.write_all(&pending) {
                    failure.get_or_insert(e);
                }
            }
            if keep != Keep::No && written > 0 {
                summary.cases += 1;
                summary.entries += written;
            }
        }
    };
    match &filter.case {
        Some(one) => {
            let mut found = false;
            visit_case(source, one, &mut |event| {
                match &event {
                    CaseEvent::Begin {
                        record: Some(_), ..
                    }
                    | CaseEvent::Entry(_) => found = true,
                    _ => {}
                }
                visit(event);
            })?;
            if !found {
                return Err(AuditError::NotFound(one.clone()));
            }
        }
        None => source.visit_range(None, None, &mut visit)?,
    }
    if let Some(e) = failure {
        return Err(AuditError::Write(e));
    }
    summary.sha256 = hex::encode(out.digest.finalize());
    let mut out = out.inner;
    out.write_all(&end_line(&summary))
        .and_then(|()| out.flush())
        .map_err(AuditError::Write)?;
    Ok(summary)
}
