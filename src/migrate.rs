//! The `coord` schema's migrations (refinery, files in `migrations/`), run as
//! library API. Concurrent runs are serialised by an advisory lock.

use tokio_postgres::Client;

use crate::Result;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Refinery's history table; kept in the `coord` schema so that migrating
/// leaves nothing outside it.
const HISTORY_TABLE: &str = "coord.schema_history";
/// Session advisory lock held while migrating.
const MIGRATE_LOCK: &str = "SELECT pg_advisory_lock(1668247412, 0)";
const MIGRATE_UNLOCK: &str = "SELECT pg_advisory_unlock(1668247412, 0)";

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
/// [`crate::Error::Migration`] or [`crate::Error::Db`] when a migration fails;
/// refinery's checksums refuse an edited, already applied migration.
#[tracing::instrument(skip_all, err(level = "debug"))]
pub async fn migrate(client: &mut Client) -> Result<MigrationReport> {
    client.batch_execute(MIGRATE_LOCK).await?;
    let outcome = run(client).await;
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
