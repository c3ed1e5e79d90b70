//! The library's one error type, its retryability and its exit codes.
//! Mapping from PostgreSQL errors (the gate's SQLSTATEs) happens here and
//! nowhere else.

use std::fmt;
use std::time::Duration;

mod partial;
mod sqlstate;

pub use partial::Steps;

/// Everything that can go wrong in coord.
///
/// Each variant documents whether it is retryable and the exit code the
/// `coord` binary maps it to (see [`Error::exit_code`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid. Not retryable; exit code 2.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// An argument, name or value given to coord is invalid. Not retryable;
    /// exit code 2.
    #[error("{0}")]
    InvalidInput(String),

    /// `NewerProjectorIsActive` (SQLSTATE `CO001`): this code runs an older
    /// version of a projector than the active one. Not retryable; exit code 3.
    #[error("NewerProjectorIsActive (CO001): projector {projector} {running} is stale: {active} is active; route traffic to the new deployment")]
    NewerProjectorIsActive {
        /// The projector.
        projector: String,
        /// The version this publisher runs.
        running: String,
        /// The version active in the database.
        active: String,
    },

    /// `ProjectorNotYetActive` (SQLSTATE `CO002`): this code runs a newer
    /// version than the active one; it must not publish before activation.
    /// Not retryable (wait for the activation instead); exit code 4.
    #[error("ProjectorNotYetActive (CO002): projector {projector} {running} is not yet active: {active} is active; activate the new version before this code publishes")]
    ProjectorNotYetActive {
        /// The projector.
        projector: String,
        /// The version this publisher runs.
        running: String,
        /// The version active in the database.
        active: String,
    },

    /// `ProjectorIsActivating` (SQLSTATE `CO003`): an activation holds back
    /// the events of this projector for a moment. Retryable; exit code 5.
    #[error("ProjectorIsActivating (CO003): projector {projector} is activating {activating}: publishing its events is held back for a moment; retry")]
    ProjectorIsActivating {
        /// The projector.
        projector: String,
        /// The version this publisher runs.
        running: String,
        /// The version being activated.
        activating: String,
    },

    /// `UnknownProjectorActive` (SQLSTATE `CO004`): a projector this code
    /// does not know is active, so this code is older than the database.
    /// Not retryable; exit code 6.
    #[error("UnknownProjectorActive (CO004): projector {projector} is active at {active} but this publisher's configuration does not have it: this code is older than the database; route traffic to the new deployment")]
    UnknownProjectorActive {
        /// The projector.
        projector: String,
        /// Its active (or activating) version.
        active: String,
    },

    /// `ProjectorDefinitionMismatch` (SQLSTATE `CO005`): this code runs the
    /// active version of a projector, but with another definition (tables
    /// or handlers) than the one built under that version. Not retryable
    /// (bump the version); exit code 9.
    #[error("ProjectorDefinitionMismatch (CO005): projector {projector} {running} has another definition (fingerprint {}) than the active {running} (fingerprint {}): tables or handlers changed under the same version; bump the version", short(fingerprint), short(active_fingerprint))]
    ProjectorDefinitionMismatch {
        /// The projector.
        projector: String,
        /// The version this publisher runs, which is the active one.
        running: String,
        /// The fingerprint of this publisher's definition.
        fingerprint: String,
        /// The fingerprint of the active version's definition.
        active_fingerprint: String,
    },

    /// Another activation holds the lock, or a lock wait ran out. Retryable
    /// (later); exit code 7.
    #[error("{0}")]
    Busy(String),

    /// A wait reached its deadline. Retryable; exit code 8.
    #[error("{0}")]
    Timeout(String),

    /// The stream's version is not the one the publisher expected
    /// (SQLSTATE `CO006` from `coord.publish`). Retryable after reloading
    /// the stream; exit code 1.
    #[error("{}", conflict_message(stream, *expected, *actual))]
    StreamVersionConflict {
        /// The stream.
        stream: String,
        /// The version the publisher expected the stream to be at.
        expected: i64,
        /// The version it is at; `-1` when a concurrent publisher appended
        /// to it first (its new version is unknown to this transaction).
        actual: i64,
    },

    /// A projector's handler failed. Not retryable; exit code 1.
    #[error(
        "projector {projector}@{version} failed at position {position} ({event_type}): {message}"
    )]
    Handler {
        /// The projector.
        projector: String,
        /// Its version.
        version: String,
        /// The event's position.
        position: i64,
        /// The event's type.
        event_type: String,
        /// What the handler reported.
        message: String,
    },

    /// The `coord` schema is missing or older than this binary. Not
    /// retryable; exit code 1.
    #[error(
        "the coord schema is missing or out of date in this database: run `coord migrate` first"
    )]
    NotMigrated,

    /// The `coord` schema was migrated by a newer coord than this binary
    /// (`database` and `binary` are the newest migrations each knows), so
    /// this binary refuses to write. Not retryable; exit code 2.
    #[error("the coord schema in this database is at V{database}, newer than this coord {} knows (up to V{binary}): refusing to write; upgrade coord (read-only commands such as status still work)", env!("CARGO_PKG_VERSION"))]
    SchemaTooNew {
        /// The newest migration applied to the database.
        database: i32,
        /// The newest migration this binary knows.
        binary: i32,
    },

    /// Publishers could not be held back within the lock policy's deadline:
    /// a long-running transaction holds the gate's locks. Nothing was
    /// changed (`after` says what state was left). Retryable (later); exit
    /// code 7.
    #[error("could not {operation} within {deadline:?} ({attempts} attempts): a long-running transaction kept publishers from being held back{after}: retry later")]
    LockDeadline {
        /// What was being done (`activate balances@2.0.0`).
        operation: String,
        /// The lock policy's deadline.
        deadline: Duration,
        /// Attempts made.
        attempts: u32,
        /// What was left behind, as `; it is back to replaying`, or empty.
        after: &'static str,
    },

    /// A `verify` assertion of a projector version did not hold; the active
    /// version is untouched. Not retryable; exit code 1.
    #[error("verify of {projector} failed: assertion {number} `{sql}` returned {outcome}; the active version is untouched")]
    VerifyFailed {
        /// `name@version`.
        projector: String,
        /// Which assertion (from 1).
        number: usize,
        /// Its SQL.
        sql: String,
        /// What it returned instead of true.
        outcome: String,
    },

    /// The operation was cancelled (Ctrl-C); replays and catch-ups stopped
    /// at a batch boundary with their checkpoints saved. Not retryable
    /// (run the command again); exit code 1.
    #[error("cancelled during {during}; its checkpoint is saved: run the command again to resume")]
    Cancelled {
        /// What was running (`the replay of balances@2.0.0`).
        during: String,
    },

    /// A multi-step operation failed after completing some steps
    /// (refinery's report): what completed, of how many, and the failure.
    /// Retryable and exit code as the failure.
    #[error("{steps}; {failed} failed")]
    Partial {
        /// The steps completed and their total.
        steps: Steps,
        /// The step that failed (`ledger@1.1.0`).
        failed: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },

    /// A state does not allow the operation (a downgrade, a changed
    /// definition under the same version, nothing to roll back to...).
    /// Not retryable; exit code 2.
    #[error("{0}")]
    Refused(String),

    /// Anything else the operation could not do. Not retryable; exit code 1.
    #[error("{0}")]
    Failed(String),

    /// A PostgreSQL error. Retryable when the connection was lost or the
    /// transaction hit a serialization failure or deadlock; exit code 1.
    #[error(transparent)]
    Db(tokio_postgres::Error),

    /// The connection pool could not hand out a connection. Retryable;
    /// exit code 1.
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),

    /// A migration failed. Not retryable; exit code 1.
    #[error(transparent)]
    Migration(#[from] refinery::Error),
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

fn conflict_message(stream: &str, expected: i64, actual: i64) -> String {
    if actual < 0 {
        format!("StreamVersionConflict (CO006): stream {stream} was appended to by a concurrent publisher: reload it and retry")
    } else {
        format!("StreamVersionConflict (CO006): stream {stream} is at version {actual}, not {expected}: reload it and retry")
    }
}

/// A convenient alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The projector of a `ProjectorIsActivating` refusal.
    pub(crate) fn activating_projector(&self) -> Option<&str> {
        match self {
            Error::ProjectorIsActivating { projector, .. } => Some(projector),
            _ => None,
        }
    }

    /// Whether trying the same thing again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Partial { source, .. } => source.is_retryable(),
            Error::ProjectorIsActivating { .. }
            | Error::LockDeadline { .. }
            | Error::Busy(_)
            | Error::Timeout(_)
            | Error::StreamVersionConflict { .. }
            | Error::Pool(_) => true,
            Error::Db(e) => {
                e.is_closed()
                    || matches!(
                        e.code().map(|c| c.code()),
                        Some("40001" | "40P01" | "55P03" | "57014")
                    )
            }
            _ => false,
        }
    }

    /// The `coord` binary's exit code for this error (DESIGN.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Partial { source, .. } => source.exit_code(),
            Error::Config(_)
            | Error::InvalidInput(_)
            | Error::Refused(_)
            | Error::SchemaTooNew { .. } => 2,
            Error::NewerProjectorIsActive { .. } => 3,
            Error::ProjectorNotYetActive { .. } => 4,
            Error::ProjectorIsActivating { .. } => 5,
            Error::UnknownProjectorActive { .. } => 6,
            Error::Busy(_) | Error::LockDeadline { .. } => 7,
            Error::Timeout(_) => 8,
            Error::ProjectorDefinitionMismatch { .. } => 9,
            _ => 1,
        }
    }

    /// The error that stopped the operation: the failure inside a
    /// [`Error::Partial`], else this error itself.
    pub fn failure(&self) -> &Error {
        match self {
            Error::Partial { source, .. } => source.failure(),
            other => other,
        }
    }

    /// Whether this is one of the five gate refusals.
    pub fn is_gate_refusal(&self) -> bool {
        matches!(
            self.failure(),
            Error::NewerProjectorIsActive { .. }
                | Error::ProjectorDefinitionMismatch { .. }
                | Error::ProjectorNotYetActive { .. }
                | Error::ProjectorIsActivating { .. }
                | Error::UnknownProjectorActive { .. }
        )
    }

    /// The SQLSTATE of a gate refusal (`CO001`..`CO005`), or `CO006` for
    /// a stream version conflict.
    pub fn sqlstate(&self) -> Option<&'static str> {
        match self {
            Error::Partial { source, .. } => source.sqlstate(),
            Error::NewerProjectorIsActive { .. } => Some("CO001"),
            Error::ProjectorNotYetActive { .. } => Some("CO002"),
            Error::ProjectorIsActivating { .. } => Some("CO003"),
            Error::UnknownProjectorActive { .. } => Some("CO004"),
            Error::ProjectorDefinitionMismatch { .. } => Some("CO005"),
            Error::StreamVersionConflict { .. } => Some("CO006"),
            _ => None,
        }
    }
}

/// An invalid configuration: the file and every problem found, each naming
/// the projector and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or source) the configuration came from.
    pub source_name: String,
    /// One line per problem.
    pub problems: Vec<String>,
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid configuration {}: {one}", self.source_name),
            many => {
                write!(
                    f,
                    "invalid configuration {} ({} problems):",
                    self.source_name,
                    many.len()
                )?;
                for problem in many {
                    write!(f, "\n  - {problem}")?;
                }
                Ok(())
            }
        }
    }
}
