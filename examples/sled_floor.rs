//! What sled alone does on this machine in the shape govflow uses it: one
//! thread applying batches of steps, another flushing and `fdatasync`ing
//! what was applied. A step writes what a `keep_deadline` step of the
//! benchmark writes: a case record overwritten in place and a history entry
//! appended, of the benchmark's sizes. Nothing else runs, so the figure is
//! a ceiling for durable transitions per second (see BENCHMARKS.md).
//!
//!     cargo run --release --example sled_floor -- [steps per batch] [seconds]

// The allocator the `govflow` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::mpsc;
use std::time::Instant;

use govflow::store::{DEFAULT_CACHE_BYTES, sled_config};

const CASES: usize = 10_000;
/// The benchmark's record sizes: a 包联 case and one of its history entries.
const CASE_BYTES: usize = 1434;
const ENTRY_BYTES: usize = 530;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let per_batch: usize = args.next().map_or(Ok(27), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let db = sled_config(dir.path(), DEFAULT_CACHE_BYTES).open()?;
    let log = std::fs::File::open(dir.path().join("db"))?;
    let case_key = |c: usize| format!("C\0case-{c:08}").into_bytes();
    for c in 0..CASES {
        db.insert(case_key(c), vec![0u8; CASE_BYTES])?;
    }
    db.flush()?;

    let (applied, to_sync) = mpsc::sync_channel::<usize>(4);
    let syncing = db.clone();
    let syncer = std::thread::spawn(move || -> sled::Result<usize> {
        let mut synced = 0;
        while let Ok(first) = to_sync.recv() {
            let steps = first + to_sync.try_iter().sum::<usize>();
            syncing.flush()?;
            log.sync_data()?;
            synced += steps;
        }
        Ok(synced)
    });
    let mut sequence = vec![0u64; CASES];
    let mut random = 0x2545_f491_4f6c_dd1d_u64;
    let started = Instant::now();
    while started.elapsed().as_secs() < seconds {
        let mut batch = sled::Batch::default();
        for _ in 0..per_batch {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            let c = (random % CASES as u64) as usize;
            sequence[c] += 1;
            let mut case = vec![0u8; CASE_BYTES];
            case[..8].copy_from_slice(&sequence[c].to_be_bytes());
            batch.insert(case_key(c), case);
            let mut entry_key = format!("H\0case-{c:08}\0").into_bytes();
            entry_key.extend_from_slice(&sequence[c].to_be_bytes());
            batch.insert(entry_key, vec![0u8; ENTRY_BYTES]);
        }
        db.apply_batch(batch)?;
        applied.send(per_batch)?;
    }
    drop(applied);
    let synced = syncer.join().map_err(|_| "the syncer panicked")??;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "sled alone: {synced} durable steps in {elapsed:.1} s = {:.0}/s ({per_batch} per batch)",
        synced as f64 / elapsed
    );
    Ok(())
}
