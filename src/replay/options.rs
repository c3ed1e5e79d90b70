//! What a caller tunes about a replay ([`ReplayOptions`]), what it is told
//! while it runs ([`Progress`]) and what a pass reports ([`PassReport`]).
//! Plain data: nothing here touches the database.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A progress callback, called after every committed batch.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How replays and catch-ups run.
#[derive(Clone)]
pub struct ReplayOptions {
    /// Events per batch (one transaction each). Default 50,000.
    pub batch_size: usize,
    /// Bytes per batch: a batch also closes before the event that would take
    /// the size of its events (as read: their binary `COPY` tuples; inside a
    /// caller's transaction, as stored plus 64 bytes each) past this, so
    /// memory follows this budget rather than the events' weight (decision
    /// 0071). A batch holds at least one event. Default
    /// [`DEFAULT_BATCH_BYTES`] (16 MiB).
    pub batch_bytes: usize,
    /// Projector versions replayed at once by [`crate::replay::replay_many`]. Default 2.
    pub jobs: usize,
    /// A catch-up stops once fewer handled events than this are left. Default 1,000.
    pub lag_threshold: i64,
    /// A catch-up runs at most this many passes. Default 20.
    pub max_passes: usize,
    /// Count the events a pass will apply when it starts (for the total and
    /// the ETA). Default true.
    pub count_total: bool,
    /// Called after every batch.
    pub progress: Option<ProgressFn>,
    /// Retries of a pass (and of a catch-up's lag check) after a transient
    /// connection error: a closed or reset connection, SQLSTATE class 08,
    /// 57P01/57P02/57P03, or a serialization failure or deadlock of coord's
    /// own statements. Counted in a row: a batch committed in between starts
    /// the count again. A retried pass resumes from its last committed
    /// batch. Handler errors (`on_error`) are never retried. 0 turns
    /// retrying off. Default 5.
    pub retries: u32,
    /// The wait before the first retry; it doubles with each retry in a
    /// row, up to [`ReplayOptions::retry_backoff_max`]. Default 100 ms.
    pub retry_backoff: Duration,
    /// The longest wait between two retries. Default 2 s (with the other
    /// defaults, at most 3.1 s of waiting before a pass gives up).
    pub retry_backoff_max: Duration,
}

/// The default [`ReplayOptions::batch_bytes`]: 16 MiB.
pub const DEFAULT_BATCH_BYTES: usize = 16 << 20;

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            batch_size: 50_000,
            batch_bytes: DEFAULT_BATCH_BYTES,
            jobs: 2,
            lag_threshold: 1_000,
            max_passes: 20,
            count_total: true,
            progress: None,
            retries: 5,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(2),
        }
    }
}

impl fmt::Debug for ReplayOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayOptions")
            .field("batch_size", &self.batch_size)
            .field("batch_bytes", &self.batch_bytes)
            .field("jobs", &self.jobs)
            .field("lag_threshold", &self.lag_threshold)
            .field("max_passes", &self.max_passes)
            .field("count_total", &self.count_total)
            .field("progress", &self.progress.is_some())
            .field("retries", &self.retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("retry_backoff_max", &self.retry_backoff_max)
            .finish()
    }
}

/// Where a pass is, after a batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Progress {
    /// `name@version`.
    pub projector: String,
    /// Events applied (or parked) by this pass so far.
    pub done: u64,
    /// Events this pass expects to handle, when counted.
    pub total: Option<u64>,
    /// Events per second in this pass.
    pub rate_per_s: f64,
    /// Last position handled.
    pub position: i64,
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PassReport {
    /// Projector name.
    pub projector: String,
    /// Version.
    pub version: String,
    /// Events applied.
    pub applied: u64,
    /// Events parked (`on_error = "park"`).
    pub parked: u64,
    /// Batches committed.
    pub batches: u64,
    /// Whether it stopped at a batch boundary because it was cancelled
    /// (its checkpoint is saved; the next pass resumes it).
    pub cancelled: bool,
    /// The horizon after the pass (an `xid8`, as text); unchanged when cancelled.
    pub horizon: String,
    /// How long it took.
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

impl PassReport {
    /// Events per second.
    pub fn rate_per_s(&self) -> f64 {
        per_second(self.applied + self.parked, self.elapsed)
    }
}

/// What a catch-up (passes until the lag is small) did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CatchUpReport {
    /// Projector name.
    pub projector: String,
    /// Version.
    pub version: String,
    /// Passes run.
    pub passes: u64,
    /// Events applied, all passes together.
    pub applied: u64,
    /// Events parked.
    pub parked: u64,
    /// Committed handled events still to apply when it stopped.
    pub remaining: i64,
    /// Whether it was cancelled.
    pub cancelled: bool,
    /// How long it took.
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

impl CatchUpReport {
    /// Events per second over all passes.
    pub fn rate_per_s(&self) -> f64 {
        per_second(self.applied + self.parked, self.elapsed)
    }
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `events` per second over `elapsed` (0 when no time passed).
fn per_second(events: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        events as f64 / secs
    } else {
        0.0
    }
}
