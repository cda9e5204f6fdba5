//! Channel secrets (the file named by `INGEST_SECRETS_FILE`): one implementation, shared with
//! the delivery service, in [`switchboard_runtime::secrets`].

pub use switchboard_runtime::secrets::{AccountSecrets, ChannelSecrets, Secret, Secrets};
