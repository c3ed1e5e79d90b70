//! Passes (docs/decisions/0002-checkpoint-horizon.md): [`run_pass`] applies,
//! batch by batch, the handled events visible in one snapshot, each batch a
//! transaction with its checkpoint; [`catch_up`] runs passes until the lag is
//! small; [`pass_in_transaction`] and [`checkpoint_through_current_snapshot`]
//! work inside a caller's transaction for activation. SQL lives in
//! `store::checkpoint`; this module decides the order of things.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument};

use crate::names::RelationName;
use crate::projector::{ApplyContext, Phase, Projector, ProjectorExt};
use crate::replay::batch::{self, BatchOutcome};
use crate::replay::options::{CatchUpReport, PassReport, Progress, ReplayOptions};
use crate::store::checkpoint::{self, BatchProgress, PassQuery};
use crate::store::events::EventBatch;
use crate::store::versions::VersionStatus;
use crate::{Error, Result};

/// Batch size of passes run inside a caller's transaction.
const IN_TRANSACTION_BATCH: i64 = 20_000;

/// Byte budget of the batches of passes run inside a caller's transaction.
const IN_TRANSACTION_BYTES: i64 = crate::replay::options::DEFAULT_BATCH_BYTES as i64;

/// Where a batch leaves the pass: the new cursor, the last position handled
/// and the `applied_ahead` rows it adds.
struct BatchEnd {
    cursor: i64,
    last_position: Option<i64>,
    ahead_positions: Vec<i64>,
    ahead_xacts: Vec<String>,
}

fn batch_end(batch: &EventBatch, outcome: &BatchOutcome, cursor: i64) -> BatchEnd {
    let handled = outcome.handled;
    let new_cursor = if outcome.failure.is_some() {
        // Just before the failing event: it is read again next time.
        batch.events[handled].position - 1
    } else {
        batch.events.last().map_or(cursor, |e| e.position)
    };
    let mut ahead_positions = Vec::new();
    let mut ahead_xacts = Vec::new();
    for (event, xact) in batch.events[..handled].iter().zip(&batch.xacts) {
        if let Some(xact) = xact {
            ahead_positions.push(event.position);
            ahead_xacts.push(xact.clone());
        }
    }
    BatchEnd {
        cursor: new_cursor,
        last_position: handled.checked_sub(1).map(|i| batch.events[i].position),
        ahead_positions,
        ahead_xacts,
    }
}

fn context(schema: &str, phase: Phase) -> ApplyContext {
    ApplyContext {
        schema: schema.to_owned(),
        phase,
    }
}

fn query(
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
    }
}

/// Runs one pass of `projector`'s registered version (see
/// [`crate::replay::start_replay`]), resuming the pass in progress if there is
/// one: every handled event visible in the pass snapshot and not yet applied
/// is applied, in position order, in batches of `options.batch_size`. Each
/// batch is one transaction holding its projection writes, the checkpoint,
/// the counters and the progress fields. The next batch is read on a second
/// connection of `pool` while the current one is applied, so a pass uses two
/// connections.
///
/// Cancelling `cancel` stops the pass at a batch boundary with its
/// checkpoint saved; the report says `cancelled`.
///
/// # Errors
/// [`Error::Handler`] when a handler fails and the projector's policy is
/// `fail` (the events before it are committed, the checkpoint is just
/// before it, and `last_error` is set); [`Error::Refused`] when the version
/// was aborted; [`Error::Busy`] when another process took the pass over;
/// database and pool errors.
#[instrument(skip_all, fields(projector.name = %projector.name(), projector.version = %projector.version()), err(level = "debug"))]
pub async fn run_pass(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    options: &ReplayOptions,
    cancel: &CancellationToken,
) -> Result<PassReport> {
    let started = Instant::now();
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let label = projector.label();
    let mut writer = pool.get().await?;

    let (start, snapshot) = {
        let tx = writer.transaction().await?;
        let ck = checkpoint::lock(&*tx, name, &version).await?;
        if ck.status == VersionStatus::Aborted {
            return Err(Error::Refused(format!(
                "the replay of {label} was aborted: run `coord replay --projector {name}` to start it over"
            )));
        }
        if ck.status == VersionStatus::Pruned {
            return Err(Error::Refused(format!(
                "{label} was pruned: its schema is gone"
            )));
        }
        // An active inline version is followed too: its publishers record
        // what they apply in `applied_ahead`, which passes exclude
        // (docs/decisions/0009-inline-checkpoints.md).
        let snapshot = match &ck.pass_snapshot {
            Some(snapshot) => {
                info!(cursor = ck.pass_cursor, "resuming pass");
                snapshot.clone()
            }
            None => {
                let snapshot = checkpoint::current_snapshot(&*tx).await?;
                checkpoint::begin_pass(&*tx, name, &version, &snapshot).await?;
                info!(horizon = %ck.horizon, "starting pass");
                snapshot
            }
        };
        tx.commit().await?;
        (ck, snapshot)
    };
    let cursor0 = start.pass_cursor.unwrap_or(0);
    let exclude_ahead = checkpoint::has_ahead_after(&**writer, name, &version, cursor0).await?;
    let max_bytes = i64::try_from(options.batch_bytes.max(1)).unwrap_or(i64::MAX);
    let q = query(
        projector,
        event_store,
        &start.horizon,
        &snapshot,
        exclude_ahead,
        max_bytes,
    );

    // Three stages overlap: the reader fetches batch n+2 (server), a decoder
    // turns batch n+1 into events (client CPU, on its own thread), and
    // this task applies batch n (server).
    let reader = pool.get().await?;
    let (row_sender, mut row_receiver) = mpsc::channel::<Result<Vec<u8>>>(1);
    let (sender, mut receiver) = mpsc::channel::<Result<EventBatch>>(1);
    let max_limit = i64::try_from(options.batch_size.max(1)).unwrap_or(i64::MAX);
    let reader_query = q.clone();
    let reader_cancel = cancel.clone();
    tokio::spawn(async move {
        let mut cursor = cursor0;
        let mut limit = max_limit;
        while !reader_cancel.is_cancelled() {
            let read_started = Instant::now();
            let result = reader_query.read_copy(&reader, cursor, limit).await;
            // The pass ends with an empty read: a short batch may have been
            // cut by the byte budget.
            let (result, last) = match result {
                Ok((data, rows, last_position)) => {
                    debug!(
                        read_ms = read_started.elapsed().as_millis() as u64,
                        rows,
                        bytes = data.len(),
                        "read batch"
                    );
                    if let Some(position) = last_position {
                        cursor = position;
                    }
                    limit = next_limit(limit, rows as i64, max_limit);
                    (Ok(data), rows == 0)
                }
                Err(e) => (Err(e), true),
            };
            if row_sender.send(result).await.is_err() || last {
                break;
            }
        }
    });
    let payload = projector.replay_reads_payload();
    // One thread decodes every batch of the pass: with a blocking-pool
    // thread per batch, the allocator kept an arena per thread and memory
    // grew with the number of batches (decision 0017).
    std::thread::Builder::new()
        .name("coord-decode".into())
        .spawn(move || {
            while let Some(data) = row_receiver.blocking_recv() {
                let decoded = data.and_then(|data| EventBatch::decode_copy_with(&data, payload));
                if sender.blocking_send(decoded).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| Error::Failed(format!("cannot start the event decoder: {e}")))?;

    let total = if options.count_total {
        let count_started = Instant::now();
        let remaining = q.count(&**writer, cursor0).await?;
        debug!(
            count_ms = count_started.elapsed().as_millis() as u64,
            remaining, "counted"
        );
        Some(start.events_processed + remaining)
    } else {
        None
    };
    let pass_total = total.map(|t| u64::try_from(t - start.events_processed).unwrap_or(0));

    // From horizon 0 this is the version's first pass: its tables started
    // empty (a resumed first pass finds only its own earlier batches).
    let phase = if start.horizon == "0" {
        Phase::Rebuild
    } else {
        Phase::Replay
    };
    let ctx = context(&start.schema_name, phase);
    let mut report = PassReport {
        projector: name.to_owned(),
        version: version.clone(),
        applied: 0,
        parked: 0,
        batches: 0,
        cancelled: false,
        horizon: start.horizon.clone(),
        elapsed: Duration::ZERO,
    };
    let mut cursor = cursor0;
    let mut processed = start.events_processed;
    // Set once the empty read that ends the pass is in: only then may the
    // horizon move. The reader also stops when cancelled, so a closed
    // channel alone proves nothing.
    let mut complete = false;
    while let Some(batch) = receiver.recv().await {
        let batch = batch?;
        if batch.events.is_empty() {
            complete = true;
            break;
        }
        if cancel.is_cancelled() {
            report.cancelled = true;
            break;
        }
        let batch_started = Instant::now();
        let tx = writer.transaction().await?;
        let (ck, ()) = futures_util::future::try_join(
            checkpoint::lock(&*tx, name, &version),
            batch::set_search_path(&*tx, &start.schema_name),
        )
        .await?;
        ensure_owner(&ck, &snapshot, cursor, &label)?;
        let outcome = batch::apply(&tx, projector, &ctx, &batch.events).await?;
        let end = batch_end(&batch, &outcome, cursor);
        let done = report.applied + report.parked + outcome.handled as u64;
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        let rate = done as f64 / secs;
        processed += outcome.applied as i64;
        let eta = total.map(|t| ((t - processed).max(0) as f64) / rate.max(1e-6));
        let message = outcome.failure.as_ref().map(ToString::to_string);
        checkpoint::record_batch(
            &*tx,
            name,
            &version,
            &BatchProgress {
                cursor: end.cursor,
                last_position: end.last_position,
                applied: outcome.applied as i64,
                parked: outcome.parked as i64,
                events_total: total,
                rate_per_s: Some(rate),
                eta_s: eta,
                last_error: message.as_deref(),
                ahead_positions: &end.ahead_positions,
                ahead_xacts: &end.ahead_xacts,
            },
        )
        .await?;
        tx.commit().await?;
        report.applied += outcome.applied as u64;
        report.parked += outcome.parked as u64;
        report.batches += 1;
        cursor = end.cursor;
        debug!(
            position = cursor,
            batch_len = batch.events.len(),
            applied = outcome.applied,
            parked = outcome.parked,
            rate_per_s = rate,
            apply_ms = batch_started.elapsed().as_millis() as u64,
            "applied batch"
        );
        if let Some(progress) = &options.progress {
            progress(&Progress {
                projector: label.clone(),
                done,
                total: pass_total,
                rate_per_s: rate,
                position: cursor,
            });
        }
        if let Some(failure) = outcome.failure {
            return Err(failure);
        }
    }
    drop(receiver);
    if !complete && !report.cancelled {
        if cancel.is_cancelled() {
            report.cancelled = true;
        } else {
            return Err(Error::Failed(format!(
                "the event reader of {label} stopped before the end of its pass; run it again to resume"
            )));
        }
    }

    if !report.cancelled {
        let tx = writer.transaction().await?;
        let ck = checkpoint::lock(&*tx, name, &version).await?;
        ensure_owner(&ck, &snapshot, cursor, &label)?;
        report.horizon = checkpoint::finish_pass(&*tx, name, &version, &snapshot).await?;
        tx.commit().await?;
        info!(
            applied = report.applied,
            parked = report.parked,
            horizon = %report.horizon,
            "pass finished"
        );
    } else {
        info!(position = cursor, "pass cancelled; checkpoint saved");
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn ensure_owner(
    ck: &checkpoint::Checkpoint,
    snapshot: &str,
    cursor: i64,
    label: &str,
) -> Result<()> {
    if ck.pass_snapshot.as_deref() == Some(snapshot) && ck.pass_cursor == Some(cursor) {
        Ok(())
    } else if ck.status == VersionStatus::Aborted {
        Err(Error::Refused(format!("the replay of {label} was aborted")))
    } else {
        Err(Error::Busy(format!(
            "another process is replaying {label} (its checkpoint moved under this one); \
             let it finish or stop it, then retry"
        )))
    }
}

/// Runs passes of `projector`'s registered version until fewer than
/// `options.lag_threshold` committed handled events are left to apply (or
/// `options.max_passes` passes ran, or `cancel` fired).
///
/// # Errors
/// As [`run_pass`].
#[instrument(skip_all, fields(projector.name = %projector.name(), projector.version = %projector.version()), err(level = "debug"))]
pub async fn catch_up(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    options: &ReplayOptions,
    cancel: &CancellationToken,
) -> Result<CatchUpReport> {
    let started = Instant::now();
    let mut report = CatchUpReport {
        projector: projector.name().to_string(),
        version: projector.version().to_string(),
        passes: 0,
        applied: 0,
        parked: 0,
        remaining: 0,
        cancelled: false,
        elapsed: Duration::ZERO,
    };
    loop {
        let pass = run_pass(pool, projector, event_store, options, cancel).await?;
        report.passes += 1;
        report.applied += pass.applied;
        report.parked += pass.parked;
        report.cancelled = pass.cancelled;
        let client = pool.get().await?;
        report.remaining = checkpoint::pending(
            &**client,
            projector.name().as_str(),
            &report.version,
            &projector.event_types(),
            event_store,
        )
        .await?;
        if pass.cancelled
            || report.remaining < options.lag_threshold.max(1)
            || report.passes as usize >= options.max_passes.max(1)
        {
            break;
        }
    }
    report.elapsed = started.elapsed();
    info!(
        passes = report.passes,
        applied = report.applied,
        remaining = report.remaining,
        "caught up"
    );
    Ok(report)
}

/// Runs a complete pass of `projector`'s registered version inside the
/// caller's transaction `tx`, with a snapshot taken in it, finishing first a
/// pass left in progress. Nothing is committed: the projection writes, the
/// checkpoint and the counters commit (or roll back) with `tx`. Meant for the
/// small final delta of an activation, while publishers are held back.
/// Returns the number of events applied.
///
/// # Errors
/// [`Error::Handler`] when a handler fails under the `fail` policy (roll
/// `tx` back); database errors.
pub async fn pass_in_transaction(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    event_store: &RelationName,
) -> Result<u64> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let ck = checkpoint::lock(tx, name, &version).await?;
    batch::set_search_path(tx, &ck.schema_name).await?;
    let ctx = context(&ck.schema_name, Phase::Replay);
    let mut horizon = ck.horizon.clone();
    let mut applied = 0;
    if let Some(snapshot) = &ck.pass_snapshot {
        let cursor = ck.pass_cursor.unwrap_or(0);
        applied += drain(tx, projector, &ctx, event_store, &horizon, snapshot, cursor).await?;
        horizon = checkpoint::finish_pass(tx, name, &version, snapshot).await?;
    }
    let snapshot = checkpoint::current_snapshot(tx).await?;
    applied += drain(tx, projector, &ctx, event_store, &horizon, &snapshot, 0).await?;
    checkpoint::finish_pass(tx, name, &version, &snapshot).await?;
    debug!(applied, "pass in transaction");
    Ok(applied)
}

async fn drain(
    tx: &Transaction<'_>,
    projector: &dyn Projector,
    ctx: &ApplyContext,
    event_store: &RelationName,
    horizon: &str,
    snapshot: &str,
    mut cursor: i64,
) -> Result<u64> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let exclude_ahead = checkpoint::has_ahead_after(tx, name, &version, cursor).await?;
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
        let batch = q.read(tx, cursor, IN_TRANSACTION_BATCH).await?;
        if batch.events.is_empty() {
            return Ok(applied);
        }
        let outcome = batch::apply(tx, projector, ctx, &batch.events).await?;
        if let Some(failure) = outcome.failure {
            return Err(failure);
        }
        let end = batch_end(&batch, &outcome, cursor);
        checkpoint::record_batch(
            tx,
            name,
            &version,
            &BatchProgress {
                cursor: end.cursor,
                last_position: end.last_position,
                applied: outcome.applied as i64,
                parked: outcome.parked as i64,
                ahead_positions: &end.ahead_positions,
                ahead_xacts: &end.ahead_xacts,
                ..BatchProgress::default()
            },
        )
        .await?;
        applied += outcome.applied as u64;
        cursor = end.cursor;
    }
}

/// The event limit of the reader's next batch: after a batch the byte
/// budget cut short, a quarter more events than it held (so the server
/// reads few events only to drop them); after a full one, twice as many,
/// up to `max`.
fn next_limit(limit: i64, rows: i64, max: i64) -> i64 {
    if rows == 0 {
        limit
    } else if rows < limit {
        (rows + rows / 4 + 1).min(max)
    } else {
        limit.saturating_mul(2).min(max)
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
/// [`Error::Failed`] when the version is not registered; database errors.
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
