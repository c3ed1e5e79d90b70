//! The `coord` schema's migrations (refinery, files in `migrations/`), run as
//! library API. Concurrent runs are serialised by an advisory lock.

use tokio_postgres::{Client, GenericClient};

use crate::locks::key;
use crate::{Error, Result};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Refinery's history table; kept in the `coord` schema so that migrating
/// leaves nothing outside it.
const HISTORY_TABLE: &str = "coord.schema_history";
/// Session advisory lock held while migrating.
const MIGRATE_LOCK: &str = concat!("SELECT pg_advisory_lock(", key!(migrate), ", 0)");
const MIGRATE_UNLOCK: &str = concat!("SELECT pg_advisory_unlock(", key!(migrate), ", 0)");

/// What [`migrate`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MigrationReport {
    /// Migrations applied by this call, as `V{n}__{name}`.
    pub applied: Vec<String>,
}

/// Creates or upgrades the `coord` schema. Idempotent; safe to run from
/// several processes at once.
///
/// # Errors
/// [`crate::Error::Refused`] (exit code 2) when the schema was migrated by a
/// newer coord (a migration this binary does not know was applied);
/// [`crate::Error::Migration`] or [`crate::Error::Db`] when a migration fails;
/// refinery's checksums refuse an edited, already applied migration.
#[tracing::instrument(skip_all, err(level = "debug"))]
pub async fn migrate(client: &mut Client) -> Result<MigrationReport> {
    client.batch_execute(MIGRATE_LOCK).await?;
    let outcome = match refuse_if_newer(&*client).await {
        Ok(()) => run(client).await,
        Err(e) => Err(e),
    };
    let unlocked = client.batch_execute(MIGRATE_UNLOCK).await;
    let report = outcome?;
    unlocked?;
    for name in &report.applied {
        tracing::info!(migration = %name, "applied migration");
    }
    Ok(report)
}

async fn run(client: &mut Client) -> Result<MigrationReport> {
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS coord")
        .await?;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    let report = runner.run_async(client).await?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    Ok(MigrationReport { applied })
}

/// The newest migration this binary knows (`V{n}`).
pub fn known_schema_version() -> i32 {
    known_versions().into_iter().max().unwrap_or(0)
}

/// The versions of the migrations embedded in this binary.
fn known_versions() -> Vec<i32> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i32::try_from(m.version()).unwrap_or(i32::MAX))
        .collect()
}

const HISTORY_EXISTS: &str = "SELECT to_regclass('coord.schema_history') IS NOT NULL";
/// The newest applied migration this binary does not know, if any.
const UNKNOWN_APPLIED: &str = "SELECT max(version) FROM coord.schema_history \
    WHERE version <> ALL($1::int4[])";

/// A `coord` schema migrated by a newer coord than this binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NewerSchema {
    database: i32,
    binary: i32,
}

async fn newer_schema(client: &impl GenericClient) -> Result<Option<NewerSchema>> {
    if !client.query_one(HISTORY_EXISTS, &[]).await?.try_get(0)? {
        return Ok(None);
    }
    let known = known_versions();
    let unknown: Option<i32> = client
        .query_one(UNKNOWN_APPLIED, &[&known])
        .await?
        .try_get(0)?;
    Ok(unknown.map(|database| NewerSchema {
        database,
        binary: known_schema_version(),
    }))
}

/// For commands that only read: logs a warning when the `coord` schema was
/// migrated by a newer coord than this binary (reading still works).
///
/// # Errors
/// Database errors.
pub(crate) async fn warn_if_newer(client: &impl GenericClient) -> Result<()> {
    if let Some(newer) = newer_schema(client).await? {
        tracing::warn!(
            database = newer.database,
            binary = newer.binary,
            "the coord schema in this database (V{}) is newer than this coord {} (knows up to V{}): \
             reading only; upgrade coord before running commands that write",
            newer.database,
            env!("CARGO_PKG_VERSION"),
            newer.binary
        );
    }
    Ok(())
}

/// For every command that writes: fails when the `coord` schema is missing
/// or was migrated by a newer coord than this binary (a migration this
/// binary does not know is in `coord.schema_history`), since this binary
/// could break invariants the newer schema relies on.
///
/// # Errors
/// [`Error::SchemaTooNew`] (exit code 2) naming both schema versions;
/// [`Error::NotMigrated`] when `coord migrate` has not run; database errors.
pub async fn ensure_writable(client: &impl GenericClient) -> Result<()> {
    refuse_if_newer(client).await?;
    crate::store::ensure_migrated(client).await
}

async fn refuse_if_newer(client: &impl GenericClient) -> Result<()> {
    match newer_schema(client).await? {
        None => Ok(()),
        Some(newer) => Err(Error::SchemaTooNew {
            database: newer.database,
            binary: newer.binary,
        }),
    }
}
