//! govflow: cross-department workflows as RON state-machine graphs.
//!
//! See ARCHITECTURE.md for the code map and the invariants each module keeps.

pub mod audit;
pub mod calendar;
pub mod catalogue;
pub mod engine;
pub mod files;
pub mod lang;
pub mod render;
pub mod scenario;
pub mod server;
pub mod store;
