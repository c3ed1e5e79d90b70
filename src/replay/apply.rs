//! One batch of a pass: [`apply_batch`] applies it (`replay::batch`, with
//! the projector's `on_error` policy) and records it in the checkpoint in
//! the same transaction. Shared by [`crate::replay::run_pass`] and the
//! passes inside a caller's transaction; never commits.

use tokio_postgres::Transaction;

use crate::event_store::{EventBatch, PassQuery};
use crate::names::RelationName;
use crate::projector::{ApplyContext, Event, Phase, Projector};
use crate::replay::batch::{self, BatchOutcome};
use crate::store::checkpoint::{self, BatchProgress};
use crate::Result;

/// Where a batch leaves the pass: the new cursor, the last position handled
/// and the `applied_ahead` rows it adds.
struct BatchEnd {
    cursor: i64,
    last_position: Option<i64>,
    ahead_positions: Vec<i64>,
    ahead_xacts: Vec<String>,
}

fn batch_end(
    positions: &[i64],
    xacts: &[Option<String>],
    outcome: &BatchOutcome,
    cursor: i64,
) -> BatchEnd {
    let handled = outcome.handled;
    let new_cursor = if outcome.failure.is_some() {
        // Just before the failing event: it is read again next time.
        positions[handled] - 1
    } else {
        positions.last().copied().unwrap_or(cursor)
    };
    let mut ahead_positions = Vec::new();
    let mut ahead_xacts = Vec::new();
    for (&position, xact) in positions[..handled].iter().zip(xacts) {
        if let Some(xact) = xact {
            ahead_positions.push(position);
            ahead_xacts.push(xact.clone());
        }
    }
    BatchEnd {
        cursor: new_cursor,
        last_position: handled.checked_sub(1).map(|i| positions[i]),
        ahead_positions,
        ahead_xacts,
    }
}

pub(super) fn context(schema: &str, phase: Phase) -> ApplyContext {
    ApplyContext {
        schema: schema.to_owned(),
        phase,
        named_failures_removed: false,
    }
}

pub(super) fn query(
    projector: &dyn Projector,
    event_store: &RelationName,
    horizon: &str,
    snapshot: &str,
    exclude_ahead: bool,
    max_bytes: i64,
) -> PassQuery {
    PassQuery {
        name: projector.name().to_string(),
        version: projector.version().to_string(),
        event_store: event_store.clone(),
        event_types: projector.event_types(),
        horizon: horizon.to_owned(),
        snapshot: snapshot.to_owned(),
        exclude_ahead,
        max_bytes,
        payload: true,
        metadata: true,
    }
}

/// The progress figures recorded with a batch (none inside a caller's
/// transaction).
#[derive(Default)]
pub(super) struct Estimate {
    pub events_total: Option<i64>,
    pub rate_per_s: Option<f64>,
    pub eta_s: Option<f64>,
}

/// Applies `batch`, read after `cursor`, in `tx` (whose `search_path` is
/// the version's schema) and records it in the checkpoint with the figures
/// `estimate` gives for its outcome: the new cursor, the counters, the
/// `applied_ahead` rows and, when a handler failed under `fail`, its error
/// as `last_error`. Returns the outcome, failure included (the caller
/// decides whether the batch commits), and the new cursor.
///
/// The batch is the caller's to give, not to keep: the events parked under
/// `park` are taken out of `batch.events` (decision 0080), and once the
/// projector is done with them the events go to `applied` (to be freed
/// while the checkpoint is written, decision 0079), leaving the batch empty.
///
/// # Errors
/// Database errors.
pub(super) async fn apply_batch(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    ctx: &ApplyContext,
    batch: &mut EventBatch,
    cursor: i64,
    estimate: impl FnOnce(&BatchOutcome) -> Estimate,
    applied: impl FnOnce(Vec<Event>),
) -> Result<(BatchOutcome, i64)> {
    // Before applying: parking takes events out of the batch.
    let positions: Vec<i64> = batch.events.iter().map(|e| e.position).collect();
    let outcome = batch::apply(tx, projector, ctx, &mut batch.events).await?;
    let end = batch_end(&positions, &batch.xacts, &outcome, cursor);
    applied(std::mem::take(&mut batch.events));
    let estimate = estimate(&outcome);
    let message = outcome.failure.as_ref().map(ToString::to_string);
    checkpoint::record_batch(
        tx,
        projector.name().as_str(),
        &projector.version().to_string(),
        &BatchProgress {
            cursor: end.cursor,
            last_position: end.last_position,
            applied: outcome.applied as i64,
            parked: outcome.parked as i64,
            events_total: estimate.events_total,
            rate_per_s: estimate.rate_per_s,
            eta_s: estimate.eta_s,
            last_error: message.as_deref(),
            ahead_positions: &end.ahead_positions,
            ahead_xacts: &end.ahead_xacts,
        },
    )
    .await?;
    Ok((outcome, end.cursor))
}
