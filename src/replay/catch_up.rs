//! [`catch_up`]: passes of a version until its lag is small, each pass
//! retried on connection loss ([`crate::replay::run_pass`]), and so is the
//! lag check between them.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument};

use crate::names::RelationName;
use crate::projector::{Projector, ProjectorExt};
use crate::replay::options::{CatchUpReport, ReplayOptions};
use crate::replay::pass::run_pass;
use crate::replay::retry::{At, Retries};
use crate::Result;

/// Runs passes of `projector`'s registered version until fewer than
/// `options.lag_threshold` committed handled events are left to apply (or
/// `options.max_passes` passes ran, or `cancel` fired).
///
/// # Errors
/// As [`run_pass`]; the lag check between passes is retried on connection
/// loss as a pass is.
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
        report.remaining = remaining(pool, projector, event_store, options, cancel).await?;
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

/// The committed handled events `projector`'s version still has to apply,
/// retried on connection loss.
async fn remaining(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    options: &ReplayOptions,
    cancel: &CancellationToken,
) -> Result<i64> {
    let label = projector.label();
    let version = projector.version().to_string();
    let event_types = projector.event_types();
    let mut retries = Retries::new(&label, options);
    loop {
        let attempt = async {
            let client = pool.get().await?;
            crate::event_store::pending(
                &**client,
                projector.name().as_str(),
                &version,
                &event_types,
                event_store,
            )
            .await
        };
        match attempt.await.at(|| "catch-up lag check".into()) {
            Ok(remaining) => return Ok(remaining),
            Err(failure) => retries.after(failure, false, cancel).await?,
        }
    }
}
