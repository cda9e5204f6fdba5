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
    // Large nested messages are boxed so the event types stay small: the router builds, moves
    // and drops several envelopes per decision, and an inline `InboundContent` made every
    // `Envelope` 1.4 KB (docs/benchmarks.md, router). Wire format unchanged.
    tonic_prost_build::configure()
        .boxed(".switchboard.events.v1.InboundMessageReceived.content")
        .boxed(".switchboard.events.v1.MessageAppended.content")
        .boxed(".switchboard.events.v1.MessageWithheld.message")
        .boxed(".switchboard.events.v1.Envelope.payload.channel_configured")
        .file_descriptor_set_path(out_dir.join("switchboard_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
