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

/// A handler error that names every failing event of the call, each with
/// its own message. A projector that checks all its events before writing
/// (a fold) can return it so that a replay under `park` parks them all and
/// applies the rest in one more call, instead of one more call per failing
/// event (docs/decisions/0070-naming-every-failing-event.md). Under `fail`
/// the first of them (by position) is the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventErrors {
    /// The failing events, each with its message.
    pub errors: Vec<EventError>,
}

impl EventErrors {
    /// The events of `errors` failed.
    pub fn new(errors: Vec<EventError>) -> Self {
        Self { errors }
    }
}

impl std::fmt::Display for EventErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errors.iter().min_by_key(|e| e.position) {
            None => f.write_str("a handler failed without naming its events"),
            Some(first) if self.errors.len() == 1 => f.write_str(&first.message),
            Some(first) => write!(
                f,
                "{} (and {} more failing events)",
                first.message,
                self.errors.len() - 1
            ),
        }
    }
}

impl std::error::Error for EventErrors {}

/// The positions `error` names: one for an [`EventError`], each of an
/// [`EventErrors`], none for any other error.
pub(crate) fn named_positions(error: &HandlerError) -> Vec<i64> {
    if let Some(e) = error.downcast_ref::<EventError>() {
        vec![e.position]
    } else if let Some(e) = error.downcast_ref::<EventErrors>() {
        e.errors.iter().map(|e| e.position).collect()
    } else {
        Vec::new()
    }
}

/// The text of `error` for the event at `position`: the message an
/// [`EventErrors`] has for it, otherwise [`handler_message`].
pub(crate) fn message_for(error: &HandlerError, position: i64) -> String {
    if let Some(e) = error.downcast_ref::<EventErrors>() {
        if let Some(one) = e.errors.iter().find(|e| e.position == position) {
            return one.message.clone();
        }
    }
    handler_message(&**error)
}

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
        message: message_for(error, event.position),
    }
}
