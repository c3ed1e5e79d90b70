//! The only code that reads and writes coord's own tables
//! (`coord.projector_states`, `coord.projector_versions`, `coord.transitions`,
//! `coord.applied_ahead`, `coord.parked_events`). Functions take a
//! [`GenericClient`] so callers compose them in one transaction. Nothing here
//! decides policy: callers (replay, activation) do. The one exception: the
//! statements that also read or append the event store (the publisher's
//! `applied_ahead` rows, marking a snapshot) live in `crate::event_store`
//! (docs/decisions/0050-event-store-module.md). Private to the crate:
//! applications read coord's records through `crate::records`.

pub mod checkpoint;
pub mod history;
pub mod parked;
pub mod states;
pub mod versions;

pub use tokio_postgres::GenericClient;

use crate::{Error, Result};

/// Who made a change, recorded in the transition history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Actor {
    /// Host name of the machine.
    pub host: String,
    /// The command (or application operation) that made the change.
    pub command: String,
    /// The roles granted access to the versions this actor registers
    /// (`coord.toml` `[privileges]`); not part of the history.
    #[serde(skip)]
    pub privileges: crate::privileges::Privileges,
}

impl Actor {
    /// An actor.
    pub fn new(host: impl Into<String>, command: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            command: command.into(),
            privileges: crate::privileges::Privileges::default(),
        }
    }

    /// This actor, granting `privileges` on every version it registers.
    #[must_use]
    pub fn with_privileges(mut self, privileges: crate::privileges::Privileges) -> Self {
        self.privileges = privileges;
        self
    }
}

const IS_MIGRATED: &str = "SELECT to_regclass('coord.projector_versions') IS NOT NULL \
    AND to_regprocedure('coord.publish(jsonb,text,bigint,jsonb)') IS NOT NULL";

/// Fails with a clear message when `coord migrate` has not been run.
///
/// # Errors
/// [`Error::NotMigrated`].
pub async fn ensure_migrated(client: &impl GenericClient) -> Result<()> {
    let row = client.query_one(IS_MIGRATED, &[]).await?;
    if row.try_get::<_, bool>(0)? {
        crate::migrate::warn_if_newer(client).await
    } else {
        Err(Error::NotMigrated)
    }
}
