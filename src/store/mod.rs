//! Durable storage of workflows, cases, histories, timers and indexes.

/// The prost messages of `proto/govflow/v1`: the records on disk and on the wire.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/govflow.v1.rs"));
}
