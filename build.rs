//! Compiles `proto/` in pure Rust (protox), so no `protoc` install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["govflow/v1/records.proto"], ["proto"])?;
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(files)?;
    Ok(())
}
