//! Channel adapters. Input enters over HTTP ([`http`]), each adapter turns a provider payload
//! into an `InboundMessageReceived` event ([`chat`]), and output leaves through [`publisher`],
//! which answers only once Kafka has made the event durable.

pub mod chat;
pub mod error;
pub mod http;
pub mod publisher;

pub use http::{IngestSettings, serve};
