//! Compiles the .proto files with protox (pure Rust), so no system `protoc`
//! is needed to build Tollgate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tollgate/v1/edge.proto",
        "proto/tollgate/v1/admin.proto",
        "proto/tollgate/v1/raft.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
