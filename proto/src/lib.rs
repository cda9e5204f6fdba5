//! Generated protobuf types. Hand-written helpers live with the code that uses them.

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
