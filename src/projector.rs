//! The projector abstraction: the [`Projector`] trait that Rust projectors
//! implement, the config-defined [`SqlProjector`] that implements it too
//! (`sql`), the [`ProjectorSet`] a deployment runs (`set`), the context
//! handlers run in ([`ApplyContext`], `search_path`) and how their
//! failures read (`failure`). [`Event`] is the event store's
//! (`crate::event_store`), re-exported here. Handlers run in a transaction
//! the caller owns; this module never commits.

use std::collections::BTreeMap;

use async_trait::async_trait;
use semver::Version;
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use crate::config::{Mode, OnError};
use crate::names::{quote_ident, schema_name, sha256_hex, ProjectorName};
use crate::Result;

mod batch_sql;
mod bulk;
mod failure;
mod set;
mod sql;

pub use crate::event_store::Event;
pub use batch_sql::BATCH_RELATION;
pub use bulk::copy_rows;
pub(crate) use failure::{handler_failure, handler_message, message_for, named_positions};
pub use failure::{EventError, EventErrors};
pub use set::ProjectorSet;
pub use sql::SqlProjector;

/// What a handler may fail with.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Why a handler is being called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Replaying or catching up from the event store, in batches.
    Replay,
    /// The first pass of a replay from the beginning of the store: the
    /// version's tables were empty when it started and hold only what this
    /// pass's earlier batches wrote, so rows a batch creates can be loaded
    /// with [`copy_rows`] instead of inserted or upserted.
    Rebuild,
    /// Inside a publishing transaction, on the events it appends.
    Inline,
}

/// What a handler knows about the call.
#[derive(Clone, Debug)]
pub struct ApplyContext {
    /// The version's schema; `search_path` is already set to it.
    pub schema: String,
    /// Replay or inline.
    pub phase: Phase,
    /// This call has the events of an earlier call of the same batch less
    /// those that call's error named ([`EventError`], [`EventErrors`]),
    /// which were parked: what that call found of the others still holds
    /// where it judged each event on its own (a set-based projector's
    /// checks are not run again then; decision 0091).
    pub named_failures_removed: bool,
}

const SET_SEARCH_PATH: &str = "SELECT set_config('search_path', $1, true)";

/// Sets `search_path` to `schema` (quoted here) for the rest of the
/// transaction, so handlers name their tables unqualified. One statement,
/// not prepared: a caller may pipeline it with the handlers' first one.
///
/// # Errors
/// Database errors.
pub(crate) async fn set_search_path(client: &impl GenericClient, schema: &str) -> Result<()> {
    restore_search_path(client, &quote_ident(schema)).await
}

/// Sets `search_path` to `value` as it is (a value read earlier with
/// `current_setting('search_path')`) for the rest of the transaction.
///
/// # Errors
/// Database errors.
pub(crate) async fn restore_search_path(client: &impl GenericClient, value: &str) -> Result<()> {
    client
        .query_typed(SET_SEARCH_PATH, &[(&value, Type::TEXT)])
        .await?;
    Ok(())
}

/// A read-model builder. Implement it for projectors written in Rust;
/// [`SqlProjector`] implements it for projectors defined in `coord.toml`.
///
/// `apply` receives events in position order (and so in stream-version order
/// within each stream), only of the types [`Projector::event_types`] names,
/// inside a transaction whose `search_path` is the version's schema. During a
/// replay a batch holds many events: fold them before writing to get near the
/// store's read speed.
#[async_trait]
pub trait Projector: Send + Sync {
    /// The projector's name.
    fn name(&self) -> &ProjectorName;
    /// The projector's version.
    fn version(&self) -> &Version;
    /// The event types it handles.
    fn event_types(&self) -> Vec<String>;
    /// DDL of its tables, run in the version's fresh schema.
    fn tables(&self) -> &str;
    /// Inline or async (default inline).
    fn mode(&self) -> Mode {
        Mode::Inline
    }
    /// What a replay does with a failing event (default fail).
    fn on_error(&self) -> OnError {
        OnError::Fail
    }
    /// SQL assertions, each returning one boolean, that must hold before activation.
    fn verify(&self) -> Vec<String> {
        Vec::new()
    }
    /// A hash of the definition: the same version with another fingerprint is
    /// refused. The default covers the tables and event types; Rust projectors
    /// should override it to include a revision of their handler code.
    fn fingerprint(&self) -> String {
        let mut types = self.event_types();
        types.sort();
        sha256_hex(&format!(
            "tables\0{}\0types\0{}",
            self.tables(),
            types.join("\0")
        ))
    }
    /// Whether `apply` reads the events' `data` and `metadata` in replays
    /// and catch-ups (default true). A projector that reads them from the
    /// event store itself returns false and gets them as `null` there,
    /// sparing the decoding; inline it always gets them.
    fn replay_reads_payload(&self) -> bool {
        true
    }
    /// Whether `apply` reads the events' `metadata` in replays and
    /// catch-ups (default true). A projector that reads only their `data`
    /// returns false and gets `metadata` as `null` there: the server does
    /// not send it and the client does not parse it, which counts when
    /// events carry more metadata than data (decision 0081). Inline it
    /// always gets it; without the payload
    /// ([`Projector::replay_reads_payload`] false) it gets neither.
    fn replay_reads_metadata(&self) -> bool {
        true
    }
    /// The top-level keys of the events' `data` that `apply` reads in
    /// replays and catch-ups (default `None`: all of it). A projector that
    /// reads a few keys of larger payloads names them and may get each
    /// `data` object with only those keys there: the client skips the rest
    /// of the JSON without building it, which counts when decoding is the
    /// replay's bottleneck (decision 0093). A `data` that is not an object
    /// comes whole. `apply` must read no other key and must give the same
    /// result on the whole `data`, which it gets inline and in passes that
    /// run inside a caller's transaction. Applies only with
    /// [`Projector::replay_reads_payload`].
    fn replay_reads_data_keys(&self) -> Option<Vec<String>> {
        None
    }
    /// The handler SQL per event type, when the projector is defined by SQL
    /// statements taking `$1..$7` (config projectors). Stored with the
    /// version at registration so that `coord.publish` can run it inline;
    /// `None` (the default, Rust projectors) leaves SQL publishers' events to
    /// the follower.
    fn handler_sql(&self) -> Option<BTreeMap<String, String>> {
        None
    }
    /// The `definition` stored with the version at registration, which
    /// `coord.publish` runs: `{"handlers": {type: sql}}` from
    /// [`Projector::handler_sql`] by default (`None`: SQL publishers'
    /// events are left to the follower). [`SqlProjector`] adds its batch
    /// statements (docs/decisions/0041-sql-publish-runs-batch-handlers.md).
    fn stored_definition(&self) -> Option<serde_json::Value> {
        crate::store::versions::definition_of(self.handler_sql().as_ref())
    }
    /// Applies `events` in the caller's transaction.
    ///
    /// # Errors
    /// Whatever the handler fails with; the caller rolls back or parks.
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        ctx: &ApplyContext,
    ) -> Result<(), HandlerError>;
}

/// Helpers every projector gets.
pub trait ProjectorExt: Projector {
    /// `name@version`.
    fn label(&self) -> String {
        format!("{}@{}", self.name(), self.version())
    }
    /// The version's schema (see [`schema_name`]).
    fn schema(&self) -> String {
        schema_name(self.name(), self.version())
    }
    /// Whether it handles `event_type`.
    fn handles(&self, event_type: &str) -> bool {
        self.event_types().iter().any(|t| t == event_type)
    }
}

impl<P: Projector + ?Sized> ProjectorExt for P {}
