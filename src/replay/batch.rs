//! Applying one batch of events inside a transaction the caller owns, with
//! the projector's `on_error` policy: the whole batch first (one call, so a
//! projector can fold it), and when that fails, event by event inside
//! savepoints, parking or stopping at the failing event. Never commits.

use tokio_postgres::Transaction;
use tracing::{debug, warn};

use crate::config::OnError;
use crate::names::quote_ident;
use crate::projector::{ApplyContext, Event, HandlerError, Projector, ProjectorExt};
use crate::store::parked;
use crate::{Error, Result};

const SET_SEARCH_PATH: &str = "SELECT set_config('search_path', $1, true)";

/// Sets `search_path` to `schema` for the rest of the transaction.
pub(crate) async fn set_search_path(tx: &Transaction<'_>, schema: &str) -> Result<()> {
    tx.execute(SET_SEARCH_PATH, &[&quote_ident(schema)]).await?;
    Ok(())
}

/// What became of a batch.
#[derive(Debug, Default)]
pub(crate) struct BatchOutcome {
    /// Events applied.
    pub applied: usize,
    /// Events parked.
    pub parked: usize,
    /// How many events of the batch were handled (applied or parked) before
    /// a failure stopped it; the batch length when none did.
    pub handled: usize,
    /// The failure (`on_error = "fail"`), already as [`Error::Handler`].
    pub failure: Option<Error>,
}

/// The text of a handler error, with the database's message and detail
/// when it is one (tokio-postgres's own `Display` says only "db error").
pub(crate) fn handler_message(e: &HandlerError) -> String {
    if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
        if let Some(db) = pg.as_db_error() {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            return text;
        }
    }
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Applies `events` in `tx` (whose `search_path` is already the version's
/// schema) following the projector's `on_error` policy.
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    ctx: &ApplyContext,
    events: &[Event],
) -> Result<BatchOutcome> {
    if events.is_empty() {
        return Ok(BatchOutcome::default());
    }
    tx.batch_execute("SAVEPOINT coord_batch").await?;
    match projector.apply(tx, events, ctx).await {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT coord_batch").await?;
            Ok(BatchOutcome {
                applied: events.len(),
                parked: 0,
                handled: events.len(),
                failure: None,
            })
        }
        Err(e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT coord_batch; RELEASE SAVEPOINT coord_batch")
                .await?;
            debug!(
                batch_len = events.len(),
                error = %handler_message(&e),
                "batch failed; applying it event by event"
            );
            one_by_one(tx, projector, ctx, events).await
        }
    }
}

async fn one_by_one(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    ctx: &ApplyContext,
    events: &[Event],
) -> Result<BatchOutcome> {
    let mut outcome = BatchOutcome::default();
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    for event in events {
        tx.batch_execute("SAVEPOINT coord_event").await?;
        match projector.apply(tx, std::slice::from_ref(event), ctx).await {
            Ok(()) => {
                tx.batch_execute("RELEASE SAVEPOINT coord_event").await?;
                outcome.applied += 1;
            }
            Err(e) => {
                tx.batch_execute(
                    "ROLLBACK TO SAVEPOINT coord_event; RELEASE SAVEPOINT coord_event",
                )
                .await?;
                let message = handler_message(&e);
                match projector.on_error() {
                    OnError::Park => {
                        warn!(
                            projector = %projector.label(),
                            position = event.position,
                            event_type = %event.event_type,
                            error = %message,
                            "parked an event whose handler failed"
                        );
                        parked::insert(tx, name, &version, event, &message).await?;
                        outcome.parked += 1;
                    }
                    OnError::Fail => {
                        outcome.failure = Some(Error::Handler {
                            projector: name.to_owned(),
                            version,
                            position: event.position,
                            event_type: event.event_type.clone(),
                            message,
                        });
                        return Ok(outcome);
                    }
                }
            }
        }
        outcome.handled += 1;
    }
    Ok(outcome)
}
