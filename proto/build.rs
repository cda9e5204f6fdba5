//! Generates Rust types for every `.proto` under this directory, plus a file descriptor set
//! that the API embeds for gRPC server reflection.
//!
//! The compiler and Google's well-known `.proto` files (timestamp, duration, ...) come from
//! `protoc-bin-vendored`, never from the system: a Debian `protoc` without
//! `libprotobuf-dev` compiles nothing that imports `google/protobuf/*.proto`, and a build that
//! depends on what happens to be installed passes on one machine and fails on the next.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "switchboard/events/v1/events.proto",
        "switchboard/api/v1/conversations.proto",
        "switchboard/api/v1/workspace.proto",
        "switchboard/api/v1/admin.proto",
    ];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known_includes = protoc_bin_vendored::include_path()?;
    // Large nested messages are boxed so the event types stay small: the router builds, moves
    // and drops several envelopes per decision, and an inline `InboundContent` made every
    // `Envelope` 1.4 KB (docs/benchmarks.md, router). Wire format unchanged.
    tonic_prost_build::configure()
        .boxed(".switchboard.events.v1.InboundMessageReceived.content")
        .boxed(".switchboard.events.v1.MessageAppended.content")
        .boxed(".switchboard.events.v1.MessageWithheld.message")
        .boxed(".switchboard.events.v1.Envelope.payload.channel_configured")
        // Every payload's snake_case name (`inbound_message_received`), for headers, logs and
        // errors: derived from the variant, so a new event type needs no hand-written name.
        .enum_attribute(
            ".switchboard.events.v1.Envelope.payload",
            "#[derive(strum::IntoStaticStr)] #[strum(serialize_all = \"snake_case\")]",
        )
        .file_descriptor_set_path(out_dir.join("switchboard_descriptor.bin"))
        .compile_with_config(prost_config, &protos.map(PathBuf::from), &[PathBuf::from("."), well_known_includes])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
