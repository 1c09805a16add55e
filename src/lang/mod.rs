//! The workflow language: model, loading, location of diagnostics, validation.

pub mod deployed;
pub mod diag;
pub mod expr;
pub mod load;
pub mod locate;
pub mod model;
pub mod validate;
pub mod value;
