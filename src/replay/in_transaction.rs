//! Passes inside a caller's transaction, for activation:
//! [`pass_in_transaction`] applies the small final delta while publishers
//! are held back, with the same `apply_batch` as [`crate::replay::run_pass`];
//! [`checkpoint_through_current_snapshot`] marks a version as up to date
//! without applying anything. Nothing here commits.

use tokio_postgres::Transaction;
use tracing::debug;

use crate::names::RelationName;
use crate::projector::{ApplyContext, Phase, Projector, ProjectorExt};
use crate::replay::apply::{apply_batch, context, query, Estimate};
use crate::replay::batch;
use crate::store::checkpoint;
use crate::Result;

/// Batch size of passes run inside a caller's transaction.
const IN_TRANSACTION_BATCH: i64 = 20_000;

/// Byte budget of the batches of passes run inside a caller's transaction.
const IN_TRANSACTION_BYTES: i64 = crate::replay::options::DEFAULT_BATCH_BYTES as i64;

/// Runs a complete pass of `projector`'s registered version inside the
/// caller's transaction `tx`, with a snapshot taken in it, finishing first a
/// pass left in progress. Nothing is committed: the projection writes, the
/// checkpoint and the counters commit (or roll back) with `tx`. Meant for the
/// small final delta of an activation, while publishers are held back.
/// Returns the number of events applied.
///
/// # Errors
/// [`Error::Handler`](crate::Error::Handler) when a handler fails under the `fail` policy (roll
/// `tx` back); database errors.
pub async fn pass_in_transaction(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    event_store: &RelationName,
) -> Result<u64> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    // Round trips count here (publishers wait): the checkpoint's lock, the
    // snapshot, the version's `search_path` (its schema as registered is
    // the name's schema, checked below) and whether `applied_ahead` has rows
    // are pipelined, one round trip; the server still runs them in order, so
    // the snapshot is taken with the checkpoint locked.
    let schema = projector.schema();
    let (ck, snapshot, _, ahead_from_start) = futures_util::try_join!(
        checkpoint::lock(tx, name, &version),
        checkpoint::current_snapshot(tx),
        batch::set_search_path(tx, &schema),
        checkpoint::has_ahead_after(tx, name, &version, 0)
    )?;
    if ck.schema_name != schema {
        batch::set_search_path(tx, &ck.schema_name).await?;
    }
    let ctx = context(&ck.schema_name, Phase::Replay);
    let mut horizon = ck.horizon.clone();
    let mut applied = 0;
    // The final pass's snapshot, and whether `applied_ahead` has rows for it.
    let (snapshot, ahead) = match &ck.pass_snapshot {
        Some(pending) => {
            // Finish the pass in progress first, then take a new snapshot.
            let cursor = ck.pass_cursor.unwrap_or(0);
            let ahead = checkpoint::has_ahead_after(tx, name, &version, cursor).await?;
            applied += drain(
                tx,
                projector,
                &ctx,
                event_store,
                &horizon,
                pending,
                cursor,
                ahead,
            )
            .await?;
            horizon = checkpoint::finish_pass(tx, name, &version, pending).await?;
            futures_util::try_join!(
                checkpoint::current_snapshot(tx),
                checkpoint::has_ahead_after(tx, name, &version, 0)
            )?
        }
        None => (snapshot, ahead_from_start),
    };
    applied += drain(
        tx,
        projector,
        &ctx,
        event_store,
        &horizon,
        &snapshot,
        0,
        ahead,
    )
    .await?;
    checkpoint::finish_pass(tx, name, &version, &snapshot).await?;
    debug!(applied, "pass in transaction");
    Ok(applied)
}

/// Applies, in `tx`, every handled event visible in `snapshot` after
/// `cursor`, batch by batch, recording each batch in the checkpoint;
/// `exclude_ahead`: whether `coord.applied_ahead` has rows after `cursor`.
/// Returns the number of events applied.
#[allow(clippy::too_many_arguments)]
async fn drain(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    ctx: &ApplyContext,
    event_store: &RelationName,
    horizon: &str,
    snapshot: &str,
    mut cursor: i64,
    exclude_ahead: bool,
) -> Result<u64> {
    let q = query(
        projector,
        event_store,
        horizon,
        snapshot,
        exclude_ahead,
        IN_TRANSACTION_BYTES,
    );
    let mut applied = 0;
    loop {
        let mut batch = q.read(tx, cursor, IN_TRANSACTION_BATCH).await?;
        if batch.events.is_empty() {
            return Ok(applied);
        }
        let (outcome, end) = apply_batch(
            tx,
            projector,
            ctx,
            &mut batch,
            cursor,
            |_| Estimate::default(),
            drop,
        )
        .await?;
        if let Some(failure) = outcome.failure {
            return Err(failure);
        }
        applied += outcome.applied as u64;
        cursor = end;
    }
}

/// Marks `name@version` as having applied every handled event (of
/// `event_types`) visible in the caller's transaction `tx`: the horizon
/// becomes the xmin of its current snapshot, `coord.applied_ahead` lists the
/// visible handled events at or above it, and no pass is in progress. For a
/// version whose events were applied some other way, such as an inline
/// active version being retired (its publishers applied them). Events
/// committed after `tx`'s snapshot are left to a later pass, so call it while
/// publishers of these event types are held back.
///
/// # Errors
/// [`Error::Failed`](crate::Error::Failed) when the version is not registered; database errors.
pub async fn checkpoint_through_current_snapshot(
    tx: &Transaction<'_>,
    name: &str,
    version: &str,
    event_types: &[String],
    event_store: &RelationName,
) -> Result<()> {
    let snapshot = checkpoint::current_snapshot(tx).await?;
    checkpoint::mark_through_snapshot(tx, name, version, event_types, event_store, &snapshot).await
}
