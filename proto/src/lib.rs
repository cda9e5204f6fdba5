//! Generated protobuf types, and [`names`]: the short names under which enum values are stored
//! and shown. Other hand-written helpers live with the code that uses them.

pub mod names;

pub mod events {
    pub mod v1 {
        tonic::include_proto!("switchboard.events.v1");
    }
}

pub mod api {
    pub mod v1 {
        tonic::include_proto!("switchboard.api.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Switchboard proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_descriptor.bin"));
