//! How a handler's failure is reported: [`EventError`], which names the
//! failing event, and the one text of a handler error
//! ([`handler_message`]) that every caller (replay, parking, the
//! publisher) uses, with the database's DETAIL kept.

use crate::projector::{Event, HandlerError, Projector};
use crate::Error;

/// A handler error that names the event it failed on. A projector that
/// returns it (boxed, as its [`HandlerError`]) lets a replay park that event,
/// or stop just before it, without searching the batch for it; any other
/// error makes the replay bisect the batch to find the failing events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    /// Position of the failing event.
    pub position: i64,
    /// What went wrong.
    pub message: String,
}

impl EventError {
    /// The event at `position` failed with `message`.
    pub fn new(position: i64, message: impl Into<String>) -> Self {
        Self {
            position,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EventError {}

/// The text of a handler error, with the database's message, SQLSTATE and
/// DETAIL when it is one (tokio-postgres's own `Display` says only "db
/// error"); otherwise the error and its chain of causes.
pub(crate) fn handler_message(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(db) = e
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|pg| pg.as_db_error())
    {
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str(": ");
            text.push_str(detail);
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// [`Error::Handler`]: `projector` failed on `event` with `error`.
pub(crate) fn handler_failure(
    projector: &dyn Projector,
    event: &Event,
    error: &HandlerError,
) -> Error {
    Error::Handler {
        projector: projector.name().to_string(),
        version: projector.version().to_string(),
        position: event.position,
        event_type: event.event_type.clone(),
        message: handler_message(&**error),
    }
}
