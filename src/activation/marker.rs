//! The activation marker (docs/decisions/0067-publishers-wait-out-the-whole-activation.md):
//! a session lock `(ACTIVATING, hashtext(name))` that an activation of
//! projector `name` holds exclusive from before it marks the version
//! activating until the version is active or back to replaying. Publishers
//! refused with `ProjectorIsActivating` wait on it, shared, outside the gate
//! ([`crate::wait_out_activation`]), so they sleep through the whole
//! activation (the step that marks it, the critical section's attempts and
//! the pauses between them) and wake the moment it ends, instead of polling
//! the gate and taking CPU from the critical section.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::Type;

use crate::locks::key;
use crate::Result;

const LOCK: &str = concat!(
    "SELECT pg_advisory_lock(",
    key!(activating),
    ", hashtext($1))"
);
const UNLOCK: &str = concat!(
    "SELECT pg_advisory_unlock(",
    key!(activating),
    ", hashtext($1))"
);

/// How long taking the marker may wait: publishers hold it shared only for
/// a moment, while they wait out an activation that is no longer running.
const TAKE_WAIT: Duration = Duration::from_millis(500);

/// The marker of one activation, on a pooled connection of its own that the
/// activation's first step also uses. Dropped without [`release`](Self::release)
/// (an error path), the connection is closed rather than returned to the
/// pool, so the session lock cannot outlive the activation.
pub(super) struct ActivatingMarker {
    client: Option<Object>,
    name: String,
    held: bool,
}

impl ActivatingMarker {
    /// Takes the marker of projector `name`. When it cannot be had within a
    /// moment (a publisher is still waiting out an interrupted activation),
    /// the activation goes on without it: refused publishers then pause and
    /// retry instead of waiting on it.
    ///
    /// # Errors
    /// Pool and database errors.
    pub(super) async fn take(pool: &Pool, name: &str) -> Result<Self> {
        // Built first, as held: cancelled at any await below, the marker
        // closes its connection rather than pool it with the lock.
        let mut marker = Self {
            client: Some(pool.get().await?),
            name: name.to_owned(),
            held: true,
        };
        let client = marker.client();
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            TAKE_WAIT.as_millis()
        ))
        .await?;
        // A session lock taken inside a transaction outlives it.
        match tx.query_typed(LOCK, &[(&name, Type::TEXT)]).await {
            Ok(_) => tx.commit().await?,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                tx.rollback().await?;
                tracing::debug!(
                    projector = name,
                    "activation marker busy; refused publishers will poll"
                );
                marker.held = false;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(marker)
    }

    /// The statement that releases the marker (for
    /// [`critical_section_on`](super::critical::critical_section_on)'s
    /// `then`, which sends it with the flip's `COMMIT`), or `None` when it
    /// is not held. Once it has run, call [`released`](Self::released).
    pub(super) fn release_sql(&self) -> Option<String> {
        self.held.then(|| {
            format!(
                "SELECT pg_advisory_unlock({}, hashtext({}))",
                crate::locks::ACTIVATING,
                crate::names::quote_literal(&self.name)
            )
        })
    }

    /// Records that [`release_sql`](Self::release_sql) ran: the connection
    /// goes back to the pool.
    pub(super) fn released(mut self) {
        self.held = false;
    }

    /// The marker's connection, for the activation's steps.
    pub(super) fn client(&mut self) -> &mut tokio_postgres::Client {
        self.client
            .as_mut()
            .expect("the marker holds its connection")
    }

    /// Ends the activation's mark: publishers waiting on it wake. The
    /// connection goes back to the pool only once the lock is released
    /// (otherwise it is closed, which releases it).
    pub(super) async fn release(mut self) {
        if self.held {
            let client = self
                .client
                .as_ref()
                .expect("the marker holds its connection");
            match client
                .query_typed(UNLOCK, &[(&self.name, Type::TEXT)])
                .await
            {
                Ok(_) => self.held = false,
                Err(e) => {
                    tracing::debug!(error = %e, "could not release the activation marker; closing its connection");
                }
            }
        }
    }
}

impl Drop for ActivatingMarker {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if self.held {
                // Closing the session releases the lock.
                drop(Object::take(client));
            }
        }
    }
}
