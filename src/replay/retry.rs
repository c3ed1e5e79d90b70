//! Connection loss during passes (docs/decisions/0061-retrying-transient-connection-loss.md):
//! every step of a pass reports what it was doing ([`StepError`]); a
//! transient connection error ([`is_transient`]) is retried with a bounded
//! backoff ([`Retries`]), which is safe because every batch commits its
//! checkpoint in the same transaction as its writes, so a retried pass
//! resumes from the last committed batch. Anything else (a handler's
//! failure under `on_error`, a refusal, another process owning the pass)
//! is returned as it was. When the retries run out, the error names the
//! projector version, the step and the position.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::replay::options::ReplayOptions;
use crate::Error;

/// An error and the step of a pass it stopped (`replay batch at position
/// 81,220`).
#[derive(Debug)]
pub(super) struct StepError {
    pub step: String,
    pub error: Box<Error>,
}

impl StepError {
    pub fn new(step: impl Into<String>, error: impl Into<Error>) -> Self {
        Self {
            step: step.into(),
            error: Box::new(error.into()),
        }
    }
}

/// Names the step of a fallible call: `.at(|| "replay pass end".into())?`.
pub(super) trait At<T> {
    fn at(self, step: impl FnOnce() -> String) -> Result<T, StepError>;
}

impl<T, E: Into<Error>> At<T> for Result<T, E> {
    fn at(self, step: impl FnOnce() -> String) -> Result<T, StepError> {
        self.map_err(|e| StepError::new(step(), e))
    }
}

/// Whether `error` is a lost or refused connection, or a transaction the
/// server ended for a reason that does not repeat: the connection is closed
/// or was reset, SQLSTATE class 08 (connection exception), 57P01
/// (admin_shutdown, `pg_terminate_backend`), 57P02 (crash_shutdown), 57P03
/// (cannot_connect_now), 40001 (serialization failure) or 40P01 (deadlock
/// detected) raised by coord's own statements, or the pool timing out or
/// failing to connect for one of these reasons. A handler's own errors
/// never get here as database errors: they go to its `on_error` policy.
pub(crate) fn is_transient(error: &Error) -> bool {
    match error {
        Error::Db(e) => transient_postgres(e),
        Error::Pool(deadpool_postgres::PoolError::Backend(e)) => transient_postgres(e),
        Error::Pool(deadpool_postgres::PoolError::Timeout(_)) => true,
        _ => false,
    }
}

fn transient_postgres(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code().map(tokio_postgres::error::SqlState::code) {
        return code.starts_with("08")
            || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01");
    }
    // No SQLSTATE: an I/O error (connection refused or reset, broken pipe).
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The retries of one pass (or lag check) of a projector version.
pub(super) struct Retries<'a> {
    label: &'a str,
    options: &'a ReplayOptions,
    /// Failed attempts in a row that committed nothing.
    failures: u32,
    /// Retries made in all.
    retried: u32,
    started: Instant,
}

impl<'a> Retries<'a> {
    pub fn new(label: &'a str, options: &'a ReplayOptions) -> Self {
        Self {
            label,
            options,
            failures: 0,
            retried: 0,
            started: Instant::now(),
        }
    }

    /// After an attempt failed with `failure` (having committed batches when
    /// `progressed`): waits out the backoff and returns `Ok` when the
    /// attempt may run again, or the error to return. Only transient errors
    /// are retried, at most `options.retries` times in a row without a
    /// committed batch; a batch committed in between starts the count
    /// again. Cancelling `cancel` ends the wait with the error.
    pub async fn after(
        &mut self,
        failure: StepError,
        progressed: bool,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        if !is_transient(&failure.error) {
            return Err(*failure.error);
        }
        if progressed {
            self.failures = 0;
        }
        if self.failures >= self.options.retries {
            return Err(self.give_up(&failure, ""));
        }
        let delay = backoff(
            self.failures,
            self.options.retry_backoff,
            self.options.retry_backoff_max,
        );
        self.failures += 1;
        self.retried += 1;
        warn!(
            projector = %self.label,
            step = %failure.step,
            error = %failure.error,
            retry = self.failures,
            retries = self.options.retries,
            delay_ms = delay.as_millis() as u64,
            "transient database error (connection lost); retrying"
        );
        tokio::select! {
            () = cancel.cancelled() => Err(self.give_up(&failure, "; cancelled while waiting to retry")),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }

    fn give_up(&self, failure: &StepError, why: &str) -> Error {
        let retried = match self.retried {
            0 => String::new(),
            1 => format!(" (retried once over {:.1} s)", self.elapsed()),
            n => format!(" (retried {n} times over {:.1} s)", self.elapsed()),
        };
        Error::Failed(format!(
            "{}: {}: {}{retried}{why}; its checkpoint is saved: run the command again to resume",
            self.label, failure.step, failure.error
        ))
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// The wait before retry number `failures + 1`: `first`, doubled for
/// each failure before it, at most `max`.
fn backoff(failures: u32, first: Duration, max: Duration) -> Duration {
    first
        .saturating_mul(1u32.checked_shl(failures).unwrap_or(u32::MAX))
        .min(max)
}

/// `n` with its thousands grouped: `81,220`.
pub(super) fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(81_220), "81,220");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(-1_000), "-1,000");
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let first = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let waits: Vec<u64> = (0..7)
            .map(|f| backoff(f, first, max).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(64, first, max), max);
    }
}
