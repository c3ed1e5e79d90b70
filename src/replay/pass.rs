//! Passes (docs/decisions/0002-checkpoint-horizon.md): [`run_pass`] applies,
//! batch by batch, the handled events visible in one snapshot, each batch a
//! transaction with its checkpoint; [`catch_up`](crate::replay::catch_up)
//! runs passes until the lag is small. A pass is a pipeline of named stages: begin (or resume) the pass,
//! read and decode (`pipeline`), apply and record each batch
//! (`apply`, shared with the passes inside a caller's transaction in
//! `in_transaction`), and finish (move the horizon). Each stage names
//! itself in errors, and a pass that loses its connection is retried from
//! its last committed batch (`retry`, decision 0061). SQL lives in
//! `store::checkpoint` and `event_store`; this module decides the order of
//! things.

use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument};

use crate::event_store::{EventBatch, Payload};
use crate::names::RelationName;
use crate::projector::{ApplyContext, Phase, Projector, ProjectorExt};
use crate::replay::apply::{apply_batch, context, query, Estimate};
use crate::replay::batch::{self, BatchOutcome};
use crate::replay::options::{PassReport, Progress, ReplayOptions};
use crate::replay::pipeline;
use crate::replay::retry::{grouped, At, Retries, StepError};
use crate::store::checkpoint::{self, Checkpoint};
use crate::store::versions::VersionStatus;
use crate::{Error, Result};

/// Runs one pass of `projector`'s registered version (see
/// [`crate::replay::start_replay`]), resuming the pass in progress if there is
/// one: every handled event visible in the pass snapshot and not yet applied
/// is applied, in position order, in batches of `options.batch_size`. Each
/// batch is one transaction holding its projection writes, the checkpoint,
/// the counters and the progress fields. The next batch is read on a second
/// connection of `pool` while the current one is applied, so a pass uses two
/// connections.
///
/// A transient connection error (see [`ReplayOptions::retries`]) is retried
/// with a bounded backoff: the pass resumes from its last committed batch.
///
/// Cancelling `cancel` stops the pass at a batch boundary with its
/// checkpoint saved; the report says `cancelled`.
///
/// # Errors
/// [`Error::Handler`] when a handler fails and the projector's policy is
/// `fail` (the events before it are committed, the checkpoint is just
/// before it, and `last_error` is set); [`Error::Refused`] when the version
/// was aborted; [`Error::Busy`] when another process took the pass over;
/// [`Error::Failed`] naming the version, the step and the position
/// (`balances@2.0.0: replay batch at position 81,220: connection closed`)
/// when the connection was lost and the retries ran out; other database
/// and pool errors.
#[instrument(skip_all, fields(projector.name = %projector.name(), projector.version = %projector.version()), err(level = "debug"))]
pub async fn run_pass(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    options: &ReplayOptions,
    cancel: &CancellationToken,
) -> Result<PassReport> {
    let started = Instant::now();
    let label = projector.label();
    let mut report = PassReport {
        projector: projector.name().to_string(),
        version: projector.version().to_string(),
        applied: 0,
        parked: 0,
        batches: 0,
        cancelled: false,
        horizon: String::new(),
        elapsed: Duration::ZERO,
    };
    let mut retries = Retries::new(&label, options);
    loop {
        let batches_before = report.batches;
        let attempt = attempt(
            pool,
            projector,
            event_store,
            options,
            cancel,
            started,
            &mut report,
        );
        match attempt.await {
            Ok(()) => break,
            Err(failure) => {
                let progressed = report.batches > batches_before;
                retries.after(failure, progressed, cancel).await?;
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// One attempt at a pass: begins or resumes it and applies batches until
/// its end, cancellation or a failure, counting what it commits into the
/// pass's `report`.
async fn attempt(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    options: &ReplayOptions,
    cancel: &CancellationToken,
    started: Instant,
    report: &mut PassReport,
) -> Result<(), StepError> {
    const START: &str = "replay pass start";
    let mut writer = pool.get().await.at(|| START.into())?;
    // Before the snapshot: a pass over a large delta (the events published
    // during the previous pass) is planned on fresh statistics.
    crate::event_relation::refresh_statistics(&writer, event_store)
        .await
        .at(|| START.into())?;
    let (start, snapshot) = begin(&mut writer, projector).await.at(|| START.into())?;
    report.horizon.clone_from(&start.horizon);
    let name = projector.name().as_str();
    let cursor = start.pass_cursor.unwrap_or(0);
    let exclude_ahead = checkpoint::has_ahead_after(&**writer, name, &report.version, cursor)
        .await
        .at(|| START.into())?;
    let max_bytes = i64::try_from(options.batch_bytes.max(1)).unwrap_or(i64::MAX);
    let mut q = query(
        projector,
        event_store,
        &start.horizon,
        &snapshot,
        exclude_ahead,
        max_bytes,
    );
    q.payload = projector.replay_reads_payload();
    q.metadata = projector.replay_reads_metadata();
    let read_step = || format!("replay read after position {}", grouped(cursor));
    let batches = pipeline::read_batches(
        pool.get().await.at(read_step)?,
        q.clone(),
        cursor,
        i64::try_from(options.batch_size.max(1)).unwrap_or(i64::MAX),
        match (q.payload, projector.replay_reads_data_keys()) {
            (false, _) => Payload::Nothing,
            (true, None) => Payload::Whole,
            (true, Some(keys)) => Payload::DataKeys(keys),
        },
        cancel.clone(),
    )
    .at(read_step)?;
    let total = if options.count_total {
        let count_started = Instant::now();
        let remaining = q
            .count_or_estimate(&**writer, cursor, EXACT_COUNT_MAX)
            .await
            .at(|| format!("replay count after position {}", grouped(cursor)))?;
        debug!(
            count_ms = count_started.elapsed().as_millis() as u64,
            remaining, "counted"
        );
        Some(start.events_processed + remaining)
    } else {
        None
    };
    let mut pass = Pass {
        projector,
        label: projector.label(),
        options,
        snapshot,
        started,
        total,
        pass_total: total.map(|t| u64::try_from(t - start.events_processed).unwrap_or(0)),
        processed: start.events_processed,
        rate: 0.0,
        cursor,
        report,
    };
    // From horizon 0 this is the version's first pass: its tables started
    // empty (a resumed first pass finds only its own earlier batches).
    let phase = if start.horizon == "0" {
        Phase::Rebuild
    } else {
        Phase::Replay
    };
    let complete = pass
        .apply_all(
            &mut writer,
            batches,
            &context(&start.schema_name, phase),
            cancel,
        )
        .await?;
    if !complete && !pass.report.cancelled {
        if cancel.is_cancelled() {
            pass.report.cancelled = true;
        } else {
            let error = Error::Failed(format!(
                "the event reader of {} stopped before the end of its pass; run it again to resume",
                pass.label
            ));
            return Err(StepError::new("replay read", error));
        }
    }
    if pass.report.cancelled {
        info!(position = pass.cursor, "pass cancelled; checkpoint saved");
    } else {
        let horizon = pass
            .finish(&mut writer)
            .await
            .at(|| format!("replay pass end at position {}", grouped(pass.cursor)))?;
        pass.report.horizon = horizon;
    }
    Ok(())
}

/// A pass counts the events it has to apply when the planner expects at
/// most this many; it takes the planner's estimate above (decision 0075).
const EXACT_COUNT_MAX: i64 = 100_000;

/// Locks the checkpoint of `projector`'s version and begins a pass over
/// the current snapshot, or resumes the pass in progress. Returns the
/// checkpoint as it was and the pass snapshot.
async fn begin(writer: &mut Object, projector: &dyn Projector) -> Result<(Checkpoint, String)> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let label = projector.label();
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
    Ok((ck, snapshot))
}

/// An attempt at a pass of [`run_pass`] in progress.
struct Pass<'a> {
    projector: &'a dyn Projector,
    label: String,
    options: &'a ReplayOptions,
    snapshot: String,
    started: Instant,
    /// Estimated total of the version's events (`count_total`).
    total: Option<i64>,
    /// Of which this pass has to apply (progress callback's `total`).
    pass_total: Option<u64>,
    /// The version's `events_processed`.
    processed: i64,
    /// The rate recorded with the last batch, events per second.
    rate: f64,
    cursor: i64,
    /// The pass's report, over all its attempts.
    report: &'a mut PassReport,
}

impl Pass<'_> {
    /// Applies the batches of `batches`, each in a transaction of its own
    /// on `writer`, until the empty batch that ends the pass (returns
    /// true), cancellation or the reader stopping (false), or a failure
    /// (naming the batch).
    async fn apply_all(
        &mut self,
        writer: &mut Object,
        mut batches: pipeline::Batches,
        ctx: &ApplyContext,
        cancel: &CancellationToken,
    ) -> Result<bool, StepError> {
        // Only the empty read that ends the pass lets the horizon move: the
        // reader also stops when cancelled, so a closed channel proves nothing.
        while let Some(batch) = batches.recv().await {
            let mut batch = batch?;
            if batch.events.is_empty() {
                return Ok(true);
            }
            if cancel.is_cancelled() {
                self.report.cancelled = true;
                return Ok(false);
            }
            let batch_started = Instant::now();
            let (first, len) = (batch.events[0].position, batch.events.len());
            let step = || format!("replay batch at position {}", grouped(first));
            let (outcome, cursor) = self
                .apply_one(writer, ctx, &mut batch, &batches)
                .await
                .at(step)?;
            self.batch_done(&outcome, cursor, len, batch_started);
            if let Some(failure) = outcome.failure {
                return Err(StepError::new(step(), failure));
            }
        }
        Ok(false)
    }

    /// Applies `batch` and records it in the checkpoint in one transaction
    /// on `writer`, if this process still owns the pass; commits it, failure
    /// included (the events before a failing one are kept).
    async fn apply_one(
        &mut self,
        writer: &mut Object,
        ctx: &ApplyContext,
        batch: &mut EventBatch,
        batches: &pipeline::Batches,
    ) -> Result<(BatchOutcome, i64)> {
        let tx = writer.transaction().await?;
        let (ck, ()) = futures_util::future::try_join(
            checkpoint::lock(&*tx, self.projector.name().as_str(), &self.report.version),
            batch::set_search_path(&*tx, &ctx.schema),
        )
        .await?;
        ensure_owner(&ck, &self.snapshot, self.cursor, &self.label)?;
        // The events are freed on the decoder thread, while the checkpoint
        // is written and committed (decision 0079).
        let (outcome, cursor) = apply_batch(
            &tx,
            self.projector,
            ctx,
            batch,
            self.cursor,
            |o| self.estimate(o),
            |events| batches.done(events),
        )
        .await?;
        tx.commit().await?;
        Ok((outcome, cursor))
    }

    /// The progress figures of a batch with `outcome`; counts its applied
    /// events into `processed`.
    fn estimate(&mut self, outcome: &BatchOutcome) -> Estimate {
        let done = self.report.applied + self.report.parked + outcome.handled as u64;
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-6);
        self.rate = rate;
        self.processed += outcome.applied as i64;
        Estimate {
            events_total: self.total,
            rate_per_s: Some(rate),
            eta_s: self
                .total
                .map(|t| ((t - self.processed).max(0) as f64) / rate.max(1e-6)),
        }
    }

    /// Counts a committed batch into the report and tells the progress callback.
    fn batch_done(&mut self, outcome: &BatchOutcome, cursor: i64, len: usize, started: Instant) {
        let rate = self.rate;
        self.report.applied += outcome.applied as u64;
        self.report.parked += outcome.parked as u64;
        self.report.batches += 1;
        self.cursor = cursor;
        debug!(
            position = cursor,
            batch_len = len,
            applied = outcome.applied,
            parked = outcome.parked,
            rate_per_s = rate,
            apply_ms = started.elapsed().as_millis() as u64,
            "applied batch"
        );
        if let Some(progress) = &self.options.progress {
            progress(&Progress {
                projector: self.label.clone(),
                done: self.report.applied + self.report.parked,
                total: self.pass_total,
                rate_per_s: rate,
                position: cursor,
            });
        }
    }

    /// Ends the pass: the horizon moves to the pass snapshot's xmin, if
    /// this process still owns the pass. Returns the new horizon.
    async fn finish(&self, writer: &mut Object) -> Result<String> {
        let name = self.projector.name().as_str();
        let tx = writer.transaction().await?;
        let ck = checkpoint::lock(&*tx, name, &self.report.version).await?;
        ensure_owner(&ck, &self.snapshot, self.cursor, &self.label)?;
        let horizon =
            checkpoint::finish_pass(&*tx, name, &self.report.version, &self.snapshot).await?;
        tx.commit().await?;
        info!(
            applied = self.report.applied,
            parked = self.report.parked,
            horizon = %horizon,
            "pass finished"
        );
        Ok(horizon)
    }
}

fn ensure_owner(ck: &Checkpoint, snapshot: &str, cursor: i64, label: &str) -> Result<()> {
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
