//! The writer's index of request ids: which commit holds the outcome of each
//! request id ever answered.
//!
//! Outcomes are stored one record per commit (not one key per request, which
//! cost the store a fifth of its throughput), so finding a request id needs
//! this index. It keeps a 64-bit hash of each id, not the id: about 20 bytes a
//! request. Two ids may share a hash; the index then answers both commits and
//! the caller reads each record and compares the ids, so a clash costs a read,
//! never a wrong answer.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// Request id (by hash) → the commits that may hold its outcome.
#[derive(Debug, Default)]
pub struct RequestIndex<S = RandomState> {
    first: HashMap<u64, u64>,
    /// Further commits of hashes seen more than once: rare.
    more: HashMap<u64, Vec<u64>>,
    hasher: S,
}

impl RequestIndex {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S: BuildHasher> RequestIndex<S> {
    #[cfg(test)]
    fn with_hasher(hasher: S) -> Self {
        RequestIndex {
            first: HashMap::new(),
            more: HashMap::new(),
            hasher,
        }
    }

    /// Notes that commit `number` holds the outcome of `request_id`.
    pub fn insert(&mut self, request_id: &str, number: u64) {
        let hash = self.hasher.hash_one(request_id);
        match self.first.get(&hash) {
            None => {
                self.first.insert(hash, number);
            }
            Some(&n) if n == number => {}
            Some(_) => self.more.entry(hash).or_default().push(number),
        }
    }

    /// The commits that may hold the outcome of `request_id`, oldest first;
    /// none for an id never seen.
    pub fn commits(&self, request_id: &str) -> Vec<u64> {
        let hash = self.hasher.hash_one(request_id);
        let Some(&first) = self.first.get(&hash) else {
            return Vec::new();
        };
        let mut commits = vec![first];
        if let Some(more) = self.more.get(&hash) {
            commits.extend(more);
        }
        commits
    }

    /// How many request ids the index holds (ids sharing a hash and a
    /// commit count once).
    pub fn len(&self) -> usize {
        self.first.len() + self.more.values().map(Vec::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasherDefault;

    use super::*;

    /// Every id gets the same hash: the worst case of clashes.
    #[derive(Default)]
    struct Clashing;

    impl std::hash::Hasher for Clashing {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn an_id_never_seen_has_no_commit_and_a_seen_one_has_its_own() {
        let mut index = RequestIndex::new();
        assert!(index.commits("r-1").is_empty());
        index.insert("r-1", 4);
        index.insert("r-2", 9);
        assert_eq!(index.commits("r-1"), vec![4]);
        assert_eq!(index.commits("r-2"), vec![9]);
        assert!(index.commits("r-3").is_empty());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn ids_that_share_a_hash_answer_every_commit_in_order() {
        let mut index = RequestIndex::with_hasher(BuildHasherDefault::<Clashing>::default());
        index.insert("a", 1);
        index.insert("b", 2);
        index.insert("c", 5);
        // Each candidate commit is read and its ids compared by the caller.
        assert_eq!(index.commits("a"), vec![1, 2, 5]);
        assert_eq!(index.commits("anything"), vec![1, 2, 5]);
        assert_eq!(index.len(), 3);
    }
}
