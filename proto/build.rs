//! Generates Rust types for every `.proto` under this directory, plus a file descriptor set
//! that the API embeds for gRPC server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "switchboard/events/v1/events.proto",
        "switchboard/api/v1/conversations.proto",
        "switchboard/api/v1/workspace.proto",
        "switchboard/api/v1/admin.proto",
    ];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("switchboard_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
