//! Durable storage of workflows, cases, histories, timers and indexes.
//!
//! The engine talks to a [`Store`]; [`SledStore`] is the embedded default. A
//! store never interprets workflows: the engine hands it records and the
//! index entries each case should have, and the store keeps them.

pub mod canonical;
pub(crate) mod keys;
pub mod records;
mod sled_store;

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};

pub(crate) use sled_store::open_db;
pub use sled_store::{
    DEFAULT_CACHE_BYTES, FORMAT, MAX_RECORD_BYTES, SEGMENT_BYTES, SledStore, SyncObserver,
    SyncStep, sled_config,
};

/// The prost messages of `proto/govflow/v1`: the records on disk and on the wire.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/govflow.v1.rs"));
}

impl StoreError {
    /// Whether the store's own data is damaged (not the disk full, a lock, …).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Sled(sled::Error::Corruption { .. })
                | StoreError::Decode { .. }
                | StoreError::Corrupt(_)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {}", sled_message(.0))]
    Sled(#[from] sled::Error),
    #[error("storage I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage holds a record that does not decode ({what}): {source}")]
    Decode {
        what: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("storage holds a damaged record: {0}")]
    Corrupt(String),
    #[error("storage failed with a panic in {0}")]
    Panicked(String),
    #[error(
        "the store {path} is of format {found}, written by a newer govflow; this one reads format {} and older: use a govflow that reads it",
        sled_store::FORMAT
    )]
    NewerFormat { path: String, found: u32 },
    #[error("a record of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error(
        "storage failed earlier ({0}); nothing is read until govflow is restarted on it, since what it holds in memory may include steps that never reached the disk"
    )]
    Failed(String),
    #[error(
        "the store {path} is in use by another process (a govflow already running on it?): stop that one, or give another data folder"
    )]
    InUse { path: String },
}

/// What a sled error says, in words an operator acts on. sled hands a
/// failed write on to later calls as a copy whose text is the original's
/// debug form (`Os { code: 28, kind: StorageFull, … }`), but keeps its kind.
pub fn sled_message(e: &sled::Error) -> String {
    use std::io::ErrorKind;
    match e {
        // sled's own text shows the offset as a debug value and ends in an
        // empty backtrace.
        sled::Error::Corruption { at: Some(at), .. } => {
            format!("its data is corrupt (at byte {} of its log)", at.lid())
        }
        sled::Error::Corruption { at: None, .. } => "its data is corrupt".to_owned(),
        sled::Error::Io(io) => match io.kind() {
            ErrorKind::StorageFull => {
                "the disk holding the data folder is full (no space left on the device): free space and restart the server".to_owned()
            }
            ErrorKind::ReadOnlyFilesystem => {
                "the data folder is on a read-only file system".to_owned()
            }
            ErrorKind::PermissionDenied => {
                "permission denied on the data folder's files".to_owned()
            }
            _ => format!("I/O error: {io}"),
        },
        other => other.to_string(),
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An index a case appears in, so that lists and inboxes cost what they return.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexKey {
    /// Cases of a workflow.
    Workflow(String),
    /// Cases of a workflow in a state.
    State { workflow: String, state: String },
    /// Cases in which an agency holds a role.
    Agency(String),
    /// Cases in which an agency can act now (its inbox).
    Inbox(String),
    /// Cases of a workflow whose searchable variable has a value.
    Variable {
        workflow: String,
        name: String,
        value: String,
    },
}

/// One case written by a commit: its record after, the history entries the
/// commit appends, and its index entries before and after. The store writes
/// only the difference of the two, so a writer that knows they are equal
/// may leave both empty.
#[derive(Debug, Clone)]
pub struct CaseWrite {
    pub before: Option<Arc<proto::Case>>,
    pub after: Arc<proto::Case>,
    pub entries: Vec<proto::HistoryEntry>,
    pub index_before: BTreeSet<IndexKey>,
    pub index_after: BTreeSet<IndexKey>,
}

/// Everything one commit writes, atomically.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub cases: Vec<CaseWrite>,
    /// This commit's number: its requests' outcomes are stored under it.
    /// Numbers grow across restarts (see [`Store::scan_requests`]).
    pub number: u64,
    /// The requests this commit answered and their outcomes, so that
    /// retries get the first answer.
    pub requests: Vec<proto::RecordedRequest>,
    pub workflows: Vec<proto::WorkflowVersion>,
    /// The history entries of this commit in the order they happened, each
    /// at its position in the store-wide event feed.
    pub feed: Vec<FeedItem>,
}

/// One history entry's place in the store-wide event feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedItem {
    /// 1, 2, … across every case: watchers resume after a position.
    pub position: u64,
    pub case_id: String,
    pub sequence: u64,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
            && self.requests.is_empty()
            && self.workflows.is_empty()
            && self.feed.is_empty()
    }
}

/// A timer that has come due. Ordered as timers fire: by due time, then
/// case, then timer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DueTimer {
    pub due: DateTime<Utc>,
    pub case_id: String,
    pub timer_id: String,
}

/// Which cases to list.
#[derive(Debug, Clone, Default)]
pub struct CaseFilter {
    pub workflow: Option<String>,
    pub state: Option<String>,
    /// Only cases in which this agency holds a role.
    pub agency: Option<String>,
    /// A searchable variable and the value it must have (as indexed: a
    /// string as itself, any other value as JSON text).
    pub variable: Option<(String, String)>,
}

impl CaseFilter {
    /// Whether `case` is one the filter selects.
    pub fn matches(&self, case: &proto::Case) -> bool {
        self.workflow.as_ref().is_none_or(|w| case.workflow == *w)
            && self.state.as_ref().is_none_or(|s| case.state == *s)
            && self
                .agency
                .as_ref()
                .is_none_or(|a| case.bindings.values().any(|b| b == a))
            && self.variable.as_ref().is_none_or(|(name, value)| {
                case.variables
                    .as_ref()
                    .and_then(|v| v.fields.get(name))
                    .map(records::from_value)
                    .and_then(records::indexed_text)
                    .is_some_and(|text| text == *value)
            })
    }
}

/// A page of case ids and the token for the next one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    pub cases: Vec<proto::Case>,
    /// Empty when there is no further page.
    pub next_page_token: String,
    /// For a listing not in id order: beside each case, the token that goes
    /// on after it (a page cut short must end on one). Empty in id order,
    /// where a case's id is that token.
    pub tokens_after: Vec<String>,
}

impl Page {
    /// Keeps the first `n` cases, the next page going on after the last.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.cases.len() {
            return;
        }
        self.cases.truncate(n);
        self.next_page_token = match n.checked_sub(1) {
            Some(last) => self
                .tokens_after
                .get(last)
                .cloned()
                .unwrap_or_else(|| self.cases[last].id.clone()),
            None => String::new(),
        };
        self.tokens_after.truncate(n);
    }
}

/// Storage for the engine. Applying a commit is atomic (all of it or none of
/// it is there after a crash); it is durable once a later `sync` returns.
pub trait Store: Send + Sync + 'static {
    /// Writes commits, in order, as one atomic write: readers see them at
    /// once, a crash may lose them (all together) until [`Store::sync`]
    /// returns. One write for many commits is what keeps the store's cost
    /// per commit down when commits queue up.
    fn apply_all(&self, commits: &[&Commit]) -> Result<()>;
    /// Writes one commit atomically (see [`Store::apply_all`]).
    fn apply(&self, commit: &Commit) -> Result<()> {
        self.apply_all(&[commit])
    }
    /// Hands every commit applied so far to the operating system, so that
    /// the next [`Store::sync`] has only to make it durable. Separate from
    /// `sync` so that one thread can write the next batch out while another
    /// waits for the disk.
    fn write_out(&self) -> Result<()>;
    /// Makes every commit written out so far durable.
    fn sync(&self) -> Result<()>;
    /// Applies, writes out and syncs.
    fn commit(&self, commit: &Commit) -> Result<()> {
        self.apply(commit)?;
        self.write_out()?;
        self.sync()
    }
    fn case(&self, id: &str) -> Result<Option<proto::Case>>;
    /// History entries of a case from `from_sequence` on, in order, at most
    /// `limit` of them (a page, a watch's few steps: not the rest of a long
    /// history each time).
    fn history(
        &self,
        id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<proto::HistoryEntry>>;
    /// Calls `each` with every recorded request id and the number of the
    /// commit holding its outcome (0 for a record of the earlier layout, one
    /// key per request), in commit order; returns the highest commit number.
    /// The engine builds its in-memory index of request ids from this.
    fn scan_requests(&self, each: &mut dyn FnMut(&str, u64)) -> Result<u64>;
    /// The outcome of `request_id` if commit `number` recorded one.
    fn request_outcome(
        &self,
        number: u64,
        request_id: &str,
    ) -> Result<Option<proto::RequestOutcome>>;
    fn workflow_versions(&self) -> Result<Vec<proto::WorkflowVersion>>;
    /// Timers due at or before `until`, earliest first, from after `after`
    /// (in that order) when given: up to `limit` of them that `skip` does
    /// not pass over (those do not count).
    fn due_timers(
        &self,
        until: DateTime<Utc>,
        after: Option<&DueTimer>,
        limit: usize,
        skip: &dyn Fn(&DueTimer) -> bool,
    ) -> Result<Vec<DueTimer>>;
    /// Cases matching `filter`, by id, from after `page_token`.
    fn list(&self, filter: &CaseFilter, page_token: &str, page_size: usize) -> Result<Page>;
    /// Cases in which `agency` can act now, by id.
    fn inbox(&self, agency: &str, page_token: &str, page_size: usize) -> Result<Page>;
    /// Every case id, in order (for audits and migration checks).
    fn case_ids(&self, after: &str, limit: usize) -> Result<Vec<String>>;
    /// Feed items after `position`, in order.
    fn feed(&self, after: u64, limit: usize) -> Result<Vec<FeedItem>>;
    /// The position of the last feed item (0 when there is none).
    fn last_position(&self) -> Result<u64>;
    /// A random secret of this store's own, the same every time it is
    /// opened: the key that seals page tokens and derives case ids, so that
    /// neither can be forged or predicted by a caller.
    fn secret(&self) -> [u8; 32];
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk is said as such, also when sled passes on its copy of
    /// the error (whose text is the original's debug form).
    #[test]
    fn a_full_disk_is_said_in_words() {
        let full = std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "Os { code: 28, kind: StorageFull, message: \"No space left on device\" }",
        );
        let said = super::StoreError::Sled(sled::Error::Io(full)).to_string();
        assert!(
            said.contains("the disk holding the data folder is full"),
            "{said}"
        );
        assert!(!said.contains("Os {"), "{said}");
    }

    /// Regression: a deadline listing cut short to fit an answer ended on a
    /// case id, which is no token of that listing: the next page was refused.
    #[test]
    fn a_page_cut_short_goes_on_after_its_last_case() {
        let case = |id: &str| proto::Case {
            id: id.into(),
            ..Default::default()
        };
        let mut by_due = Page {
            cases: vec![case("c"), case("a"), case("b")],
            next_page_token: "after-b".into(),
            tokens_after: vec!["after-c".into(), "after-a".into(), "after-b".into()],
        };
        by_due.truncate(2);
        assert_eq!(by_due.cases.len(), 2);
        assert_eq!(by_due.next_page_token, "after-a");
        assert_eq!(by_due.tokens_after, ["after-c", "after-a"]);
        let mut by_id = Page {
            cases: vec![case("a"), case("b")],
            ..Default::default()
        };
        by_id.truncate(1);
        assert_eq!(by_id.next_page_token, "a");
        let mut whole = by_id.clone();
        whole.truncate(5);
        assert_eq!(whole, by_id);
    }
}
