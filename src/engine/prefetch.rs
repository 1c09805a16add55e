//! Reading a case before its request reaches the writer.
//!
//! The writer keeps the cases it wrote last in memory; a step on any other
//! case reads it from the store on the writer's thread, which every change
//! goes through, so in a store much larger than that cache the reads would
//! set the pace. A caller can do the read itself, on its own thread, while
//! the writer works on earlier requests. [`CacheShadow`] tells the caller
//! which cases the writer may hold (so that hot cases are not read for
//! nothing), and gives the generation number that lets the writer know
//! whether the copy read is still the latest when it takes the request.
//!
//! Why a copy read at generation `g` is the latest if, when the writer takes
//! the request, the case is not in its cache and the generation is still
//! `g`: the writer puts every case it writes into its cache and forgets
//! cases only after every write handed on is applied to the store, and then
//! moves the generation on. So the case's last write was forgotten before
//! the caller read `g`, which means it was in the store before the caller
//! read the case.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::proto;

/// One bit per 64-bit word of this many: 2^20 bits, 128 KiB. With the
/// default cache of 100,000 cases about one case in ten outside the cache
/// is taken for a cached one and not prefetched: the writer reads it.
const WORDS: usize = 1 << 14;

/// Which cases the writer's cache may hold, and how many times it has
/// forgotten cases. Shared by the writer (which marks) and callers (which
/// ask).
pub(crate) struct CacheShadow {
    bits: Box<[AtomicU64]>,
    generation: AtomicU64,
    hasher: std::hash::RandomState,
}

/// A case a caller read from the store before sending its request.
#[derive(Debug)]
pub(crate) struct Prefetched {
    pub case: Box<proto::Case>,
    /// The shadow's generation before the read.
    pub generation: u64,
}

impl CacheShadow {
    pub(crate) fn new() -> Self {
        CacheShadow {
            bits: (0..WORDS).map(|_| AtomicU64::new(0)).collect(),
            generation: AtomicU64::new(0),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn slot(&self, id: &str) -> (usize, u64) {
        let mut h = self.hasher.build_hasher();
        h.write(id.as_bytes());
        let h = h.finish();
        ((h >> 6) as usize % WORDS, 1 << (h & 63))
    }

    /// The writer: `id` is now in its cache.
    pub(crate) fn mark(&self, id: &str) {
        let (word, bit) = self.slot(id);
        self.bits[word].fetch_or(bit, Ordering::Relaxed);
    }

    /// False only if the writer certainly does not hold `id`.
    pub(crate) fn may_hold(&self, id: &str) -> bool {
        let (word, bit) = self.slot(id);
        self.bits[word].load(Ordering::Relaxed) & bit != 0
    }

    /// The writer, after forgetting cases (and only once every write handed
    /// on is applied): the cache now holds just `kept`.
    pub(crate) fn forgot<'a>(&self, kept: impl Iterator<Item = &'a str>) {
        for word in self.bits.iter() {
            word.store(0, Ordering::Relaxed);
        }
        for id in kept {
            self.mark(id);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether a copy read at `prefetched.generation` may stand for the
    /// case, given that the writer does not hold it.
    pub(crate) fn current(&self, prefetched: &Prefetched) -> bool {
        prefetched.generation == self.generation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(generation: u64) -> Prefetched {
        Prefetched {
            case: Box::default(),
            generation,
        }
    }

    #[test]
    fn marked_cases_are_held_until_forgotten_unless_kept() {
        let shadow = CacheShadow::new();
        shadow.mark("a");
        shadow.mark("b");
        assert!(shadow.may_hold("a") && shadow.may_hold("b"));
        shadow.forgot(["b"].into_iter());
        assert!(!shadow.may_hold("a"));
        assert!(shadow.may_hold("b"));
    }

    #[test]
    fn few_cases_outside_the_cache_are_taken_for_cached_ones() {
        let shadow = CacheShadow::new();
        for i in 0..100_000 {
            shadow.mark(&format!("cached-{i}"));
        }
        let mistaken = (0..10_000)
            .filter(|i| shadow.may_hold(&format!("other-{i}")))
            .count();
        // 100,000 of 2^20 bits set: about 9.1 % expected.
        assert!(mistaken < 1_300, "{mistaken} of 10,000 taken for cached");
    }

    #[test]
    fn a_copy_read_before_the_writer_forgot_cases_is_not_current() {
        let shadow = CacheShadow::new();
        let before = copy(shadow.generation());
        assert!(shadow.current(&before));
        shadow.forgot(std::iter::empty());
        assert!(!shadow.current(&before));
        assert!(shadow.current(&copy(shadow.generation())));
    }
}
