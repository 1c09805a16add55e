//! The embedded store: one sled tree, key prefixes per kind of record.
//!
//! Everything lives in sled's default tree so that a commit is a single
//! `apply_batch` — atomic across cases, histories, timers, indexes and
//! idempotency records without sled's multi-tree transactions. After the
//! batch, `flush()` (`write_out`) writes it to the log file and, because
//! sled's flush ends with `sync_file_range` (which reaches neither the
//! drive's cache nor the file's metadata), `sync` calls `fdatasync` on that
//! file itself; `commit` returns only after both.
//!
//! Keys (`·` is a 0 byte; numbers are fixed-width big-endian, so byte order
//! is numeric order):
//!
//! | key | value |
//! | --- | --- |
//! | `V·format` | the store's format ([`FORMAT`]), u32 |
//! | `V·secret` | 32 random bytes made when the store is first opened (see `Store::secret`) |
//! | `C·{case}` | `Case` |
//! | `H·{case}·{sequence u64}` | `HistoryEntry` |
//! | `T·{due ns i64 as ordered u64}{case}·{timer}` | empty |
//! | `Q·{commit number u64}{part u32}` | `CommitRequests`: the outcomes of the requests a commit answered |
//! | `R·{request id}` | `RequestOutcome` (earlier layout: read, no longer written) |
//! | `W·{workflow}·{version u32}` | `WorkflowVersion` |
//! | `E·{first position u64}` | a commit's event-feed items (see `encode_feed`) |
//! | `I·w·{workflow}·{case}` … | empty: index entries (see [`IndexKey`]) |

use std::fs::File;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use prost::Message;

use super::keys::{
    SEP, case_key, format_key, history_key, history_prefix, key, prefix_end, secret_key,
};
use super::{
    CaseFilter, Commit, DueTimer, FeedItem, IndexKey, Page, Result, Store, StoreError, proto,
    records,
};

/// Records above this size are refused: sled stores larger values as
/// separate blob files, which it writes without syncing them.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Told about each durability step, in order: for tests that check that an
/// acknowledgement never precedes the sync of its data.
pub type SyncObserver = Arc<dyn Fn(SyncStep) + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStep {
    /// A commit is applied (readable, not yet durable): the (case, sequence)
    /// of every history entry it appends.
    Applied(Vec<(String, u64)>),
    /// sled's flush returned: what was applied before it is in the log file.
    Flushed,
    /// `fdatasync` of the log file is about to start.
    Syncing,
    /// This many new blob files of sled's (see `SledStore::sync_new_blobs`)
    /// were synced, after the flush that wrote them, when there were any.
    BlobsSynced(usize),
    /// `fdatasync` of the log file returned: the batch is durable.
    Synced,
}

pub struct SledStore {
    db: sled::Db,
    log_file: File,
    /// sled's `blobs/` folder, and the files in it already synced: see
    /// [`SledStore::sync_new_blobs`].
    blobs: std::path::PathBuf,
    synced_blobs: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
    observer: Option<SyncObserver>,
    secret: [u8; 32],
}

/// Nanoseconds since the epoch, flipped so that unsigned byte order is time order.
fn ordered_time(t: DateTime<Utc>) -> [u8; 8] {
    let nanos = t.timestamp_nanos_opt().unwrap_or(i64::MAX);
    ((nanos as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from_ordered(bytes: &[u8]) -> DateTime<Utc> {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    DateTime::from_timestamp_nanos((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

fn timer_key(due: DateTime<Utc>, case: &str, timer: &str) -> Vec<u8> {
    let mut k = vec![b'T', SEP];
    k.extend_from_slice(&ordered_time(due));
    k.extend_from_slice(case.as_bytes());
    k.push(SEP);
    k.extend_from_slice(timer.as_bytes());
    k
}

fn feed_key(position: u64) -> Vec<u8> {
    let mut k = vec![b'E', SEP];
    k.extend_from_slice(&position.to_be_bytes());
    k
}

fn requests_key(number: u64, part: u32) -> Vec<u8> {
    let mut k = vec![b'Q', SEP];
    k.extend_from_slice(&number.to_be_bytes());
    k.extend_from_slice(&part.to_be_bytes());
    k
}

/// The number of the commit whose requests a `Q` key holds.
fn requests_number(key: &[u8]) -> Result<u64> {
    key.get(2..10)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("a request-outcome key is cut short".into()))
}

/// A commit's request outcomes as `CommitRequests` records of at most
/// [`MAX_RECORD_BYTES`] each (usually one): one key per commit, not per
/// request. A single outcome above the limit is refused.
fn encode_requests(requests: &[proto::RecordedRequest]) -> Result<Vec<Vec<u8>>> {
    let mut parts = vec![Vec::new()];
    for request in requests {
        let size = prost::encoding::message::encoded_len(1, request);
        if size > MAX_RECORD_BYTES {
            return Err(StoreError::TooLarge {
                size,
                limit: MAX_RECORD_BYTES,
            });
        }
        let part = parts
            .last_mut()
            .filter(|p| p.len() + size <= MAX_RECORD_BYTES);
        let part = match part {
            Some(p) => p,
            None => {
                parts.push(Vec::new());
                parts.last_mut().expect("just pushed")
            }
        };
        prost::encoding::message::encode(1, request, part);
    }
    Ok(parts)
}

/// A commit's feed items as one record (one key per commit, not per step):
/// for each, `{position u64}{sequence u64}{case id length u32}{case id}`,
/// numbers big-endian.
fn encode_feed(items: &[FeedItem]) -> Vec<u8> {
    let mut value = Vec::with_capacity(items.iter().map(|i| 20 + i.case_id.len()).sum());
    for item in items {
        value.extend_from_slice(&item.position.to_be_bytes());
        value.extend_from_slice(&item.sequence.to_be_bytes());
        value.extend_from_slice(&(item.case_id.len() as u32).to_be_bytes());
        value.extend_from_slice(item.case_id.as_bytes());
    }
    value
}

fn decode_feed(value: &[u8]) -> Result<Vec<FeedItem>> {
    let corrupt = || StoreError::Corrupt("an event-feed record is cut short".into());
    let number = |bytes: &[u8]| -> Result<u64> {
        Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| corrupt())?))
    };
    let mut items = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let header = rest.get(..20).ok_or_else(corrupt)?;
        let length = u32::from_be_bytes(header[16..20].try_into().map_err(|_| corrupt())?) as usize;
        let case_id = rest.get(20..20 + length).ok_or_else(corrupt)?;
        items.push(FeedItem {
            position: number(&header[..8])?,
            sequence: number(&header[8..16])?,
            case_id: String::from_utf8_lossy(case_id).into_owned(),
        });
        rest = &rest[20 + length..];
    }
    Ok(items)
}

fn index_prefix(index: &IndexKey) -> Vec<u8> {
    let mut k = match index {
        IndexKey::Workflow(w) => key(b'I', &[b"w", w.as_bytes()]),
        IndexKey::State { workflow, state } => {
            key(b'I', &[b"s", workflow.as_bytes(), state.as_bytes()])
        }
        IndexKey::Agency(a) => key(b'I', &[b"a", a.as_bytes()]),
        IndexKey::Inbox(a) => key(b'I', &[b"x", a.as_bytes()]),
        IndexKey::Variable {
            workflow,
            name,
            value,
        } => key(
            b'I',
            &[b"v", workflow.as_bytes(), name.as_bytes(), value.as_bytes()],
        ),
    };
    k.push(SEP);
    k
}

fn index_key(index: &IndexKey, case: &str) -> Vec<u8> {
    let mut k = index_prefix(index);
    k.extend_from_slice(case.as_bytes());
    k
}

fn encode(message: &impl Message) -> Result<Vec<u8>> {
    let bytes = message.encode_to_vec();
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(StoreError::TooLarge {
            size: bytes.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    Ok(bytes)
}

fn decode<M: Message + Default>(bytes: &[u8], what: impl Fn() -> String) -> Result<M> {
    M::decode(bytes).map_err(|source| StoreError::Decode {
        what: what(),
        source,
    })
}

/// Whether sled refused to open because another handle holds its folder.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(e) if e.to_string().contains("could not acquire lock"))
}

/// sled's log segment size for new stores: 8 MiB, sixteen times sled's
/// default. sled 0.34's segment accountant walks its list of every segment
/// each time a segment is filled, so with the default its cost per byte
/// written grows with the size of the file: in a 15 GB store of a million
/// cases that walk took a fifth of the CPU. Larger segments make it 256
/// times cheaper at a given file size (and leave fewer large items to blob
/// files, which sled uses above a quarter of a segment).
pub const SEGMENT_BYTES: usize = 8 << 20;

/// The sled configuration of the store in `dir`: durability left to us (no
/// background flusher racing the writer), and the segment size the store
/// was made with (sled refuses to open a store with another), or
/// [`SEGMENT_BYTES`] for a new one. A tool that opens a govflow store with
/// sled directly must use it: sled refuses a store whose segment size it
/// was not given.
pub fn sled_config(dir: &Path, cache_bytes: u64) -> sled::Config {
    let config = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .cache_capacity(cache_bytes);
    match std::fs::read(dir.join("conf")) {
        // sled's own settings file: lines `key: value`, then a checksum.
        Ok(conf) => match stored_segment_size(&conf) {
            Some(size) => config.segment_size(size),
            None => config,
        },
        Err(_) => config.segment_size(SEGMENT_BYTES),
    }
}

/// The `segment_size` line of sled's settings file, if there is one.
fn stored_segment_size(conf: &[u8]) -> Option<usize> {
    conf.split(|&b| b == b'\n').find_map(|line| {
        std::str::from_utf8(line.strip_prefix(b"segment_size: ")?)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

/// The store layout this govflow writes and reads, recorded in each store
/// (a store made before the record has format 1). A later layout gets a
/// higher number, so that an older govflow refuses a store it would misread
/// instead of damaging it; opening an older store records this number.
///
/// 2: request outcomes are kept under the agency and its request id, not
/// the bare id (a format-1 govflow would not find them, and would run a
/// retried request again).
///
/// 3: the store keeps a secret (`V·secret`) that derives the ids of cases
/// started without one (a format-2 govflow would derive another id for a
/// retry, refuse it as a different request, and its client would start the
/// case twice) and seals page tokens.
pub const FORMAT: u32 = 3;

/// Opens the sled database of the store in `dir` ([`sled_config`]), unless
/// it is of a newer format than [`FORMAT`]. sled closes its files from
/// background threads after the last handle drops, so a quick reopen (a
/// restart, a test, an audit of a store just closed) may find the lock held
/// for a moment: it is tried again for up to two seconds, and then the store
/// is [`StoreError::InUse`].
pub(crate) fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db> {
    remove_unfinished_snapshots(dir)?;
    let config = sled_config(dir, cache_bytes);
    let mut attempts = 0;
    let db = loop {
        match config.open() {
            Err(e) if is_lock_error(&e) && attempts < 100 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) if is_lock_error(&e) => {
                return Err(StoreError::InUse {
                    path: dir.display().to_string(),
                });
            }
            other => break other?,
        }
    };
    if let Some(found) = stored_format(&db)?
        && found > FORMAT
    {
        return Err(StoreError::NewerFormat {
            path: dir.display().to_string(),
            found,
        });
    }
    Ok(db)
}

/// sled writes a snapshot to `snap.{lsn}.generating`, then renames it
/// `snap.{lsn}`. One left unfinished (a full disk, a crash while writing
/// it) sorts last, so sled reads it on open as the latest snapshot, finds it
/// corrupt and refuses the whole store (sled issue 1527), although nothing
/// in it is needed: the finished snapshot before it, or the log, holds
/// everything. Such files are removed first, when no other process has the
/// store open (sled holds a lock on `db` while it is open).
fn remove_unfinished_snapshots(dir: &Path) -> Result<()> {
    let io = |path: &Path, source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let db = dir.join("db");
    let log = match File::open(&db) {
        Ok(log) => log,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&db, e)),
    };
    if log.try_lock().is_err() {
        // Open elsewhere: sled's own open says so.
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        let unfinished = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"));
        if unfinished {
            tracing::warn!(
                "removing {}: a snapshot sled did not finish writing (the log holds what it would have)",
                path.display()
            );
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}

/// The format a store records, if it records one.
fn stored_format(db: &sled::Db) -> Result<Option<u32>> {
    db.get(format_key())?
        .map(|v| {
            <[u8; 4]>::try_from(v.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| StoreError::Corrupt(format!("the store's format record {v:?}")))
        })
        .transpose()
}

/// The store's secret, made (random) if it has none yet. Written like the
/// format record: synced with the first commit. A secret lost to a crash
/// before that sealed nothing that could outlive it but page tokens, which
/// are then refused as not issued by this server.
fn stored_secret(db: &sled::Db) -> Result<[u8; 32]> {
    if let Some(v) = db.get(secret_key())? {
        return <[u8; 32]>::try_from(v.as_ref()).map_err(|_| {
            StoreError::Corrupt(format!(
                "the store's secret record ({} bytes, not 32)",
                v.len()
            ))
        });
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| StoreError::Io {
        path: "the system's random source".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    db.insert(secret_key(), &secret)?;
    Ok(secret)
}

/// sled's own default page cache: 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

impl SledStore {
    /// Opens (or creates) the store in `dir` with sled's default page cache.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir`, letting sled's page cache
    /// grow to `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self> {
        let io = |source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = open_db(dir, cache_bytes)?;
        if stored_format(&db)?.is_none_or(|found| found < FORMAT) {
            // Made now, by a govflow from before formats were recorded
            // (format 1), or of an older format that this one reads: from
            // now on only a govflow that reads this format may open it.
            // Synced with the first commit, before which nothing of the new
            // format is written.
            db.insert(format_key(), &FORMAT.to_be_bytes())?;
        }
        let secret = stored_secret(&db)?;
        let log_path = dir.join("db");
        let log_file = File::open(&log_path).map_err(|source| StoreError::Io {
            path: log_path.display().to_string(),
            source,
        })?;
        // Make the files' directory entries durable too.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(SledStore {
            db,
            log_file,
            blobs: dir.join("blobs"),
            synced_blobs: Default::default(),
            observer: None,
            secret,
        })
    }

    /// sled writes a log item too large for its log (above a quarter of a
    /// segment, 128 KiB: not a record, which is at most 64 KiB, but a leaf
    /// of several large records rewritten whole, such as the workflow
    /// versions) to a file of its own under `blobs/`, and never syncs it.
    /// The log then points at that file, so each new one is synced here, with
    /// the folder, by `write_out`: that is, after the applies that wrote it
    /// and before the log's `fdatasync` that acknowledges them, on the one
    /// thread that applies, so no blob is half-written when synced. Each file
    /// is synced once; sled removes blobs once they are rewritten.
    fn sync_new_blobs(&self) -> Result<usize> {
        let io = |source| StoreError::Io {
            path: self.blobs.display().to_string(),
            source,
        };
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        };
        let mut known = self.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = std::collections::HashSet::new();
        let mut synced = 0;
        for entry in entries {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            if !known.contains(&name) {
                match File::open(entry.path()) {
                    Ok(file) => {
                        file.sync_data().map_err(io)?;
                        synced += 1;
                    }
                    // Removed by sled since the folder was read: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(e)),
                }
            }
            present.insert(name);
        }
        *known = present;
        if synced > 0 {
            File::open(&self.blobs)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(synced)
    }

    /// Watches each durability step (a test hook).
    pub fn with_observer(mut self, observer: SyncObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    fn observe(&self, step: SyncStep) {
        if let Some(observer) = &self.observer {
            observer(step);
        }
    }

    fn scan_ids(&self, prefix: &[u8], after: &str, limit: usize) -> Result<Vec<String>> {
        let start = if after.is_empty() {
            Bound::Included(prefix.to_vec())
        } else {
            let mut k = prefix.to_vec();
            k.extend_from_slice(after.as_bytes());
            Bound::Excluded(k)
        };
        let mut ids = Vec::new();
        for item in self
            .db
            .range::<Vec<u8>, _>((start, Bound::Excluded(prefix_end(prefix))))
        {
            let (k, _) = item?;
            ids.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
            if ids.len() >= limit {
                break;
            }
        }
        Ok(ids)
    }

    fn page(
        &self,
        prefix: &[u8],
        token: &str,
        size: usize,
        keep: impl Fn(&proto::Case) -> bool,
    ) -> Result<Page> {
        let size = size.clamp(1, 1000);
        let mut page = Page::default();
        let mut after = token.to_owned();
        // Scan in chunks; stop once a page is full and one more match is seen.
        loop {
            let ids = self.scan_ids(prefix, &after, size.max(64))?;
            let exhausted = ids.len() < size.max(64);
            for id in ids {
                after.clone_from(&id);
                let Some(case) = self.case(&id)? else {
                    continue;
                };
                if !keep(&case) {
                    continue;
                }
                if page.cases.len() == size {
                    page.next_page_token =
                        page.cases.last().map(|c| c.id.clone()).unwrap_or_default();
                    return Ok(page);
                }
                page.cases.push(case);
            }
            if exhausted {
                return Ok(page);
            }
        }
    }
}

/// Adds the writes of one commit to a sled batch.
fn add_to_batch(batch: &mut sled::Batch, commit: &Commit) -> Result<()> {
    for w in &commit.workflows {
        batch.insert(
            key(b'W', &[w.name.as_bytes(), &w.version.to_be_bytes()]),
            encode(w)?,
        );
    }
    for write in &commit.cases {
        let id = write.after.id.as_str();
        batch.insert(case_key(id), encode(&*write.after)?);
        for entry in &write.entries {
            batch.insert(history_key(id, entry.sequence), encode(entry)?);
        }
        let timers = |c: &proto::Case| -> Vec<Vec<u8>> {
            c.timers
                .iter()
                .map(|t| timer_key(records::from_timestamp(t.due_time.as_ref()), id, &t.id))
                .collect()
        };
        let before_timers = write.before.as_deref().map(timers).unwrap_or_default();
        let after_timers = timers(&write.after);
        for k in before_timers.iter().filter(|k| !after_timers.contains(k)) {
            batch.remove(k.clone());
        }
        // A timer kept across the step (a `keep_deadline` self-transition) is
        // not written again: every key written costs sled a log record.
        for k in after_timers.iter().filter(|k| !before_timers.contains(k)) {
            batch.insert(k.clone(), &[] as &[u8]);
        }
        for index in write.index_before.difference(&write.index_after) {
            batch.remove(index_key(index, id));
        }
        for index in write.index_after.difference(&write.index_before) {
            batch.insert(index_key(index, id), &[] as &[u8]);
        }
    }
    if let Some(first) = commit.feed.first() {
        batch.insert(feed_key(first.position), encode_feed(&commit.feed));
    }
    if !commit.requests.is_empty() {
        for (part, value) in (0u32..).zip(encode_requests(&commit.requests)?) {
            batch.insert(requests_key(commit.number, part), value);
        }
    }
    Ok(())
}

impl Store for SledStore {
    fn secret(&self) -> [u8; 32] {
        self.secret
    }

    fn apply_all(&self, commits: &[&Commit]) -> Result<()> {
        if commits.iter().all(|c| c.is_empty()) {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for commit in commits {
            // Later commits overwrite earlier ones key by key, as applying
            // them one after the other would.
            add_to_batch(&mut batch, commit)?;
        }
        self.db.apply_batch(batch)?;
        if self.observer.is_some() {
            let written = commits
                .iter()
                .flat_map(|c| &c.cases)
                .flat_map(|w| w.entries.iter().map(|e| (e.case_id.clone(), e.sequence)))
                .collect();
            self.observe(SyncStep::Applied(written));
        }
        Ok(())
    }

    fn write_out(&self) -> Result<()> {
        self.db.flush()?;
        self.observe(SyncStep::Flushed);
        let blobs = self.sync_new_blobs()?;
        if blobs > 0 {
            self.observe(SyncStep::BlobsSynced(blobs));
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.observe(SyncStep::Syncing);
        self.log_file.sync_data().map_err(|source| StoreError::Io {
            path: "db".into(),
            source,
        })?;
        self.observe(SyncStep::Synced);
        Ok(())
    }

    fn case(&self, id: &str) -> Result<Option<proto::Case>> {
        self.db
            .get(case_key(id))?
            .map(|bytes| decode(&bytes, || format!("case {id}")))
            .transpose()
    }

    fn history(
        &self,
        id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<proto::HistoryEntry>> {
        let prefix = history_prefix(id);
        self.db
            .range(history_key(id, from_sequence)..prefix_end(&prefix))
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                decode(&v, || {
                    format!("history entry {}", String::from_utf8_lossy(&k[1..]))
                })
            })
            .collect()
    }

    fn scan_requests(&self, each: &mut dyn FnMut(&str, u64)) -> Result<u64> {
        for item in self.db.scan_prefix([b'R', SEP]) {
            let (k, _) = item?;
            each(&String::from_utf8_lossy(&k[2..]), 0);
        }
        let mut highest = 0;
        for item in self.db.scan_prefix([b'Q', SEP]) {
            let (k, v) = item?;
            let number = requests_number(&k)?;
            let record: proto::CommitRequests =
                decode(&v, || format!("request outcomes of commit {number}"))?;
            for request in &record.requests {
                each(&request.request_id, number);
            }
            highest = number;
        }
        Ok(highest)
    }

    fn request_outcome(
        &self,
        number: u64,
        request_id: &str,
    ) -> Result<Option<proto::RequestOutcome>> {
        if number == 0 {
            return self
                .db
                .get(key(b'R', &[request_id.as_bytes()]))?
                .map(|v| decode(&v, || format!("outcome of request {request_id}")))
                .transpose();
        }
        let prefix = requests_key(number, 0);
        for item in self.db.scan_prefix(&prefix[..10]) {
            let (_, v) = item?;
            let record: proto::CommitRequests =
                decode(&v, || format!("request outcomes of commit {number}"))?;
            if let Some(found) = record
                .requests
                .into_iter()
                .find(|r| r.request_id == request_id)
            {
                return Ok(found.outcome);
            }
        }
        Ok(None)
    }

    fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>> {
        self.db
            .scan_prefix([b'W', SEP])
            .map(|item| {
                let (_, v) = item?;
                decode(&v, || "workflow version".to_owned())
            })
            .collect()
    }

    fn due_timers(
        &self,
        until: DateTime<Utc>,
        after: Option<&DueTimer>,
        limit: usize,
        skip: &dyn Fn(&DueTimer) -> bool,
    ) -> Result<Vec<DueTimer>> {
        let mut out = Vec::new();
        let start = match after {
            Some(t) => Bound::Excluded(timer_key(t.due, &t.case_id, &t.timer_id)),
            None => Bound::Included(vec![b'T', SEP]),
        };
        let end = Bound::Excluded(prefix_end(&[b'T', SEP]));
        for item in self.db.range::<Vec<u8>, _>((start, end)) {
            let (k, _) = item?;
            let due = time_from_ordered(&k[2..10]);
            if due > until || out.len() >= limit {
                break;
            }
            let rest = &k[10..];
            let split = rest.iter().position(|b| *b == SEP).unwrap_or(rest.len());
            let timer = DueTimer {
                due,
                case_id: String::from_utf8_lossy(&rest[..split]).into_owned(),
                timer_id: String::from_utf8_lossy(rest.get(split + 1..).unwrap_or_default())
                    .into_owned(),
            };
            if !skip(&timer) {
                out.push(timer);
            }
        }
        Ok(out)
    }

    fn list(&self, filter: &CaseFilter, page_token: &str, page_size: usize) -> Result<Page> {
        let prefix = match (filter, &filter.variable) {
            (
                CaseFilter {
                    workflow: Some(w), ..
                },
                Some((name, value)),
            ) => index_prefix(&IndexKey::Variable {
                workflow: w.clone(),
                name: name.clone(),
                value: value.clone(),
            }),
            (
                CaseFilter {
                    workflow: Some(w),
                    state: Some(s),
                    ..
                },
                _,
            ) => index_prefix(&IndexKey::State {
                workflow: w.clone(),
                state: s.clone(),
            }),
            (
                CaseFilter {
                    workflow: Some(w), ..
                },
                _,
            ) => index_prefix(&IndexKey::Workflow(w.clone())),
            (
                CaseFilter {
                    agency: Some(a), ..
                },
                _,
            ) => index_prefix(&IndexKey::Agency(a.clone())),
            _ => vec![b'C', SEP],
        };
        self.page(&prefix, page_token, page_size, |case| filter.matches(case))
    }

    fn inbox(&self, agency: &str, page_token: &str, page_size: usize) -> Result<Page> {
        self.page(
            &index_prefix(&IndexKey::Inbox(agency.to_owned())),
            page_token,
            page_size,
            |_| true,
        )
    }

    fn feed(&self, after: u64, limit: usize) -> Result<Vec<FeedItem>> {
        let wanted = after.saturating_add(1);
        // The record holding `wanted` starts at or before it.
        let start = self
            .db
            .range(feed_key(0)..=feed_key(wanted))
            .next_back()
            .transpose()?
            .map_or_else(|| feed_key(wanted), |(k, _)| k.to_vec());
        let mut out = Vec::new();
        for record in self.db.range(start..prefix_end(&[b'E', SEP])) {
            let (_, v) = record?;
            for item in decode_feed(&v)? {
                if item.position < wanted {
                    continue;
                }
                if out.len() >= limit {
                    return Ok(out);
                }
                out.push(item);
            }
        }
        Ok(out)
    }

    fn last_position(&self) -> Result<u64> {
        let Some((_, last)) = self
            .db
            .range(feed_key(0)..prefix_end(&[b'E', SEP]))
            .next_back()
            .transpose()?
        else {
            return Ok(0);
        };
        Ok(decode_feed(&last)?.last().map_or(0, |f| f.position))
    }

    fn case_ids(&self, after: &str, limit: usize) -> Result<Vec<String>> {
        self.scan_ids(&[b'C', SEP], after, limit)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use super::*;
    use crate::store::CaseWrite;

    fn case(id: &str, state: &str, due: Option<DateTime<Utc>>) -> proto::Case {
        proto::Case {
            id: id.into(),
            workflow: "w".into(),
            state: state.into(),
            bindings: [("handler".to_owned(), "county".to_owned())].into(),
            timers: due
                .map(|d| proto::Timer {
                    id: "1:expiry".into(),
                    due_time: Some(records::timestamp(d)),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    /// A write of `after`; `before` had the state index and `before_extra`.
    fn write_from(
        before: Option<proto::Case>,
        before_extra: &[IndexKey],
        after: proto::Case,
        index: &[IndexKey],
    ) -> CaseWrite {
        let mut index_before: BTreeSet<IndexKey> = before_extra.iter().cloned().collect();
        if let Some(b) = &before {
            index_before.insert(IndexKey::State {
                workflow: "w".into(),
                state: b.state.clone(),
            });
        }
        let mut index_after: BTreeSet<IndexKey> = index.iter().cloned().collect();
        index_after.insert(IndexKey::State {
            workflow: "w".into(),
            state: after.state.clone(),
        });
        CaseWrite {
            entries: vec![proto::HistoryEntry {
                case_id: after.id.clone(),
                sequence: after.sequence,
                ..Default::default()
            }],
            before: before.map(Arc::new),
            after: Arc::new(after),
            index_before,
            index_after,
        }
    }

    /// A request refused with `code`.
    fn recorded(request_id: &str, code: &str) -> proto::RecordedRequest {
        proto::RecordedRequest {
            request_id: request_id.into(),
            outcome: Some(proto::RequestOutcome {
                fingerprint: vec![7; 32],
                result: Some(proto::request_outcome::Result::Rejection(
                    proto::Rejection {
                        code: code.into(),
                        message: "refused".into(),
                    },
                )),
            }),
        }
    }

    #[test]
    fn a_commits_request_outcomes_are_one_record_split_only_past_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let long = "x".repeat(MAX_RECORD_BYTES / 4);
        let requests: Vec<_> = (0..10)
            .map(|i| recorded(&format!("req-{i}"), &long))
            .collect();
        store
            .commit(&Commit {
                number: 7,
                requests: requests.clone(),
                ..Default::default()
            })
            .expect("commit");
        let parts = store.db.scan_prefix([b'Q', SEP]).count();
        assert!(parts > 1 && parts < 10, "{parts} parts");
        for r in &requests {
            assert_eq!(
                store.request_outcome(7, &r.request_id).expect("read"),
                r.outcome
            );
        }
        assert_eq!(store.request_outcome(7, "req-99").expect("read"), None);
        assert_eq!(store.request_outcome(6, "req-1").expect("read"), None);
        let mut seen = Vec::new();
        let highest = store
            .scan_requests(&mut |id, commit| seen.push((id.to_owned(), commit)))
            .expect("scan");
        assert_eq!(highest, 7);
        assert_eq!(seen.len(), 10);
        // One outcome above the limit is refused, and nothing is written.
        let refused = store.commit(&Commit {
            number: 8,
            requests: vec![recorded("huge", &"x".repeat(MAX_RECORD_BYTES))],
            ..Default::default()
        });
        assert!(
            matches!(refused, Err(StoreError::TooLarge { .. })),
            "{refused:?}"
        );
        assert_eq!(store.request_outcome(8, "huge").expect("read"), None);
    }

    #[test]
    fn request_outcomes_of_the_earlier_one_key_per_request_layout_are_still_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let old = recorded("old-req", "guard-false");
        store
            .db
            .insert(
                key(b'R', &[b"old-req"]),
                old.outcome.as_ref().expect("outcome").encode_to_vec(),
            )
            .expect("insert");
        let mut seen = Vec::new();
        let highest = store
            .scan_requests(&mut |id, commit| seen.push((id.to_owned(), commit)))
            .expect("scan");
        assert_eq!((seen, highest), (vec![("old-req".to_owned(), 0)], 0));
        assert_eq!(
            store.request_outcome(0, "old-req").expect("read"),
            old.outcome
        );
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").to_utc()
    }

    fn write(before: Option<proto::Case>, after: proto::Case, index: &[IndexKey]) -> CaseWrite {
        write_from(before, &[], after, index)
    }

    /// Commits the writes of `cases`, and nothing else.
    fn commit_cases(store: &SledStore, cases: Vec<CaseWrite>) {
        store
            .commit(&Commit {
                cases,
                ..Default::default()
            })
            .expect("commit");
    }

    /// sled writes a leaf of several large records (workflow sources) to a
    /// blob file it never syncs; the store's sync syncs it with the log.
    #[test]
    fn blob_files_sled_writes_are_synced_with_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Only stores made with sled's default segment size, as every store
        // before SEGMENT_BYTES was, write leaves of records to blob files.
        made_with_default_segments(dir.path());
        let steps: Arc<Mutex<Vec<SyncStep>>> = Arc::default();
        let sink = Arc::clone(&steps);
        let store = SledStore::open(dir.path())
            .expect("open")
            .with_observer(Arc::new(move |step| sink.lock().expect("lock").push(step)));
        for version in 1..=12 {
            store
                .commit(&Commit {
                    workflows: vec![proto::WorkflowVersion {
                        name: "big".into(),
                        version,
                        source: "注".repeat(19_000),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .expect("commit");
        }
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .expect("blobs")
            .count();
        assert!(
            blobs > 0,
            "sled wrote no blob: the premise of this test is gone"
        );
        let steps = steps.lock().expect("lock");
        let blob_syncs: Vec<usize> = steps
            .iter()
            .filter_map(|s| match s {
                SyncStep::BlobsSynced(n) => Some(*n),
                _ => None,
            })
            .collect();
        assert!(!blob_syncs.is_empty(), "no blob was synced");
        // Each file once: no more syncs than commits that could write one.
        assert!(blob_syncs.iter().sum::<usize>() <= 12, "{blob_syncs:?}");
        // Every blob sync is followed by the log's before its commit returns.
        let last = steps
            .iter()
            .rposition(|s| matches!(s, SyncStep::BlobsSynced(_)))
            .expect("a blob sync");
        assert!(steps[last..].contains(&SyncStep::Synced));
    }

    /// Makes an empty store in `dir` the way sled does by default.
    fn made_with_default_segments(dir: &Path) {
        drop(
            sled::Config::new()
                .path(dir)
                .open()
                .expect("a store with default segments"),
        );
    }

    fn segment_size_of(dir: &Path) -> Option<usize> {
        stored_segment_size(&std::fs::read(dir.join("conf")).expect("conf"))
    }

    #[test]
    fn a_new_store_gets_large_segments_and_an_old_one_keeps_its_own() {
        let new = tempfile::tempdir().expect("tempdir");
        drop(SledStore::open(new.path()).expect("open"));
        assert_eq!(segment_size_of(new.path()), Some(SEGMENT_BYTES));
        drop(SledStore::open(new.path()).expect("reopens"));

        let old = tempfile::tempdir().expect("tempdir");
        made_with_default_segments(old.path());
        let default = segment_size_of(old.path()).expect("sled wrote its segment size");
        assert_ne!(default, SEGMENT_BYTES);
        // sled would refuse it with any other segment size.
        let store = SledStore::open(old.path()).expect("an old store opens");
        commit_cases(&store, vec![write(None, case("a", "s", None), &[])]);
        drop(store);
        assert_eq!(segment_size_of(old.path()), Some(default));
        assert_eq!(
            stored_segment_size(b"segment_size: x\nuse_compression: false\n"),
            None
        );
    }

    #[test]
    fn a_store_in_use_is_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _open = SledStore::open(dir.path()).expect("open");
        match SledStore::open(dir.path()) {
            Err(e @ StoreError::InUse { .. }) => {
                assert!(e.to_string().contains("in use by another process"), "{e}")
            }
            Err(other) => panic!("expected InUse, got {other}"),
            Ok(_) => panic!("a store was opened twice"),
        }
    }

    /// A store records its format; one made before formats were recorded,
    /// or of an older format, is recorded as this one when opened; one of a
    /// newer format is refused, by the store and by the audit alike, and
    /// left as it was.
    #[test]
    fn a_store_keeps_its_own_secret_across_reopening() {
        let (a, b) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        let secret = SledStore::open(a.path()).expect("open").secret();
        let other = SledStore::open(b.path()).expect("open").secret();
        assert_ne!(secret, other, "each store makes its own");
        assert_ne!(secret, [0; 32]);
        // Made with the first commit's sync, like the format record.
        {
            let store = SledStore::open(a.path()).expect("reopen");
            assert_eq!(store.secret(), secret);
            store.commit(&Commit::default()).expect("commit");
        }
        assert_eq!(SledStore::open(a.path()).expect("reopen").secret(), secret);
    }

    #[test]
    fn a_store_records_its_format_and_one_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = || open_db(dir.path(), DEFAULT_CACHE_BYTES).expect("open");
        {
            // As a govflow from before formats were recorded left it.
            raw().insert(case_key("a"), &[] as &[u8]).expect("insert");
        }
        drop(SledStore::open(dir.path()).expect("an older store opens"));
        assert_eq!(stored_format(&raw()).expect("read"), Some(FORMAT));
        {
            // As a govflow of format 1 left it: opened, it is recorded as
            // this format, so that a format-1 govflow refuses it from then on.
            let db = raw();
            db.insert(format_key(), &1u32.to_be_bytes())
                .expect("insert");
            db.flush().expect("flush");
        }
        drop(SledStore::open(dir.path()).expect("a format-1 store opens"));
        assert_eq!(stored_format(&raw()).expect("read"), Some(FORMAT));
        {
            let db = raw();
            db.insert(format_key(), &(FORMAT + 1).to_be_bytes())
                .expect("insert");
            db.flush().expect("flush");
        }
        match SledStore::open(dir.path()) {
            Err(e @ StoreError::NewerFormat { .. }) => assert!(
                e.to_string().contains(&format!(
                    "is of format {}, written by a newer govflow",
                    FORMAT + 1
                )),
                "{e}"
            ),
            Err(other) => panic!("expected NewerFormat, got {other}"),
            Ok(_) => panic!("a store of a newer format was opened"),
        }
        let audited = crate::audit::SledSource::open(dir.path())
            .err()
            .map(|e| e.to_string());
        assert!(
            audited
                .as_deref()
                .is_some_and(|e| e.contains("newer govflow")),
            "{audited:?}"
        );
    }

    #[test]
    fn due_timers_come_in_due_order_from_a_cursor_and_skipped_ones_do_not_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let cases: Vec<CaseWrite> = [("c", 3), ("a", 1), ("b", 2), ("d", 4)]
            .into_iter()
            .map(|(id, day)| {
                let due = at(&format!("2020-06-0{day}T00:00:00Z"));
                write(None, case(id, "s", Some(due)), &[])
            })
            .collect();
        commit_cases(&store, cases);
        let ids = |due: Vec<DueTimer>| due.into_iter().map(|d| d.case_id).collect::<Vec<_>>();
        let until = at("2020-06-03T12:00:00Z");
        let all = store.due_timers(until, None, 10, &|_| false).expect("read");
        assert_eq!(ids(all.clone()), ["a", "b", "c"], "d is not due yet");
        let after_a = store.due_timers(until, Some(&all[0]), 10, &|_| false);
        assert_eq!(ids(after_a.expect("read")), ["b", "c"]);
        let skipping_a = store.due_timers(until, None, 1, &|d| d.case_id == "a");
        assert_eq!(
            ids(skipping_a.expect("read")),
            ["b"],
            "a is passed over, not counted"
        );
    }

    #[test]
    fn commits_applied_together_end_as_if_applied_one_after_the_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let opened = case("a", "open", Some(at("2020-06-01T00:00:00Z")));
        let mut escalated = case("a", "escalated", Some(at("2020-06-02T00:00:00Z")));
        escalated.sequence = 2;
        let mut closed = case("a", "closed", Some(at("2020-06-03T00:00:00Z")));
        closed.sequence = 3;
        let commit = |w: CaseWrite| Commit {
            cases: vec![w],
            ..Default::default()
        };
        let first = commit(write(
            None,
            opened.clone(),
            &[IndexKey::Inbox("county".into())],
        ));
        let second = commit(write_from(
            Some(opened),
            &[IndexKey::Inbox("county".into())],
            escalated.clone(),
            &[IndexKey::Inbox("city".into())],
        ));
        let third = commit(write_from(
            Some(escalated),
            &[IndexKey::Inbox("city".into())],
            closed,
            &[],
        ));
        store.apply_all(&[&first, &second, &third]).expect("apply");
        assert_eq!(
            store.case("a").expect("read").map(|c| c.state),
            Some("closed".into())
        );
        assert_eq!(store.history("a", 0, usize::MAX).expect("read").len(), 3);
        // Only the last commit's timer and index entries are left.
        let due = store
            .due_timers(at("2021-01-01T00:00:00Z"), None, 10, &|_| false)
            .expect("timers");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].due, at("2020-06-03T00:00:00Z"));
        for agency in ["county", "city"] {
            assert!(store.inbox(agency, "", 10).expect("inbox").cases.is_empty());
        }
        let closed_ones = CaseFilter {
            state: Some("closed".into()),
            ..Default::default()
        };
        assert_eq!(
            store.list(&closed_ones, "", 10).expect("list").cases.len(),
            1
        );
        for state in ["open", "escalated"] {
            let filter = CaseFilter {
                state: Some(state.into()),
                ..Default::default()
            };
            assert!(store.list(&filter, "", 10).expect("list").cases.is_empty());
        }
    }

    #[test]
    fn a_snapshot_left_unfinished_does_not_stop_the_store_opening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = case("a", "open", None);
        {
            let store = SledStore::open(dir.path()).expect("open");
            commit_cases(&store, vec![write(None, written.clone(), &[])]);
            // While the store is open, another opener leaves its files alone.
            let other = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
            std::fs::write(&other, b"").expect("write");
            remove_unfinished_snapshots(dir.path()).expect("looked");
            assert!(other.exists());
            std::fs::remove_file(&other).expect("remove");
        }
        // What a full disk left: an empty snapshot sled never finished.
        let unfinished = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
        std::fs::write(&unfinished, b"").expect("write");
        let store = SledStore::open(dir.path()).expect("opens");
        assert_eq!(store.case("a").expect("read"), Some(written));
        assert!(!unfinished.exists());
    }

    #[test]
    fn commits_survive_reopening_and_indexes_follow_the_case() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = case("a", "open", Some(at("2020-06-02T00:00:00Z")));
        {
            let store = SledStore::open(dir.path()).expect("open");
            let second = case("b", "open", Some(at("2020-06-01T00:00:00Z")));
            let commit = Commit {
                cases: vec![
                    write(None, first.clone(), &[IndexKey::Inbox("county".into())]),
                    write(None, second.clone(), &[]),
                ],
                number: 1,
                requests: vec![recorded("req-1", "guard-false")],
                workflows: vec![proto::WorkflowVersion {
                    name: "w".into(),
                    version: 1,
                    ..Default::default()
                }],
                feed: Vec::new(),
            };
            store.commit(&commit).expect("commit");
            let mut moved = first.clone();
            moved.state = "closed".into();
            moved.sequence = 2;
            moved.timers.clear();
            // A step that keeps its deadline (its timer is not written again).
            let mut kept = second.clone();
            kept.sequence = 2;
            store
                .commit(&Commit {
                    cases: vec![
                        write_from(
                            Some(first.clone()),
                            &[IndexKey::Inbox("county".into())],
                            moved,
                            &[],
                        ),
                        write_from(Some(second), &[], kept, &[]),
                    ],
                    ..Default::default()
                })
                .expect("commit");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.case("a").expect("read").map(|c| c.state),
            Some("closed".into())
        );
        assert_eq!(store.history("a", 0, usize::MAX).expect("read").len(), 2);
        assert_eq!(store.history("a", 2, usize::MAX).expect("read").len(), 1);
        // A page reads no further than it needs.
        let all = store.history("a", 0, usize::MAX).expect("read");
        assert_eq!(store.history("a", 0, 1).expect("read"), all[..1]);
        assert_eq!(
            store.request_outcome(1, "req-1").expect("read"),
            recorded("req-1", "guard-false").outcome
        );
        let mut seen = Vec::new();
        let highest = store
            .scan_requests(&mut |id, commit| seen.push((id.to_owned(), commit)))
            .expect("scan");
        assert_eq!((seen, highest), (vec![("req-1".to_owned(), 1)], 1));
        assert_eq!(store.workflow_versions().expect("read").len(), 1);
        // a's timer left with its state; b's is still due.
        let due = store
            .due_timers(at("2030-01-01T00:00:00Z"), None, 10, &|_| false)
            .expect("read");
        assert_eq!(
            due.iter().map(|d| d.case_id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(due[0].due, at("2020-06-01T00:00:00Z"));
        assert!(
            store
                .due_timers(at("2020-05-31T00:00:00Z"), None, 10, &|_| false)
                .expect("read")
                .is_empty()
        );
        // Index entries were moved, not copied.
        let open = CaseFilter {
            workflow: Some("w".into()),
            state: Some("open".into()),
            ..Default::default()
        };
        assert_eq!(store.list(&open, "", 10).expect("list").cases.len(), 1);
        assert!(
            store
                .inbox("county", "", 10)
                .expect("inbox")
                .cases
                .is_empty()
        );
        assert_eq!(store.case_ids("", 10).expect("ids"), ["a", "b"]);
    }

    #[test]
    fn pages_are_token_continued_without_gaps_or_repeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let cases: Vec<CaseWrite> = (0..25)
            .map(|i| {
                write(
                    None,
                    case(&format!("c{i:02}"), "open", None),
                    &[IndexKey::Inbox("county".into())],
                )
            })
            .collect();
        commit_cases(&store, cases);
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = store.inbox("county", &token, 10).expect("page");
            seen.extend(page.cases.iter().map(|c| c.id.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            seen,
            (0..25).map(|i| format!("c{i:02}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn every_commit_is_synced_before_it_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let steps = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&steps);
        let store = SledStore::open(dir.path())
            .expect("open")
            .with_observer(Arc::new(move |s| log.lock().expect("lock").push(s)));
        commit_cases(&store, vec![write(None, case("a", "open", None), &[])]);
        assert_eq!(
            *steps.lock().expect("lock"),
            [
                SyncStep::Applied(vec![("a".to_owned(), 0)]),
                SyncStep::Flushed,
                SyncStep::Syncing,
                SyncStep::Synced
            ]
        );
    }

    #[test]
    fn oversized_records_are_refused_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let mut big = case("big", "open", None);
        big.outcome = "x".repeat(MAX_RECORD_BYTES);
        let commit = Commit {
            cases: vec![
                write(None, case("small", "open", None), &[]),
                write(None, big, &[]),
            ],
            ..Default::default()
        };
        assert!(matches!(
            store.commit(&commit),
            Err(StoreError::TooLarge { .. })
        ));
        assert_eq!(
            store.case("small").expect("read"),
            None,
            "nothing of a refused commit is written"
        );
    }

    #[test]
    fn the_feed_keeps_every_step_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let feed: Vec<FeedItem> = (1..=300)
            .map(|p| FeedItem {
                position: p,
                case_id: format!("c/{}", p % 7),
                sequence: p,
            })
            .collect();
        assert_eq!(store.last_position().expect("last"), 0);
        // Commits of uneven sizes, so reads start inside and at the edges of one.
        let mut from = 0;
        for size in [1, 2, 97, 50, 150] {
            store
                .commit(&Commit {
                    feed: feed[from..from + size].to_vec(),
                    ..Default::default()
                })
                .expect("commit");
            from += size;
        }
        assert_eq!(store.feed(0, 1000).expect("feed"), feed);
        for after in [0, 1, 2, 3, 99, 100, 101, 150, 298, 299, 300] {
            let got = store.feed(after, 10).expect("feed");
            let end = (after as usize + 10).min(300);
            assert_eq!(got, feed[after as usize..end], "after {after}");
        }
        assert_eq!(store.last_position().expect("last"), 300);
    }

    #[test]
    fn ordered_time_keeps_order_across_the_epoch() {
        let times = [
            "1960-01-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "2020-06-01T00:00:00Z",
            "2020-06-01T00:00:00.000000001Z",
        ];
        let keys: Vec<[u8; 8]> = times.iter().map(|t| ordered_time(at(t))).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(time_from_ordered(&keys[2]), at(times[2]));
    }
}
