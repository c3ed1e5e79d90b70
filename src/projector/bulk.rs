//! Bulk writes for Rust projectors: [`copy_rows`] loads rows with a binary
//! `COPY ... FROM STDIN`, the fastest way rows enter PostgreSQL, for
//! projectors that know their rows are new (typically in
//! [`Phase::Rebuild`](crate::projector::Phase::Rebuild), when a replay
//! starts the version's tables empty). Runs in the caller's transaction.

use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::names::quote_ident;
use crate::projector::HandlerError;

/// Appends `rows` to `table` (a table of the version, named unqualified:
/// `search_path` is the version's schema) through binary `COPY`; each row
/// gives one value per entry of `columns`, of the matching type of `types`.
/// Returns the rows written. Rows that break a constraint make the whole
/// `COPY` fail, as an `INSERT` would.
///
/// # Errors
/// Database errors (a missing table, a type mismatch, a constraint).
pub async fn copy_rows<'a, I>(
    tx: &Transaction<'_>,
    table: &str,
    columns: &[(&str, Type)],
    rows: I,
) -> Result<u64, HandlerError>
where
    I: IntoIterator<Item = Vec<&'a (dyn ToSql + Sync)>>,
{
    let names: Vec<String> = columns.iter().map(|(c, _)| quote_ident(c)).collect();
    let types: Vec<Type> = columns.iter().map(|(_, t)| t.clone()).collect();
    let sql = format!(
        "COPY {} ({}) FROM STDIN (FORMAT binary)",
        quote_ident(table),
        names.join(", ")
    );
    let sink = tx.copy_in(&sql).await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for row in rows {
        writer.as_mut().write(&row).await?;
    }
    Ok(writer.finish().await?)
}
