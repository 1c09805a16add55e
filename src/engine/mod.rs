//! The engine: a pure core that turns (workflow, case, input, time) into an
//! accepted step or a rejection, and the coverage of the paths steps take.
//!
//! Everything here is deterministic and free of I/O; storage, clocks and the
//! network are the callers' business.

pub mod core;
pub mod coverage;

#[cfg(test)]
pub(crate) mod testkit;

pub use self::core::{
    Actor, Case, ChildRef, Entry, Input, RejectCode, Rejection, Signature, SpawnRequest, StartArgs,
    Step, Timer, TimerKind, apply, start, start_child,
};
