//! `replay verify`: compares the read models of two schemas table by table, by row count and
//! an order-independent content checksum, and shows a few rows that differ.
//!
//! Compared: every table of either schema, every column, except what legitimately differs
//! between two builds of the same log:
//! - `projector_positions.updated_at` (wall-clock time of the write),
//! - `conversation_changes.change_id` (a sequence: the resume token of the schema it lives in),
//! - tables `projector_lag` (a measurement) and `_sqlx_migrations` (install times).

use std::collections::BTreeSet;

use anyhow::Context;
use sqlx::PgPool;

use crate::schema::validate_schema_name;

const SKIPPED_TABLES: &[&str] = &["_sqlx_migrations", "projector_lag", "read_model_control"];
const SKIPPED_COLUMNS: &[(&str, &str)] =
    &[("projector_positions", "updated_at"), ("conversation_changes", "change_id")];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    /// `None`: the table does not exist in that schema.
    pub a: Option<TableChecksum>,
    pub b: Option<TableChecksum>,
    /// Up to five rows (as text) found only in the first schema, then only in the second.
    pub only_in_a: Vec<String>,
    pub only_in_b: Vec<String>,
}

/// A table's row count and the sum of its rows' 64-bit hashes (as text: it outgrows `bigint`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TableChecksum {
    pub row_count: i64,
    pub hash_sum: String,
}

impl TableReport {
    pub fn matches(&self) -> bool {
        self.a.is_some() && self.a == self.b
    }
}

pub async fn verify(pool: &PgPool, schema_a: &str, schema_b: &str) -> anyhow::Result<Vec<TableReport>> {
    validate_schema_name(schema_a)?;
    validate_schema_name(schema_b)?;
    let tables_a = tables(pool, schema_a).await?;
    let tables_b = tables(pool, schema_b).await?;
    anyhow::ensure!(!tables_a.is_empty(), "schema {schema_a} has no read-model tables");
    anyhow::ensure!(!tables_b.is_empty(), "schema {schema_b} has no read-model tables");
    let mut reports = Vec::new();
    for table in tables_a.union(&tables_b) {
        let columns = columns(pool, schema_a, schema_b, table).await?;
        let a = if tables_a.contains(table) { Some(checksum(pool, schema_a, table, &columns).await?) } else { None };
        let b = if tables_b.contains(table) { Some(checksum(pool, schema_b, table, &columns).await?) } else { None };
        let mut report = TableReport { table: table.clone(), a, b, only_in_a: Vec::new(), only_in_b: Vec::new() };
        if !report.matches() && report.a.is_some() && report.b.is_some() {
            report.only_in_a = sample_difference(pool, schema_a, schema_b, table, &columns).await?;
            report.only_in_b = sample_difference(pool, schema_b, schema_a, table, &columns).await?;
        }
        reports.push(report);
    }
    Ok(reports)
}

async fn tables(pool: &PgPool, schema: &str) -> anyhow::Result<BTreeSet<String>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .with_context(|| format!("failed to list the tables of {schema}"))?;
    Ok(names.into_iter().filter(|name| !SKIPPED_TABLES.contains(&name.as_str())).collect())
}

/// Columns both schemas have (a column only one side has shows up as a checksum difference of
/// no use; migrations are the same, so this only matters across schema versions).
async fn columns(pool: &PgPool, schema_a: &str, schema_b: &str, table: &str) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT a.column_name::text FROM information_schema.columns a \
         JOIN information_schema.columns b ON b.table_schema = $2 AND b.table_name = a.table_name AND b.column_name = a.column_name \
         WHERE a.table_schema = $1 AND a.table_name = $3 ORDER BY a.ordinal_position",
    )
    .bind(schema_a)
    .bind(schema_b)
    .bind(table)
    .fetch_all(pool)
    .await?;
    let names = if names.is_empty() {
        // The table exists on one side only: its own columns.
        sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema IN ($1, $2) AND table_name = $3 \
             ORDER BY ordinal_position",
        )
        .bind(schema_a)
        .bind(schema_b)
        .bind(table)
        .fetch_all(pool)
        .await?
    } else {
        names
    };
    Ok(names.into_iter().filter(|column| !SKIPPED_COLUMNS.contains(&(table, column.as_str()))).collect())
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn row_text_query(schema: &str, table: &str, columns: &[String]) -> String {
    let list: Vec<String> = columns.iter().map(|column| quote(column)).collect();
    format!("SELECT ROW({})::text AS r FROM {}.{}", list.join(", "), quote(schema), quote(table))
}

/// Row count and the sum of 64-bit row hashes: independent of row order and streaming (no
/// sort, no giant string), so it works on millions of rows.
async fn checksum(pool: &PgPool, schema: &str, table: &str, columns: &[String]) -> anyhow::Result<TableChecksum> {
    let statement = format!(
        "SELECT count(*) AS row_count, \
         coalesce(sum(('x' || substr(md5(r), 1, 16))::bit(64)::bigint::numeric), 0)::text AS hash_sum FROM ({}) rows",
        row_text_query(schema, table, columns)
    );
    sqlx::query_as(&statement).fetch_one(pool).await.with_context(|| format!("failed to checksum {schema}.{table}"))
}

async fn sample_difference(
    pool: &PgPool,
    from: &str,
    other: &str,
    table: &str,
    columns: &[String],
) -> anyhow::Result<Vec<String>> {
    let statement = format!(
        "({}) EXCEPT ALL ({}) LIMIT 5",
        row_text_query(from, table, columns),
        row_text_query(other, table, columns)
    );
    Ok(sqlx::query_scalar(&statement).fetch_all(pool).await?)
}

/// Human-readable report; the second value says whether everything matched.
pub fn render(reports: &[TableReport], schema_a: &str, schema_b: &str) -> (String, bool) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut all_match = true;
    let _ = writeln!(out, "{:<24} {:>12} {:>12}  result", "table", schema_a, schema_b);
    for report in reports {
        let count =
            |side: &Option<TableChecksum>| side.as_ref().map_or("missing".to_owned(), |sum| sum.row_count.to_string());
        let result = if report.matches() {
            "same"
        } else if report.a.as_ref().map(|sum| sum.row_count) == report.b.as_ref().map(|sum| sum.row_count) {
            "DIFFERENT CONTENT"
        } else {
            "DIFFERENT COUNT"
        };
        all_match &= report.matches();
        let _ = writeln!(out, "{:<24} {:>12} {:>12}  {result}", report.table, count(&report.a), count(&report.b));
        for row in &report.only_in_a {
            let _ = writeln!(out, "    only in {schema_a}: {row}");
        }
        for row in &report.only_in_b {
            let _ = writeln!(out, "    only in {schema_b}: {row}");
        }
    }
    let _ = writeln!(out, "{}", if all_match { "zero differences" } else { "differences found" });
    (out, all_match)
}
