//! The event store (`coord.events`, or a table or view with its columns):
//! every statement that reads it or appends to it lives in this module:
//! the reads of a pass ([`PassQuery`], by query or binary `COPY`, decoded
//! into an [`EventBatch`]), lag and head position, the marking of a
//! version through a snapshot, and the publisher's append. Statements that
//! must be one with an event-store read or append (the `applied_ahead` rows
//! of an append, a version's lag) write or read coord's tables here too;
//! every other access to coord's tables is `crate::store`'s.
//!
//! It sits below `store` and `projector`: it imports neither, and [`Event`]
//! lives here so that both can use it (docs/decisions/0050-event-store-module.md).

mod append;
mod copy;
mod event;
mod lag;
mod mark;
mod pass_query;

pub(crate) use append::{append, stream_version, Append};
pub use copy::{EventBatch, Payload};
pub use event::Event;
pub use lag::{count_handled, head_position, pending, progress, VersionProgress};
pub(crate) use mark::mark_visible;
pub use pass_query::PassQuery;
