//! The figures of `coord-bench activation` and their text form.

use std::time::Duration;

use serde::Serialize;

use super::publish::Attempt;

/// The figures.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) bench: &'static str,
    pub(super) events_in_store: i64,
    pub(super) publishers: usize,
    pub(super) published_by_n: u64,
    pub(super) published_by_n_plus_1: u64,
    pub(super) refused: u64,
    pub(super) replay_seconds: f64,
    pub(super) replay_events_per_s: f64,
    pub(super) held_back_ms: f64,
    pub(super) critical_section_ms: f64,
    pub(super) final_catch_up_events: u64,
    pub(super) baseline_publish_ms_p99: f64,
    /// The longest publish that ended before the activation started, for
    /// scale beside the longest gate wait (which counts whole attempts,
    /// `BEGIN` to `COMMIT`).
    pub(super) publish_before_activation_ms_max: f64,
    pub(super) blocked_window_ms_max: f64,
    pub(super) blocked_window_ms_p99: f64,
    /// The longest single publish attempt (gate, append, inline handler)
    /// while the activation ran: the time a publisher waited inside the gate.
    pub(super) longest_gate_wait_ms: f64,
    /// Seconds the unrelated long transaction stayed open (`--long-transaction`).
    pub(super) long_transaction_s: Option<f64>,
    /// Activation attempts that gave up on the lock deadline before one completed.
    pub(super) activations_given_up: u32,
    pub(super) lost: i64,
    pub(super) applied_twice: i64,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index]
}

/// The publish times around the activation, in milliseconds.
pub(super) struct Windows {
    /// The longest publish that overlapped the hold-back window.
    pub(super) blocked_max: f64,
    /// The 99th percentile of those publishes.
    pub(super) blocked_p99: f64,
    /// The longest single attempt among publishes that ended after the
    /// activation started (the time a publisher waited inside the gate).
    pub(super) longest_gate_wait: f64,
    /// The 99th percentile of ordinary publishes: more than a second before
    /// the hold-back window, or after the flip.
    pub(super) baseline_p99: f64,
    /// The longest publish that ended before the activation started.
    pub(super) before_activation_max: f64,
}

impl Windows {
    /// Reads `attempts` against the hold-back window `hold_start..=flipped`
    /// and the start of the activation.
    pub(super) fn of(
        attempts: &[Attempt],
        hold_start: Duration,
        flipped: Duration,
        activation_started: Duration,
    ) -> Self {
        let ms = |a: &Attempt| (a.end - a.start).as_secs_f64() * 1e3;
        let mut during: Vec<f64> = attempts
            .iter()
            .filter(|a| a.end >= hold_start && a.start <= flipped)
            .map(ms)
            .collect();
        let longest_gate_wait = attempts
            .iter()
            .filter(|a| a.end >= activation_started)
            .map(|a| a.longest_try.as_secs_f64() * 1e3)
            .fold(0.0, f64::max);
        let mut baseline: Vec<f64> = attempts
            .iter()
            .filter(|a| {
                a.end < hold_start.saturating_sub(Duration::from_secs(1)) || a.start > flipped
            })
            .map(ms)
            .collect();
        Self {
            blocked_max: during.iter().copied().fold(0.0, f64::max),
            blocked_p99: percentile(&mut during, 0.99),
            longest_gate_wait,
            before_activation_max: attempts
                .iter()
                .filter(|a| a.end < activation_started)
                .map(ms)
                .fold(0.0, f64::max),
            baseline_p99: percentile(&mut baseline, 0.99),
        }
    }
}

impl Report {
    /// The figures as the text `coord-bench activation` prints.
    pub(super) fn text(&self) -> String {
        format!(
            "activation over {} events with {} publishers of N:\n  replay of N+1: {:.1} s ({:.0} events/s) while N published {} events\n  \
             publishers held back {:.1} ms (critical section {:.1} ms, {} events caught up inside)\n  \
             blocked window: max {:.1} ms, p99 {:.1} ms (ordinary publish p99 {:.1} ms)\n  \
             longest wait inside the gate during the activation: {:.1} ms (longest publish before it: {:.1} ms){}\n  \
             refused N publishers: {}; N+1 published {}\n  lost: {}, applied twice: {}",
            self.events_in_store,
            self.publishers,
            self.replay_seconds,
            self.replay_events_per_s,
            self.published_by_n,
            self.held_back_ms,
            self.critical_section_ms,
            self.final_catch_up_events,
            self.blocked_window_ms_max,
            self.blocked_window_ms_p99,
            self.baseline_publish_ms_p99,
            self.longest_gate_wait_ms,
            self.publish_before_activation_ms_max,
            match self.long_transaction_s {
                Some(s) => format!(
                    " (an unrelated transaction open {s} s; activations given up: {})",
                    self.activations_given_up
                ),
                None => String::new(),
            },
            self.refused,
            self.published_by_n_plus_1,
            self.lost,
            self.applied_twice
        )
    }
}
