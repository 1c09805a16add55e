//! Compiles `proto/` in pure Rust (protox), so no `protoc` install is needed,
//! and keeps the descriptor set for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: [&str; 4] = [
    "govflow/v1/records.proto",
    "govflow/v1/definitions.proto",
    "govflow/v1/cases.proto",
    "govflow/v1/audit.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("govflow_descriptor.bin"),
        prost::Message::encode_to_vec(&files),
    )?;
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(files)?;
    Ok(())
}
