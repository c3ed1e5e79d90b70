//! Applying one batch of events inside a transaction the caller owns, with
//! the projector's `on_error` policy (docs/decisions/0016-parking-without-a-slow-path.md):
//! the whole batch first (one call, so a projector can fold it); when that
//! fails, the failing events are found without going event by event: an
//! [`EventError`] names one directly (an [`EventErrors`] several, decision
//! 0070), otherwise the failing range is bisected. Successful ranges are applied as wholes, each inside a
//! savepoint. Never commits.

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
/// schema) following the projector's `on_error` policy. Under `park`, the
/// events parked because an error named them are taken out of `events`
/// (the rest keep their order), so the rest of the batch is applied again
/// without a copy of it (decision 0080).
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    ctx: &ApplyContext,
    events: &mut Vec<Event>,
) -> Result<BatchOutcome> {
    if events.is_empty() {
        return Ok(BatchOutcome::default());
    }
    let mut settle = Settle {
        tx,
        projector,
        ctx: ctx.clone(),
        outcome: BatchOutcome::default(),
        open: None,
    };
    let error = match settle.attempt(events).await? {
        Ok(()) => {
            settle.close().await?;
            return Ok(BatchOutcome {
                applied: events.len(),
                handled: events.len(),
                ..BatchOutcome::default()
            });
        }
        Err(e) => e,
    };
    // The first call is not a retry.
    settle.outcome.retries = 0;
    debug!(
        batch_len = events.len(),
        error = %handler_message(&*error),
        "batch failed; looking for the failing events"
    );
    match projector.on_error() {
        OnError::Park => settle.park_named(events, error).await?,
        OnError::Fail => settle.bisect(events, error).await?,
    }
    settle.close().await?;
    Ok(settle.outcome)
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

/// The savepoint of the last call of [`Settle::attempt`], left open so that
/// the statement that ends it travels with the next call's first statement
/// (docs/decisions/0076-bisection-in-one-round-trip-per-call.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    /// The call applied: its savepoint is released.
    Applied,
    /// The call failed: its writes are rolled back.
    Failed,
}

impl Open {
    fn sql(self) -> &'static str {
        match self {
            Open::Applied => "RELEASE SAVEPOINT coord_batch",
            Open::Failed => "ROLLBACK TO SAVEPOINT coord_batch; RELEASE SAVEPOINT coord_batch",
        }
    }
}

/// What [`Settle::bisect`] knows of a range still to do.
enum Known {
    /// Nothing: it is applied as a whole first.
    Unknown,
    /// It failed as a whole with this error.
    Failed(HandlerError),
    /// It fails as a whole if the range just before it, which starts at
    /// this index, applies: the two are the halves of a range that failed.
    /// It is then split without being tried as a whole.
    FailsAfter(usize),
    /// It is split without being tried as a whole (a single event is still
    /// tried: only a real error parks it).
    Failing,
}

/// Finding and handling the failing events of a batch that failed as a whole.
struct Settle<'a, 't> {
    tx: &'a Transaction<'t>,
    projector: &'a dyn Projector,
    ctx: ApplyContext,
    outcome: BatchOutcome,
    /// The savepoint of the last call, still to be ended.
    open: Option<Open>,
}

impl Settle<'_, '_> {
    /// One call of the projector inside a savepoint, sent with the
    /// statements that end the previous call's savepoint and open this
    /// one: no round trip besides the projector's own. `Ok(Err(_))` when
    /// the projector failed; its writes are rolled back with the next
    /// statement sent ([`Settle::close`] at the latest).
    async fn attempt(&mut self, events: &[Event]) -> Result<Result<(), HandlerError>> {
        self.outcome.retries += 1;
        let sql = match self.open.take() {
            Some(open) => format!("{}; SAVEPOINT coord_batch", open.sql()),
            None => "SAVEPOINT coord_batch".to_owned(),
        };
        // Pipelined: the server runs the savepoint statements first.
        let (opened, applied) = futures_util::future::join(
            self.tx.batch_execute(&sql),
            self.projector.apply(self.tx, events, &self.ctx),
        )
        .await;
        opened?;
        self.open = Some(if applied.is_ok() {
            Open::Applied
        } else {
            Open::Failed
        });
        Ok(applied)
    }

    /// Ends the savepoint of the last call, if any.
    async fn close(&mut self) -> Result<()> {
        Ok(end_savepoint(self.tx, self.open.take()).await?)
    }

    /// Under `park`, while the error names events: park them, take them out
    /// of `rest` and apply the rest again as one call, so a fold writes
    /// once however many events fail (and, when its error names every
    /// failing event, is called only once more). An error that names none
    /// falls back to [`Settle::bisect`].
    async fn park_named(&mut self, rest: &mut Vec<Event>, mut error: HandlerError) -> Result<()> {
        loop {
            let named = named_indices(&error, rest);
            if named.is_empty() {
                break;
            }
            // Pipelined after the failed call's rollback and with one
            // another, not with the next attempt: the parked rows must be
            // written before its savepoint opens, or a failing attempt
            // would roll them back.
            let (tx, projector) = (self.tx, self.projector);
            let closing = end_savepoint(tx, self.open.take());
            let parks = named.iter().map(|&i| {
                let event = &rest[i];
                let message = message_for(&error, event.position);
                async move { record_parked(tx, projector, event, &message).await }
            });
            let (closed, parked) =
                futures_util::future::join(closing, futures_util::future::try_join_all(parks))
                    .await;
            closed?;
            parked?;
            self.outcome.parked += named.len();
            self.outcome.handled += named.len();
            // The rest in one pass over the batch, in place: the events
            // move, none is copied (a copy of the batch cost about as much
            // as decoding it, decision 0080).
            let mut failing = named.iter().copied().peekable();
            let mut index = 0;
            rest.retain(|_| {
                let kept = failing.next_if_eq(&index).is_none();
                index += 1;
                kept
            });
            if rest.is_empty() {
                return Ok(());
            }
            // From here on (bisection included) every call has a part of
            // what the first call judged, less what it named.
            self.ctx.named_failures_removed = true;
            match self.attempt(rest).await? {
                Ok(()) => {
                    self.outcome.applied += rest.len();
                    self.outcome.handled += rest.len();
                    return Ok(());
                }
                Err(e) => error = e,
            }
        }
        self.bisect(rest, error).await
    }

    /// Applies `events`, which failed as a whole with `error`, range by range
    /// in order: a range that applies is kept whole; a failing one is split
    /// around the event its error names, or in halves; a failing single
    /// event is parked, or under `fail` ends the batch just before it.
    ///
    /// Halves are not tried when that is known: when the first half of a
    /// failing range applies, the second is split at once; after a parked
    /// event, the untried ranges that follow it are tried as one again, up
    /// to the size of a slice (decision 0076).
    async fn bisect(&mut self, events: &[Event], error: HandlerError) -> Result<()> {
        // Ranges still to do, last to do first.
        let mut stack: Vec<(usize, usize, Known)> = Vec::new();
        let slices = (events.len() / MIN_SLICE_EVENTS).min(MAX_SLICES);
        let merge_cap = if slices >= 4 && named_index(&error, events).is_none() {
            // Failures spread over a large batch would make every range of
            // the first few halvings fail and be applied again: narrow at
            // once to slices, then halve only the failing ones.
            let bounds: Vec<usize> = (0..=slices).map(|k| k * events.len() / slices).collect();
            stack.extend(
                bounds
                    .windows(2)
                    .rev()
                    .map(|w| (w[0], w[1], Known::Unknown)),
            );
            events.len().div_ceil(slices)
        } else {
            stack.push((0, events.len(), Known::Failed(error)));
            MIN_SLICE_EVENTS
        };
        while let Some((start, end, known)) = stack.pop() {
            let range = &events[start..end];
            let error = match known {
                Known::Failed(e) => Some(e),
                Known::Failing if range.len() > 1 => None,
                Known::Unknown | Known::Failing | Known::FailsAfter(_) => {
                    match self.attempt(range).await? {
                        Ok(()) => {
                            self.outcome.applied += range.len();
                            self.outcome.handled += range.len();
                            // The second half of a failing range whose first
                            // half applied fails.
                            if let Some(next) = stack.last_mut() {
                                if matches!(next.2, Known::FailsAfter(s) if s == start) {
                                    next.2 = Known::Failing;
                                }
                            }
                            continue;
                        }
                        Err(e) => Some(e),
                    }
                }
            };
            if range.len() == 1 {
                let error = error.expect("a single event is tried before it is parked");
                match self.projector.on_error() {
                    OnError::Park => self.park(&range[0], &error).await?,
                    OnError::Fail => {
                        self.outcome.failure = Some(self.failure(&range[0], &error));
                        return Ok(());
                    }
                }
                merge_untried(&mut stack, merge_cap);
                continue;
            }
            match error.as_ref().and_then(|e| named_index(e, range)) {
                Some(i) => {
                    let failing = start + i;
                    if failing + 1 < end {
                        stack.push((failing + 1, end, Known::Unknown));
                    }
                    let error = error.expect("a named event comes from an error");
                    stack.push((failing, failing + 1, Known::Failed(error)));
                    if i > 0 {
                        stack.push((start, failing, Known::Unknown));
                    }
                }
                None => {
                    let middle = start + range.len() / 2;
                    stack.push((middle, end, Known::FailsAfter(start)));
                    stack.push((start, middle, Known::Unknown));
                }
            }
        }
        Ok(())
    }

    async fn park(&mut self, event: &Event, error: &HandlerError) -> Result<()> {
        let message = message_for(error, event.position);
        // Pipelined: the failed call's savepoint is rolled back first.
        let (closed, recorded) = futures_util::future::join(
            end_savepoint(self.tx, self.open.take()),
            record_parked(self.tx, self.projector, event, &message),
        )
        .await;
        closed?;
        recorded?;
        self.outcome.parked += 1;
        self.outcome.handled += 1;
        Ok(())
    }

    fn failure(&self, event: &Event, error: &HandlerError) -> Error {
        handler_failure(self.projector, event, error)
    }
}

/// Ends the savepoint `open` of a call, if any.
async fn end_savepoint(
    tx: &Transaction<'_>,
    open: Option<Open>,
) -> Result<(), tokio_postgres::Error> {
    match open {
        Some(open) => tx.batch_execute(open.sql()).await,
        None => Ok(()),
    }
}

/// After a parked event: the untried ranges on top of `stack` that follow
/// one another become one, up to `cap` events, so the rest of a failing
/// slice is tried as a whole again instead of piece by piece.
fn merge_untried(stack: &mut Vec<(usize, usize, Known)>, cap: usize) {
    let untried = |k: &Known| matches!(k, Known::Unknown | Known::FailsAfter(_));
    while stack.len() >= 2 {
        let (top, below) = (&stack[stack.len() - 1], &stack[stack.len() - 2]);
        if !(untried(&top.2) && untried(&below.2) && top.1 == below.0 && below.1 - top.0 <= cap) {
            break;
        }
        let (start, end) = (top.0, below.1);
        stack.truncate(stack.len() - 2);
        stack.push((start, end, Known::Unknown));
    }
    if let Some(top) = stack.last_mut() {
        if matches!(top.2, Known::FailsAfter(_)) {
            top.2 = Known::Unknown;
        }
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
