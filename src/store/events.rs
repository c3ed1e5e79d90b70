//! Moved: events as a pass receives them are decoded by the event-store
//! module (`crate::event_store`); this path stays for callers that name it.

pub use crate::event_store::EventBatch;
