//! The engine: a pure core that turns (workflow, case, input, time) into an
//! accepted step or a rejection, the coverage of the paths steps take, and
//! the durable engine that runs the core against a store.
//!
//! `core` and `coverage` are deterministic and free of I/O; `durable` is
//! where storage, clocks and threads come in.

pub mod core;
pub mod coverage;
pub mod durable;
mod prefetch;
pub mod replay;
mod requests;

#[cfg(test)]
pub(crate) mod testkit;

pub use self::core::{
    Actor, Case, ChildRef, Entry, Input, RejectCode, Rejection, Signature, SpawnRequest, StartArgs,
    Step, Timer, TimerKind, apply, start, start_child,
};
