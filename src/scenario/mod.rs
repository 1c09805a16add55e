//! Scenario files: a workflow author's tests, written in RON, run on virtual time.

pub mod model;
pub mod run;

pub use model::Scenario;
