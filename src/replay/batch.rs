//! Applying one batch of events inside a transaction the caller owns, with
//! the projector's `on_error` policy (docs/decisions/0016-parking-without-a-slow-path.md):
//! the whole batch first (one call, so a projector can fold it); when that
//! fails, the failing events are found without going event by event: an
//! [`EventError`] names one directly (an [`EventErrors`] several, decision
//! 0070), otherwise the failing range is bisected. Successful ranges are applied as wholes, each inside a
//! savepoint. Never commits.

use std::borrow::Cow;

use tokio_postgres::Transaction;
use tracing::{debug, warn};

use crate::config::OnError;
use crate::projector::{
    handler_failure, message_for, named_positions, ApplyContext, Event, HandlerError, Projector,
    ProjectorExt,
};
#[cfg(doc)]
use crate::projector::{EventError, EventErrors};
use crate::store::parked;
use crate::{Error, Result};

// The helpers every caller uses, at the paths they have always had.
pub(crate) use crate::projector::{handler_message, set_search_path};

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
    /// Calls of the projector after the first failed one (0 for a clean batch).
    pub retries: usize,
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
    let error = match attempt(tx, projector, ctx, events).await? {
        Ok(()) => {
            return Ok(BatchOutcome {
                applied: events.len(),
                handled: events.len(),
                ..BatchOutcome::default()
            })
        }
        Err(e) => e,
    };
    debug!(
        batch_len = events.len(),
        error = %handler_message(&*error),
        "batch failed; looking for the failing events"
    );
    let mut settle = Settle {
        tx,
        projector,
        ctx,
        outcome: BatchOutcome::default(),
    };
    match projector.on_error() {
        OnError::Park => settle.park_named(events, error).await?,
        OnError::Fail => settle.bisect(events, error).await?,
    }
    Ok(settle.outcome)
}

/// One call of the projector inside a savepoint; `Ok(Err(_))` when the
/// projector failed (its writes are rolled back).
async fn attempt(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    ctx: &ApplyContext,
    events: &[Event],
) -> Result<Result<(), HandlerError>> {
    // Pipelined: the savepoint is sent before the projector's first
    // statement, which the server runs after it.
    let (savepoint, applied) = futures_util::future::join(
        tx.batch_execute("SAVEPOINT coord_batch"),
        projector.apply(tx, events, ctx),
    )
    .await;
    savepoint?;
    match applied {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT coord_batch").await?;
            Ok(Ok(()))
        }
        Err(e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT coord_batch; RELEASE SAVEPOINT coord_batch")
                .await?;
            Ok(Err(e))
        }
    }
}

/// The indices in `events` (in order) of the events `error` names, if it
/// is an [`EventError`] or [`EventErrors`] naming some of them.
fn named_indices(error: &HandlerError, events: &[Event]) -> Vec<usize> {
    let mut found: Vec<usize> = named_positions(error)
        .into_iter()
        .filter_map(|p| events.binary_search_by_key(&p, |e| e.position).ok())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// The first of [`named_indices`].
fn named_index(error: &HandlerError, events: &[Event]) -> Option<usize> {
    named_indices(error, events).first().copied()
}

/// A failing batch whose error names no event is first split into slices of
/// at least this many events (at most [`MAX_SLICES`], at least 4 or none),
/// applied in order; only failing slices are bisected
/// (docs/decisions/0042-narrowing-failing-batches-by-slices.md).
const MIN_SLICE_EVENTS: usize = 512;
/// See [`MIN_SLICE_EVENTS`].
const MAX_SLICES: usize = 64;

/// Finding and handling the failing events of a batch that failed as a whole.
struct Settle<'a, 't> {
    tx: &'a Transaction<'t>,
    projector: &'a dyn Projector,
    ctx: &'a ApplyContext,
    outcome: BatchOutcome,
}

impl Settle<'_, '_> {
    async fn attempt(&mut self, events: &[Event]) -> Result<Result<(), HandlerError>> {
        self.outcome.retries += 1;
        attempt(self.tx, self.projector, self.ctx, events).await
    }

    /// Under `park`, while the error names events: park them and apply the
    /// rest again as one call, so a fold writes once however many events
    /// fail (and, when its error names every failing event, is called only
    /// once more). An error that names none falls back to [`Settle::bisect`].
    async fn park_named(&mut self, events: &[Event], mut error: HandlerError) -> Result<()> {
        let mut rest = Cow::Borrowed(events);
        loop {
            let named = named_indices(&error, &rest);
            if named.is_empty() {
                break;
            }
            let failing: Vec<Event> = named
                .iter()
                .rev()
                .map(|&i| rest.to_mut().remove(i))
                .collect();
            // Pipelined with one another, not with the attempt: the parked
            // rows must be written before its savepoint opens, or a failing
            // attempt would roll them back.
            let (tx, projector) = (self.tx, self.projector);
            let parks = failing.iter().rev().map(|event| {
                let message = message_for(&error, event.position);
                async move { record_parked(tx, projector, event, &message).await }
            });
            futures_util::future::try_join_all(parks).await?;
            self.outcome.parked += failing.len();
            self.outcome.handled += failing.len();
            if rest.is_empty() {
                return Ok(());
            }
            self.outcome.retries += 1;
            let attempted = attempt(self.tx, self.projector, self.ctx, &rest).await;
            match attempted? {
                Ok(()) => {
                    self.outcome.applied += rest.len();
                    self.outcome.handled += rest.len();
                    return Ok(());
                }
                Err(e) => error = e,
            }
        }
        self.bisect(&rest, error).await
    }

    /// Applies `events`, which failed as a whole with `error`, range by range
    /// in order: a range that applies is kept whole; a failing one is split
    /// around the event its error names, or in halves; a failing single
    /// event is parked, or under `fail` ends the batch just before it.
    async fn bisect(&mut self, events: &[Event], error: HandlerError) -> Result<()> {
        // Ranges still to do, last to do first; each with its error when it
        // is known to fail as a whole.
        let mut stack = Vec::new();
        let slices = (events.len() / MIN_SLICE_EVENTS).min(MAX_SLICES);
        if slices >= 4 && named_index(&error, events).is_none() {
            // Failures spread over a large batch would make every range of
            // the first few halvings fail and be applied again: narrow at
            // once to slices, then halve only the failing ones.
            let bounds: Vec<usize> = (0..=slices).map(|k| k * events.len() / slices).collect();
            stack.extend(bounds.windows(2).rev().map(|w| (w[0], w[1], None)));
        } else {
            stack.push((0, events.len(), Some(error)));
        }
        while let Some((start, end, known)) = stack.pop() {
            let range = &events[start..end];
            let error = match known {
                Some(e) => e,
                None => match self.attempt(range).await? {
                    Ok(()) => {
                        self.outcome.applied += range.len();
                        self.outcome.handled += range.len();
                        continue;
                    }
                    Err(e) => e,
                },
            };
            if range.len() == 1 {
                match self.projector.on_error() {
                    OnError::Park => self.park(&range[0], &error).await?,
                    OnError::Fail => {
                        self.outcome.failure = Some(self.failure(&range[0], &error));
                        return Ok(());
                    }
                }
                continue;
            }
            match named_index(&error, range) {
                Some(i) => {
                    let failing = start + i;
                    if failing + 1 < end {
                        stack.push((failing + 1, end, None));
                    }
                    stack.push((failing, failing + 1, Some(error)));
                    if i > 0 {
                        stack.push((start, failing, None));
                    }
                }
                None => {
                    let middle = start + range.len() / 2;
                    stack.push((middle, end, None));
                    stack.push((start, middle, None));
                }
            }
        }
        Ok(())
    }

    async fn park(&mut self, event: &Event, error: &HandlerError) -> Result<()> {
        let message = message_for(error, event.position);
        record_parked(self.tx, self.projector, event, &message).await?;
        self.outcome.parked += 1;
        self.outcome.handled += 1;
        Ok(())
    }

    fn failure(&self, event: &Event, error: &HandlerError) -> Error {
        handler_failure(self.projector, event, error)
    }
}

/// Records `event` in `coord.parked_events` with `message`.
async fn record_parked(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    event: &Event,
    message: &str,
) -> Result<()> {
    warn!(
        projector = %projector.label(),
        position = event.position,
        event_type = %event.event_type,
        error = %message,
        "parked an event whose handler failed"
    );
    let version = projector.version().to_string();
    parked::insert(tx, projector.name().as_str(), &version, event, message).await
}
