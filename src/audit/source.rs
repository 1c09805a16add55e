//! Where the audit reads records from.
//!
//! The engine's [`Store`] trait hands out decoded records and fails a whole
//! history when one entry does not decode; an audit must go on past a bad
//! record and must see the key each entry is stored under (an entry stored
//! under another entry's sequence number has been moved). [`RecordSource`]
//! is the small read-only interface the audit needs. [`SledSource`] reads a
//! sled store folder directly, key by key (the precise one, used by the
//! command line); [`StoreSource`] adapts any [`Store`], with what that trait
//! can tell (see its notes).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::path::Path;

use prost::Message;

use super::{AuditError, Result};
use crate::store::keys::{SEP, case_key, history_prefix, prefix_end, split_history_key};
use crate::store::{CaseFilter, Store, StoreError, open_db, proto};

/// One stored history record, as the source found it.
#[derive(Debug)]
pub struct RawEntry<'a> {
    /// The sequence number of the key the record is stored under, when the
    /// source knows it; `None` when its position is unknown.
    pub slot: Option<u64>,
    /// The decoded entry, or why it does not decode.
    pub entry: std::result::Result<&'a proto::HistoryEntry, &'a str>,
}

/// A case record as stored: decoded, or why it does not decode.
pub type CaseRecord = std::result::Result<proto::Case, String>;

/// What [`RecordSource::visit_range`] meets, case after case.
#[derive(Debug)]
// One `Begin` per case, handed over by value and never stored in bulk: no
// point boxing the record.
#[allow(clippy::large_enum_variant)]
pub enum CaseEvent<'a> {
    /// A case starts: its id and its record (`None` when it has none).
    Begin {
        id: &'a str,
        record: Option<CaseRecord>,
    },
    /// One of its history records, in key order.
    Entry(RawEntry<'a>),
    /// The case ends.
    End,
}

/// The records an audit reads. Read-only; implementations must be usable
/// from several threads at once (verification runs in parallel).
pub trait RecordSource: Sync {
    /// Ids of the cases that have a case record, in order, after `after`.
    fn case_ids(&self, after: &str, limit: usize) -> Result<Vec<String>>;
    /// The case record, `None` when there is none.
    fn case_record(&self, id: &str) -> Result<Option<CaseRecord>>;
    /// Visits the history records of a case in storage (key) order, until
    /// `visit` breaks.
    fn visit_history(
        &self,
        id: &str,
        visit: &mut dyn FnMut(RawEntry<'_>) -> ControlFlow<()>,
    ) -> Result<()>;
    /// Every deployed workflow version.
    fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>>;
    /// Ids after `after`, in order, of cases that may be of `workflow` (a
    /// superset: callers read each record to be sure). The default is every
    /// case; a source with a workflow index narrows it.
    fn candidate_case_ids(&self, workflow: &str, after: &str, limit: usize) -> Result<Vec<String>> {
        let _ = workflow;
        self.case_ids(after, limit)
    }
    /// Case ids, in increasing order, that cut the store into about `parts`
    /// ranges of similar size for a parallel pass: `visit_range(None,
    /// Some(cuts[0]))`, `visit_range(Some(cuts[0]), Some(cuts[1]))`, …,
    /// `visit_range(Some(cuts[last]), None)` together visit every case once.
    /// The balance only affects speed. The default lists every case id.
    fn cuts(&self, parts: usize) -> Result<Vec<String>> {
        let mut ids: Vec<String> = Vec::new();
        loop {
            let page = self.case_ids(ids.last().map_or("", String::as_str), 10_000)?;
            if page.is_empty() {
                break;
            }
            ids.extend(page);
        }
        let step = ids.len().div_ceil(parts.max(1)).max(1);
        Ok(ids.into_iter().skip(step).step_by(step).collect())
    }
    /// Visits every case whose id lies in `[from, to)` (`None`: no bound)
    /// in id order — cases with a case record, and (where the source can
    /// tell) histories without one: its record, then its history records.
    /// What a whole-store pass reads. The default goes case by case.
    fn visit_range(
        &self,
        from: Option<&str>,
        to: Option<&str>,
        visit: &mut dyn FnMut(CaseEvent<'_>),
    ) -> Result<()> {
        let mut ids = Vec::new();
        if let Some(from) = from
            && self.case_record(from)?.is_some()
        {
            ids.push(from.to_owned());
        }
        let mut after = from.unwrap_or("").to_owned();
        'pages: loop {
            let page = self.case_ids(&after, 1_000)?;
            let Some(last) = page.last() else {
                break;
            };
            after.clone_from(last);
            for id in page {
                if to.is_some_and(|to| id.as_str() >= to) {
                    break 'pages;
                }
                ids.push(id);
            }
        }
        for id in &ids {
            visit_case(self, id, visit)?;
        }
        Ok(())
    }
}

/// Visits one case: its record, then its history records.
pub fn visit_case<S: RecordSource + ?Sized>(
    source: &S,
    id: &str,
    visit: &mut dyn FnMut(CaseEvent<'_>),
) -> Result<()> {
    visit(CaseEvent::Begin {
        id,
        record: source.case_record(id)?,
    });
    source.visit_history(id, &mut |raw| {
        visit(CaseEvent::Entry(raw));
        ControlFlow::Continue(())
    })?;
    visit(CaseEvent::End);
    Ok(())
}

/// Reads a sled store folder directly, with the key layout of
/// `store::SledStore` (`C·{case}` case records, `H·{case}·{sequence u64 BE}`
/// history entries, `W·{workflow}·{version}` workflow versions).
///
/// sled takes a lock on its folder: a store that a running server holds
/// cannot be opened (audit a copy, or stop the server).
pub struct SledSource {
    db: sled::Db,
    /// The copy a read-only store is audited in; removed after `db` closes
    /// (fields drop in order).
    _copy: Option<tempfile::TempDir>,
}

/// Whether opening failed only because sled may not write where the store
/// is (a read-only backup or snapshot): sled opens its files for writing.
fn needs_write_access(e: &StoreError) -> bool {
    use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem};
    match e {
        StoreError::Sled(sled::Error::Io(io)) => {
            matches!(io.kind(), ReadOnlyFilesystem | PermissionDenied)
        }
        StoreError::Io { source, .. } => {
            matches!(source.kind(), ReadOnlyFilesystem | PermissionDenied)
        }
        _ => false,
    }
}

/// Copies the files of the store folder `from` (sled keeps no subfolders
/// but `blobs`) into `to`.
fn copy_store(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_store(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// sled's page cache when auditing a store folder.
const AUDIT_CACHE_BYTES: u64 = 128 << 20;

/// A byte string strictly between `a` and `b` when `a < b`: their mean, read
/// as base-256 fractions (`0.a₀a₁…`).
fn midpoint(a: &[u8], b: &[u8]) -> Vec<u8> {
    let n = a.len().max(b.len());
    let digit = |s: &[u8], i: usize| u16::from(s.get(i).copied().unwrap_or(0));
    let mut sum = vec![0u16; n];
    let mut carry = 0u16;
    for i in (0..n).rev() {
        let d = digit(a, i) + digit(b, i) + carry;
        sum[i] = d & 0xff;
        carry = d >> 8;
    }
    let mut mid = Vec::with_capacity(n + 1);
    let mut rest = carry;
    for d in sum {
        let v = rest * 256 + d;
        mid.push((v / 2) as u8);
        rest = v % 2;
    }
    if rest == 1 {
        mid.push(0x80);
    }
    mid
}

/// Opens a copy of the store in `dir`, for a store sled may not write.
fn open_copy(dir: &Path) -> Result<(sled::Db, tempfile::TempDir)> {
    let copy = tempfile::tempdir().map_err(|e| AuditError::Store(io_error(dir, e)))?;
    tracing::warn!(
        "the store at {} cannot be written, and sled opens a store only to write: auditing a copy of it in {}",
        dir.display(),
        copy.path().display()
    );
    copy_store(dir, copy.path()).map_err(|e| AuditError::Store(io_error(dir, e)))?;
    let db = open_db(copy.path(), AUDIT_CACHE_BYTES).map_err(audit_error)?;
    Ok((db, copy))
}

fn audit_error(e: StoreError) -> AuditError {
    match e {
        StoreError::InUse { path } => AuditError::StoreInUse(path),
        StoreError::Sled(e) => AuditError::Sled(e),
        other => AuditError::Store(other),
    }
}

fn io_error(dir: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: dir.display().to_string(),
        source,
    }
}

fn decode_error(e: &prost::DecodeError) -> String {
    format!("does not decode: {e}")
}

impl SledSource {
    /// Opens the store in `dir`, which must already be one (nothing is created).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join("db").is_file() || !dir.join("conf").is_file() {
            return Err(AuditError::NoStore(dir.display().to_string()));
        }
        // An audit reads each record once, in key order: a large page cache
        // only costs memory and page faults (sled's default is 1 GiB).
        let (db, copy) = match open_db(dir, AUDIT_CACHE_BYTES) {
            Ok(db) => (db, None),
            Err(e) if needs_write_access(&e) => {
                let (db, copy) = open_copy(dir)?;
                (db, Some(copy))
            }
            Err(e) => return Err(audit_error(e)),
        };
        if db.scan_prefix([b'W', SEP]).next().transpose()?.is_none() {
            return Err(AuditError::EmptyStore(dir.display().to_string()));
        }
        Ok(SledSource { db, _copy: copy })
    }

    /// Audits a sled database that is already open.
    pub fn from_db(db: sled::Db) -> Self {
        SledSource { db, _copy: None }
    }

    /// The case id of the first history record at or after `id`'s, or of
    /// the last one before it (`before`).
    fn history_id_near(&self, id: &[u8], before: bool) -> Result<Option<Vec<u8>>> {
        let mut at = vec![b'H', SEP];
        at.extend_from_slice(id);
        at.push(SEP);
        let item = if before {
            self.db.range(vec![b'H', SEP]..at).next_back()
        } else {
            self.db.range(at..prefix_end(&[b'H', SEP])).next()
        };
        Ok(item
            .transpose()?
            .map(|(k, _)| split_history_key(&k).0.to_vec()))
    }

    /// Cuts for the histories of the cases `first..=last` (ids of stored
    /// history records), `depth` halvings deep: the first history record at
    /// or after their midpoint starts the second half.
    fn bisect(&self, first: &[u8], last: &[u8], depth: u32, cuts: &mut Vec<String>) -> Result<()> {
        if depth == 0 || first >= last {
            return Ok(());
        }
        // `first < mid <= last`, so `first < cut <= last`; checked all the
        // same, as a malformed key could break the order of ids.
        let Some(cut) = self.history_id_near(&midpoint(first, last), false)? else {
            return Ok(());
        };
        if cut.as_slice() <= first || cut.as_slice() > last {
            return Ok(());
        }
        let Some(before) = self.history_id_near(&cut, true)? else {
            return Ok(());
        };
        self.bisect(first, &before, depth - 1, cuts)?;
        // An id that is not UTF-8 (a damaged key) cannot bound a range.
        if let Ok(id) = std::str::from_utf8(&cut) {
            cuts.push(id.to_owned());
        }
        self.bisect(&cut, last, depth - 1, cuts)
    }

    /// The number of history records in the store (a key scan).
    pub fn history_len(&self) -> Result<u64> {
        let mut n = 0;
        for item in self.db.scan_prefix([b'H', SEP]) {
            item?;
            n += 1;
        }
        Ok(n)
    }
}

impl RecordSource for SledSource {
    fn case_ids(&self, after: &str, limit: usize) -> Result<Vec<String>> {
        use std::ops::Bound;
        let prefix = [b'C', SEP];
        let start = if after.is_empty() {
            Bound::Included(prefix.to_vec())
        } else {
            Bound::Excluded(case_key(after))
        };
        let mut ids = Vec::new();
        for item in self
            .db
            .range::<Vec<u8>, _>((start, Bound::Excluded(prefix_end(&prefix))))
        {
            if ids.len() >= limit {
                break;
            }
            let (k, _) = item?;
            ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(ids)
    }

    fn case_record(&self, id: &str) -> Result<Option<CaseRecord>> {
        Ok(self
            .db
            .get(case_key(id))?
            .map(|bytes| proto::Case::decode(&*bytes).map_err(|e| decode_error(&e))))
    }

    fn visit_history(
        &self,
        id: &str,
        visit: &mut dyn FnMut(RawEntry<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        let prefix = history_prefix(id);
        let mut entry = proto::HistoryEntry::default();
        for item in self.db.range(prefix.clone()..prefix_end(&prefix)) {
            let (k, v) = item?;
            let rest = &k[prefix.len()..];
            let slot = <[u8; 8]>::try_from(rest).ok().map(u64::from_be_bytes);
            entry.clear();
            let flow = match entry.merge(&*v) {
                Ok(()) => visit(RawEntry {
                    slot,
                    entry: Ok(&entry),
                }),
                Err(e) => {
                    let message = decode_error(&e);
                    visit(RawEntry {
                        slot,
                        entry: Err(&message),
                    })
                }
            };
            if flow.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Without reading the store: the history keys are halved by probing,
    /// each half at the first case whose history starts at or after the
    /// midpoint of the first and last ids in it (a few hundred look-ups).
    /// History records are most of what a pass reads, so histories are what
    /// is cut evenly.
    fn cuts(&self, parts: usize) -> Result<Vec<String>> {
        let mut cuts = Vec::new();
        let first = self.history_id_near(b"", false)?;
        let last = self
            .db
            .scan_prefix([b'H', SEP])
            .next_back()
            .transpose()?
            .map(|(k, _)| split_history_key(&k).0.to_vec());
        if let (Some(first), Some(last)) = (first, last) {
            let depth = parts.max(1).next_power_of_two().trailing_zeros();
            self.bisect(&first, &last, depth, &mut cuts)?;
        }
        Ok(cuts)
    }

    /// Two sweeps side by side, one over the case records and one over the
    /// history records, merged by case id: no lookup or range per case, and
    /// histories without a case record are met on the way. Keys order as ids
    /// do (`{id}·` sorts like `{id}`: ids hold no 0 byte).
    fn visit_range(
        &self,
        from: Option<&str>,
        to: Option<&str>,
        visit: &mut dyn FnMut(CaseEvent<'_>),
    ) -> Result<()> {
        let bounds = |kind: u8, id: Option<&str>, end: bool| -> Vec<u8> {
            match id {
                Some(id) if kind == b'H' => history_prefix(id),
                Some(id) => case_key(id),
                None if end => prefix_end(&[kind, SEP]),
                None => vec![kind, SEP],
            }
        };
        let mut cases = self
            .db
            .range(bounds(b'C', from, false)..bounds(b'C', to, true))
            .peekable();
        let mut history = self
            .db
            .range(bounds(b'H', from, false)..bounds(b'H', to, true))
            .peekable();
        let mut entry = proto::HistoryEntry::default();
        loop {
            // Surface a storage error where it happens.
            if matches!(cases.peek(), Some(Err(_))) {
                cases.next().transpose()?;
            }
            if matches!(history.peek(), Some(Err(_))) {
                history.next().transpose()?;
            }
            let case_id: Option<Vec<u8>> = match cases.peek() {
                Some(Ok((k, _))) => Some(k[2..].to_vec()),
                _ => None,
            };
            let history_id: Option<Vec<u8>> = match history.peek() {
                Some(Ok((k, _))) => Some(split_history_key(k).0.to_vec()),
                _ => None,
            };
            let id_bytes = match (&case_id, &history_id) {
                (Some(c), Some(h)) => c.min(h).clone(),
                (Some(c), None) => c.clone(),
                (None, Some(h)) => h.clone(),
                (None, None) => return Ok(()),
            };
            let record = if case_id.as_ref() == Some(&id_bytes) {
                match cases.next() {
                    Some(Ok((_, v))) => {
                        Some(proto::Case::decode(&*v).map_err(|e| decode_error(&e)))
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => None,
                }
            } else {
                None
            };
            let id = String::from_utf8_lossy(&id_bytes);
            visit(CaseEvent::Begin { id: &id, record });
            while let Some(Ok((k, _))) = history.peek() {
                if split_history_key(k).0 != id_bytes.as_slice() {
                    break;
                }
                let Some(Ok((k, v))) = history.next() else {
                    break;
                };
                let slot = split_history_key(&k).1;
                entry.clear();
                match entry.merge(&*v) {
                    Ok(()) => visit(CaseEvent::Entry(RawEntry {
                        slot,
                        entry: Ok(&entry),
                    })),
                    Err(e) => {
                        let message = decode_error(&e);
                        visit(CaseEvent::Entry(RawEntry {
                            slot,
                            entry: Err(&message),
                        }));
                    }
                }
            }
            visit(CaseEvent::End);
        }
    }

    fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([b'W', SEP]) {
            let (_, v) = item?;
            // A version that does not decode cannot be used; verification
            // does not depend on versions, replay reports the missing one.
            if let Ok(version) = proto::WorkflowVersion::decode(&*v) {
                out.push(version);
            }
        }
        Ok(out)
    }
}

/// Adapts a [`Store`]. The trait gives neither the key an entry is stored
/// under nor the entries before one that does not decode, so:
///
/// * positions are the entries' own sequence numbers when they increase
///   strictly, else their order (1, 2, …): a moved entry is found either way;
/// * when a record does not decode, the last undecodable one is found
///   exactly (by reading from later and later sequence numbers) and the
///   entries after it are checked, but those before it cannot be read and are
///   reported as unreadable. Audit the store folder with [`SledSource`] for
///   a full account.
pub struct StoreSource<'a>(pub &'a dyn Store);

impl StoreSource<'_> {
    fn emit(
        entries: &[proto::HistoryEntry],
        visit: &mut dyn FnMut(RawEntry<'_>) -> ControlFlow<()>,
    ) {
        let increasing = entries.windows(2).all(|w| w[0].sequence < w[1].sequence);
        for (i, entry) in entries.iter().enumerate() {
            let slot = if increasing {
                entry.sequence
            } else {
                i as u64 + 1
            };
            if visit(RawEntry {
                slot: Some(slot),
                entry: Ok(entry),
            })
            .is_break()
            {
                return;
            }
        }
    }
}

impl RecordSource for StoreSource<'_> {
    fn case_ids(&self, after: &str, limit: usize) -> Result<Vec<String>> {
        Ok(self.0.case_ids(after, limit)?)
    }

    fn case_record(&self, id: &str) -> Result<Option<CaseRecord>> {
        match self.0.case(id) {
            Ok(case) => Ok(case.map(Ok)),
            Err(StoreError::Decode { source, .. }) => Ok(Some(Err(decode_error(&source)))),
            Err(e) => Err(e.into()),
        }
    }

    fn visit_history(
        &self,
        id: &str,
        visit: &mut dyn FnMut(RawEntry<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        match self.0.history(id, 0, usize::MAX) {
            Ok(entries) => {
                Self::emit(&entries, visit);
                Ok(())
            }
            Err(StoreError::Decode { .. }) => {
                // `history(id, s)` fails exactly when a record at or after
                // `s` does not decode: find the last bad one.
                let (mut bad, mut good) = (0u64, u64::MAX);
                while good - bad > 1 {
                    let mid = bad + (good - bad) / 2;
                    match self.0.history(id, mid, usize::MAX) {
                        Ok(_) => good = mid,
                        Err(StoreError::Decode { .. }) => bad = mid,
                        Err(e) => return Err(e.into()),
                    }
                }
                let last_bad = bad;
                if last_bad > 1 {
                    let message = format!(
                        "the entries stored before sequence {last_bad} cannot be read through \
                         this store's interface (audit the store folder directly)"
                    );
                    if visit(RawEntry {
                        slot: None,
                        entry: Err(&message),
                    })
                    .is_break()
                    {
                        return Ok(());
                    }
                }
                let message = "does not decode".to_owned();
                if visit(RawEntry {
                    slot: Some(last_bad),
                    entry: Err(&message),
                })
                .is_break()
                {
                    return Ok(());
                }
                let rest = self.0.history(id, last_bad.saturating_add(1), usize::MAX)?;
                Self::emit(&rest, visit);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>> {
        Ok(self.0.workflow_versions()?)
    }

    /// Through the store's workflow index.
    fn candidate_case_ids(&self, workflow: &str, after: &str, limit: usize) -> Result<Vec<String>> {
        let filter = CaseFilter {
            workflow: Some(workflow.to_owned()),
            ..CaseFilter::default()
        };
        let page = self.0.list(&filter, after, limit)?;
        Ok(page.cases.into_iter().map(|c| c.id).collect())
    }
}

/// A source together with steps not yet written to it: what the durable
/// engine's deploy checks running cases on, when the batch it deploys in
/// already holds steps of its own. `pending` maps a case id to its record
/// after those steps and the history entries they append.
pub struct WithPending<'a> {
    pub base: &'a dyn RecordSource,
    pub pending: BTreeMap<&'a str, (&'a proto::Case, &'a [proto::HistoryEntry])>,
}

impl WithPending<'_> {
    /// Merges the base's ids with the pending cases' (those `keep` accepts),
    /// in order, after `after`, at most `limit`.
    fn merge(
        &self,
        base: Vec<String>,
        after: &str,
        limit: usize,
        keep: impl Fn(&proto::Case) -> bool,
    ) -> Vec<String> {
        let complete = base.len() < limit;
        let mut ids: BTreeSet<String> = base.into_iter().collect();
        // Beyond the base's last id, the base may hold more: stop there.
        let bound = if complete { None } else { ids.last().cloned() };
        ids.extend(
            self.pending
                .iter()
                .filter(|(id, (case, _))| {
                    **id > after && bound.as_deref().is_none_or(|b| **id <= b) && keep(case)
                })
                .map(|(id, _)| (*id).to_owned()),
        );
        ids.into_iter().take(limit).collect()
    }
}

impl RecordSource for WithPending<'_> {
    fn case_ids(&self, after: &str, limit: usize) -> Result<Vec<String>> {
        let base = self.base.case_ids(after, limit)?;
        Ok(self.merge(base, after, limit, |_| true))
    }

    fn case_record(&self, id: &str) -> Result<Option<CaseRecord>> {
        match self.pending.get(id) {
            Some((case, _)) => Ok(Some(Ok((*case).clone()))),
            None => self.base.case_record(id),
        }
    }

    fn visit_history(
        &self,
        id: &str,
        visit: &mut dyn FnMut(RawEntry<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut last = 0;
        let mut stopped = false;
        self.base.visit_history(id, &mut |raw| {
            if let Some(slot) = raw.slot {
                last = last.max(slot);
            }
            let flow = visit(raw);
            stopped = flow.is_break();
            flow
        })?;
        if stopped {
            return Ok(());
        }
        if let Some((_, entries)) = self.pending.get(id) {
            for entry in entries.iter().filter(|e| e.sequence > last) {
                let raw = RawEntry {
                    slot: Some(entry.sequence),
                    entry: Ok(entry),
                };
                if visit(raw).is_break() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>> {
        self.base.workflow_versions()
    }

    fn candidate_case_ids(&self, workflow: &str, after: &str, limit: usize) -> Result<Vec<String>> {
        let base = self.base.candidate_case_ids(workflow, after, limit)?;
        Ok(self.merge(base, after, limit, |case| case.workflow == workflow))
    }
}

/// A record source in memory, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::ops::ControlFlow;

    use super::{CaseRecord, RawEntry, RecordSource, Result, proto};

    /// A stored history record: its slot, and the entry or why it does not decode.
    pub(crate) type Slot = (u64, std::result::Result<proto::HistoryEntry, String>);

    /// Records held in memory, stored under the slots given.
    #[derive(Default)]
    pub(crate) struct Memory {
        pub(crate) cases: BTreeMap<String, proto::Case>,
        pub(crate) history: BTreeMap<String, Vec<Slot>>,
    }

    impl RecordSource for Memory {
        fn case_ids(&self, after: &str, limit: usize) -> Result<Vec<String>> {
            Ok(self
                .cases
                .keys()
                .filter(|k| k.as_str() > after)
                .take(limit)
                .cloned()
                .collect())
        }

        fn case_record(&self, id: &str) -> Result<Option<CaseRecord>> {
            Ok(self.cases.get(id).cloned().map(Ok))
        }

        fn visit_history(
            &self,
            id: &str,
            visit: &mut dyn FnMut(RawEntry<'_>) -> ControlFlow<()>,
        ) -> Result<()> {
            for (slot, entry) in self.history.get(id).into_iter().flatten() {
                let raw = RawEntry {
                    slot: Some(*slot),
                    entry: entry.as_ref().map_err(String::as_str),
                };
                if visit(raw).is_break() {
                    break;
                }
            }
            Ok(())
        }

        fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>> {
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Memory;
    use super::*;

    /// A store on read-only media (a backup, a snapshot) is audited in a
    /// copy, since sled opens its files for writing; the copy goes with it.
    #[test]
    fn a_store_sled_may_not_write_is_audited_in_a_copy() {
        use std::io::{Error, ErrorKind};
        for kind in [ErrorKind::ReadOnlyFilesystem, ErrorKind::PermissionDenied] {
            assert!(needs_write_access(&StoreError::Sled(sled::Error::Io(
                Error::from(kind)
            ))));
            assert!(needs_write_access(&io_error(
                Path::new("s"),
                Error::from(kind)
            )));
        }
        assert!(!needs_write_access(&StoreError::Sled(sled::Error::Io(
            Error::from(ErrorKind::StorageFull)
        ))));
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = open_db(dir.path(), AUDIT_CACHE_BYTES).expect("opens");
            db.insert([b'W', SEP, b'w'], b"version".to_vec())
                .expect("insert");
            db.flush().expect("flush");
        }
        let (db, copy) = open_copy(dir.path()).expect("the copy opens");
        let copied = copy.path().to_path_buf();
        assert_eq!(db.scan_prefix([b'W', SEP]).count(), 1);
        drop(SledSource {
            db,
            _copy: Some(copy),
        });
        assert!(!copied.exists(), "the copy is removed with the source");
    }

    fn case(id: &str, workflow: &str, sequence: u64) -> proto::Case {
        proto::Case {
            id: id.into(),
            workflow: workflow.into(),
            sequence,
            ..Default::default()
        }
    }

    fn entries(id: &str, sequences: std::ops::RangeInclusive<u64>) -> Vec<proto::HistoryEntry> {
        sequences
            .map(|sequence| proto::HistoryEntry {
                case_id: id.into(),
                sequence,
                ..Default::default()
            })
            .collect()
    }

    fn sequences(source: &dyn RecordSource, id: &str) -> Vec<u64> {
        let mut seen = Vec::new();
        source
            .visit_history(id, &mut |raw| {
                seen.push(raw.entry.map(|e| e.sequence).unwrap_or(0));
                ControlFlow::Continue(())
            })
            .expect("history");
        seen
    }

    /// What a deploy in a batch sees: the store, plus the steps the batch
    /// took before it (a case moved on, a case started), in id order.
    #[test]
    fn pending_steps_are_seen_over_the_store() {
        let mut base = Memory::default();
        for (id, workflow, n) in [("a", "w", 2), ("c", "w", 1), ("d", "other", 1)] {
            base.cases.insert(id.into(), case(id, workflow, n));
            let slots = entries(id, 1..=n).into_iter().map(|e| (e.sequence, Ok(e)));
            base.history.insert(id.into(), slots.collect());
        }
        let a_after = case("a", "w", 3);
        let a_new = entries("a", 2..=3);
        let b = case("b", "w", 1);
        let b_new = entries("b", 1..=1);
        let source = WithPending {
            base: &base,
            pending: [
                ("a", (&a_after, a_new.as_slice())),
                ("b", (&b, b_new.as_slice())),
            ]
            .into(),
        };
        assert_eq!(source.case_ids("", 10).expect("ids"), ["a", "b", "c", "d"]);
        // Paged: a pending id is given once, in its place.
        assert_eq!(source.case_ids("", 1).expect("ids"), ["a"]);
        assert_eq!(source.case_ids("a", 1).expect("ids"), ["b"]);
        assert_eq!(source.case_ids("b", 1).expect("ids"), ["c"]);
        assert_eq!(
            source.candidate_case_ids("w", "", 10).expect("ids"),
            ["a", "b", "c", "d"],
            "the default is a superset"
        );
        match source.case_record("a").expect("record") {
            Some(Ok(record)) => assert_eq!(record.sequence, 3),
            other => panic!("{other:?}"),
        }
        // The store's entries, then the batch's beyond them.
        assert_eq!(sequences(&source, "a"), [1, 2, 3]);
        assert_eq!(sequences(&source, "b"), [1]);
        assert_eq!(sequences(&source, "c"), [1]);
    }
}
