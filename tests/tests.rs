//! govflow's integration tests: one binary, one module per area.

mod audit;
mod cli;
mod common;
mod crash;
mod damaged_workflows;
mod durable;
mod grpc;
mod invalid_files;
mod language;
mod shipped_workflows;
