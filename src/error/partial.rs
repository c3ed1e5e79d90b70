//! The report of a multi-step operation that stopped part-way
//! ([`super::Error::Partial`]), assembled here rather than by each caller.

use std::fmt;

use super::Error;

/// The steps of a multi-step operation: what it does to each (`replayed`),
/// what a step is (`projectors`), the labels of those completed, and how many
/// there were in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steps {
    /// What the operation does to a step, in the past tense (`replayed`).
    pub verb: &'static str,
    /// What a step is, plural (`projectors`).
    pub unit: &'static str,
    /// Labels of the steps completed, in order.
    pub completed: Vec<String>,
    /// How many steps there were.
    pub total: usize,
}

impl Steps {
    /// No step completed yet of `total`.
    pub fn new(verb: &'static str, unit: &'static str, total: usize) -> Self {
        Self {
            verb,
            unit,
            completed: Vec::new(),
            total,
        }
    }

    /// The step `label` completed.
    pub fn done(&mut self, label: impl Into<String>) {
        self.completed.push(label.into());
    }

    /// `error` stopped the step `failed`: an [`Error::Partial`] carrying
    /// these steps, or `error` unchanged when `only_after_progress` and
    /// nothing had completed (its message says all there is to say).
    pub fn failed(
        &self,
        failed: impl Into<String>,
        error: Error,
        only_after_progress: bool,
    ) -> Error {
        if only_after_progress && self.completed.is_empty() {
            return error;
        }
        Error::Partial {
            steps: self.clone(),
            failed: failed.into(),
            source: Box::new(error),
        }
    }

    /// Splits per-step outcomes (label and result, in order) into the
    /// results, or the report of the first failure (later failures are
    /// logged).
    ///
    /// # Errors
    /// [`Error::Partial`] for the first failing step.
    pub fn collect<T>(
        verb: &'static str,
        unit: &'static str,
        outcomes: impl IntoIterator<Item = (String, crate::Result<T>)>,
    ) -> crate::Result<Vec<T>> {
        let outcomes: Vec<_> = outcomes.into_iter().collect();
        let mut steps = Self::new(verb, unit, outcomes.len());
        let mut done = Vec::new();
        let mut failure = None;
        for (label, result) in outcomes {
            match result {
                Ok(value) => {
                    steps.done(label);
                    done.push(value);
                }
                Err(e) if failure.is_none() => failure = Some((label, e)),
                Err(e) => tracing::error!(step = %label, error = %e, "{} failed", unit),
            }
        }
        match failure {
            Some((label, e)) => Err(steps.failed(label, e, false)),
            None => Ok(done),
        }
    }
}

impl fmt::Display for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} of {} {}",
            self.verb,
            self.completed.len(),
            self.total,
            self.unit
        )?;
        if !self.completed.is_empty() {
            write!(f, " ({})", self.completed.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_what_completed_and_keeps_the_failure_s_exit_code() {
        let outcomes = vec![
            ("a@1.0.0".to_owned(), Ok(1)),
            ("b@1.0.0".to_owned(), Err(Error::Busy("locked".into()))),
            ("c@1.0.0".to_owned(), Ok(3)),
        ];
        let err = Steps::collect("replayed", "projectors", outcomes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "replayed 2 of 3 projectors (a@1.0.0, c@1.0.0); b@1.0.0 failed"
        );
        assert_eq!(err.exit_code(), 7);
        assert!(err.is_retryable());
        assert!(matches!(err.failure(), Error::Busy(_)));
        assert_eq!(
            format!("{:#}", anyhow_like(&err)),
            "replayed 2 of 3 projectors (a@1.0.0, c@1.0.0); b@1.0.0 failed: locked"
        );
    }

    /// The chain as `coord: {err:#}` prints it.
    fn anyhow_like(err: &Error) -> String {
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        text
    }
}
