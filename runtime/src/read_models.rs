//! Which read-model schema is active: the contract between the projector, which creates
//! schemas and switches between them, and every reader (API, ingest's chat widget)
//! (docs/contracts.md). One row in `public.read_model_control`; no row or no table means
//! `public`.

use sqlx::PgPool;

/// The schema read models live in until the first switch.
pub const DEFAULT_SCHEMA: &str = "public";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("`{0}` is not a read-model schema name (expected `public` or `rm_<yyyymmddhhmmss>`)")]
    InvalidName(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A schema name the projector creates or a reader accepts: `public`, or `rm_` followed by
/// digits, lower-case letters and underscores. Names end up in `SET search_path` and
/// `DROP SCHEMA` statements, so nothing else is allowed.
pub fn validate_schema_name(name: &str) -> Result<&str, SchemaError> {
    let valid = name == DEFAULT_SCHEMA
        || (name.starts_with("rm_")
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    if valid { Ok(name) } else { Err(SchemaError::InvalidName(name.to_owned())) }
}

/// The schema readers should use now.
pub async fn active_schema(pool: &PgPool) -> Result<String, SchemaError> {
    let row: Result<Option<String>, sqlx::Error> =
        sqlx::query_scalar("SELECT active_schema FROM public.read_model_control LIMIT 1").fetch_optional(pool).await;
    match row {
        Ok(Some(schema)) => Ok(validate_schema_name(&schema)?.to_owned()),
        Ok(None) => Ok(DEFAULT_SCHEMA.to_owned()),
        // Undefined table: the control table's migration never ran, so nothing was switched.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P01") => Ok(DEFAULT_SCHEMA.to_owned()),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b4_only_public_and_rm_schemas_are_accepted() {
        assert!(validate_schema_name("public").is_ok());
        assert!(validate_schema_name("rm_20261121093000").is_ok());
        for bad in ["", "Public", "1abc", "rm; DROP TABLE x", "public\"; DROP TABLE agents; --", "other"] {
            assert!(validate_schema_name(bad).is_err(), "{bad}");
        }
    }
}
