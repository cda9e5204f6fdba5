//! What a caller may see, resolved once per request, and conversions shared by the query
//! services (JSON columns to `google.protobuf.Struct`, timestamps, ids, paging).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::access::{self, InboxAccess};
use crate::auth::Identity;
use crate::error::ApiError;

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 500;

/// The inboxes whose contents a caller may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Admins and super admins: every inbox of their account (I3).
    WholeAccount { account_id: String },
    /// Everyone else: the inboxes whose access list includes them (I2).
    Inboxes { account_id: String, inbox_ids: Vec<String> },
}

impl Scope {
    pub async fn resolve(connection: &mut PgConnection, identity: &Identity) -> Result<Scope, ApiError> {
        if access::sees_whole_account(identity) {
            return Ok(Scope::WholeAccount { account_id: identity.account_id.clone() });
        }
        let inboxes = account_inboxes(connection, &identity.account_id).await?;
        let inbox_ids =
            inboxes.into_iter().filter(|inbox| access::can_see(identity, inbox)).map(|inbox| inbox.inbox_id).collect();
        Ok(Scope::Inboxes { account_id: identity.account_id.clone(), inbox_ids })
    }

    pub fn account_id(&self) -> &str {
        match self {
            Scope::WholeAccount { account_id } | Scope::Inboxes { account_id, .. } => account_id,
        }
    }

    pub fn includes(&self, inbox_id: &str) -> bool {
        match self {
            Scope::WholeAccount { .. } => true,
            Scope::Inboxes { inbox_ids, .. } => inbox_ids.iter().any(|visible| visible == inbox_id),
        }
    }

    /// `None` for the whole account; otherwise the visible inbox ids (for `inbox_id = ANY(..)`).
    pub fn inbox_filter(&self) -> Option<&[String]> {
        match self {
            Scope::WholeAccount { .. } => None,
            Scope::Inboxes { inbox_ids, .. } => Some(inbox_ids),
        }
    }
}

pub async fn account_inboxes(connection: &mut PgConnection, account_id: &str) -> Result<Vec<InboxAccess>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT inbox_id, account_id, access_mode, access_user_ids, access_team_ids FROM inboxes WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_all(connection)
    .await?)
}

pub async fn inbox_access(
    connection: &mut PgConnection,
    account_id: &str,
    inbox_id: &str,
) -> Result<Option<InboxAccess>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT inbox_id, account_id, access_mode, access_user_ids, access_team_ids FROM inboxes \
         WHERE inbox_id = $1 AND account_id = $2",
    )
    .bind(inbox_id)
    .bind(account_id)
    .fetch_optional(connection)
    .await?)
}

/// Whether the caller may read things in `inbox_id`: it must be an inbox of the caller's own
/// account (for admins too, so that every call answers another account's inbox id alike, M1)
/// that the caller can see (I2).
pub async fn may_read_inbox(
    connection: &mut PgConnection,
    identity: &Identity,
    inbox_id: &str,
) -> Result<bool, ApiError> {
    Ok(inbox_access(connection, &identity.account_id, inbox_id)
        .await?
        .is_some_and(|inbox| access::sees_whole_account(identity) || access::can_see(identity, &inbox)))
}

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    switchboard_runtime::envelope::timestamp(at)
}

pub fn to_datetime(at: &Timestamp) -> Result<DateTime<Utc>, String> {
    let nanos = u32::try_from(at.nanos).map_err(|_| "nanos must not be negative".to_owned())?;
    DateTime::<Utc>::from_timestamp(at.seconds, nanos).ok_or_else(|| "is out of range".to_owned())
}

pub fn parse_uuid(field: &'static str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

pub fn optional_uuid(field: &'static str, value: &str) -> Result<Option<Uuid>, ApiError> {
    if value.is_empty() { Ok(None) } else { parse_uuid(field, value).map(Some) }
}

/// Page sizes above the cap are reduced rather than refused (AIP-158).
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    }
}

/// Keyset cursor over `(instant, uuid)` descending, tagged with what it sorts by so a token is
/// never reused with another order or list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub order_tag: char,
    pub micros: i64,
    pub id: Uuid,
}

impl PageCursor {
    pub fn encode(&self) -> String {
        format!("v1.{}.{}.{}", self.order_tag, self.micros, self.id.simple())
    }

    pub fn decode(token: &str, expected_tag: char) -> Result<Self, ApiError> {
        let invalid = || ApiError::invalid("page_token", "is not a token returned by this list with this order");
        let mut parts = token.split('.');
        let (Some("v1"), Some(tag), Some(micros), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        if tag.len() != 1 || !tag.starts_with(expected_tag) {
            return Err(invalid());
        }
        Ok(PageCursor {
            order_tag: expected_tag,
            micros: micros.parse().map_err(|_| invalid())?,
            id: Uuid::parse_str(id).map_err(|_| invalid())?,
        })
    }

    pub fn instant(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_micros(self.micros).unwrap_or(DateTime::UNIX_EPOCH)
    }
}

pub fn json_to_struct(value: &serde_json::Value) -> Option<Struct> {
    match json_to_value(value).kind {
        Some(Kind::StructValue(object)) => Some(object),
        _ => None,
    }
}

fn json_to_value(value: &serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(flag) => Kind::BoolValue(*flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or_default()),
        serde_json::Value::String(text) => Kind::StringValue(text.clone()),
        serde_json::Value::Array(items) => {
            Kind::ListValue(ListValue { values: items.iter().map(json_to_value).collect() })
        }
        serde_json::Value::Object(fields) => Kind::StructValue(Struct {
            fields: fields.iter().map(|(key, value)| (key.clone(), json_to_value(value))).collect::<BTreeMap<_, _>>(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_tokens_are_invalid_arguments() {
        let cursor = PageCursor { order_tag: 's', micros: 1_700_000_000_123_456, id: Uuid::now_v7() };
        assert_eq!(PageCursor::decode(&cursor.encode(), 's').unwrap(), cursor);
        assert!(PageCursor::decode(&cursor.encode(), 'u').is_err(), "a token is tied to its order");
        for bad in ["", "v1", "v2.s.1.00000000000000000000000000000000", "v1.s.x.abc", "v1.s.1.abc.extra"] {
            assert!(matches!(PageCursor::decode(bad, 's'), Err(ApiError::InvalidArgument(_))), "{bad}");
        }
    }

    #[test]
    fn page_size_defaults_and_is_capped() {
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(100_000), MAX_PAGE_SIZE);
    }

    #[test]
    fn json_objects_become_structs() {
        let json = serde_json::json!({"a": [1, "x", null], "b": {"c": true}});
        let object = json_to_struct(&json).unwrap();
        assert_eq!(object.fields.len(), 2);
        assert!(json_to_struct(&serde_json::json!([1])).is_none());
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(matches!(parse_uuid("message_id", ""), Err(ApiError::InvalidArgument(_))));
        assert!(matches!(parse_uuid("message_id", "42"), Err(ApiError::InvalidArgument(_))));
        assert!(parse_uuid("message_id", &Uuid::now_v7().to_string()).is_ok());
        assert_eq!(optional_uuid("contact_id", "").unwrap(), None);
    }
}
