//! Channel adapters. Input enters over HTTP ([`http`]) or SMTP ([`smtp`]); each channel module
//! turns its provider's wire format into events, purely ([`email`], [`chat`], [`messenger`],
//! [`whatsapp`], [`forms`], [`calls`], [`custom`]; [`widget`] answers the chat widget, with
//! open-conversation counts that [`workload`] reads from the read models in the background); output
//! leaves through [`intake`] and the runtime's `EnvelopePublisher`, which answer only once Kafka
//! has made the events durable. The one outbound path: [`chat_stream`] streams chat replies from
//! the delivery service's table to the visitor's widget (C5).

pub mod calls;
pub mod channel;
pub mod chat;
pub mod chat_stream;
pub mod custom;
pub mod email;
pub mod error;
pub mod forms;
#[cfg(test)]
mod fuzz_tests;
pub mod http;
pub mod intake;
pub mod messenger;
pub mod meta;
pub mod metrics;
pub mod secrets;
pub mod signature;
pub mod smtp;
pub mod whatsapp;
pub mod widget;
pub mod workload;

pub use http::{BoundAddresses, IngestSettings, serve, serve_all};
