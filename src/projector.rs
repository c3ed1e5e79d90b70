//! The projector abstraction: the [`Projector`] trait that Rust projectors
//! implement, the config-defined [`SqlProjector`] that implements it too, the
//! [`Event`] handlers receive, and the [`ProjectorSet`] a deployment runs.
//! Handlers run in a transaction the caller owns; this module never commits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use futures_util::future::try_join_all;
use semver::Version;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Statement, Transaction};

use crate::config::{Config, Mode, OnError, ProjectorConfig};
use crate::names::{schema_name, sha256_hex, ProjectorName, RelationName};
use crate::{Error, Result};

mod batch_sql;
mod bulk;

use batch_sql::PreparedBatchHandler;
pub use batch_sql::BATCH_RELATION;
pub use bulk::copy_rows;

/// What a handler may fail with.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

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

/// One event of the event store, as handlers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Global position (`$3` of config handlers).
    pub position: i64,
    /// Stream id (`$1`).
    pub stream_id: String,
    /// Version within the stream (`$2`).
    pub stream_version: i64,
    /// Event type (`$4`).
    pub event_type: String,
    /// Payload (`$5`).
    pub data: serde_json::Value,
    /// Metadata (`$6`).
    pub metadata: serde_json::Value,
    /// When it was recorded (`$7`).
    pub recorded_at: SystemTime,
}

impl Event {
    /// The columns, in this order, that [`Event::try_from`] decodes.
    pub const COLUMNS: &'static str =
        "position, stream_id, stream_version, event_type, data, metadata, recorded_at";
}

impl TryFrom<&Row> for Event {
    type Error = tokio_postgres::Error;

    fn try_from(row: &Row) -> Result<Self, Self::Error> {
        Ok(Event {
            position: row.try_get(0)?,
            stream_id: row.try_get(1)?,
            stream_version: row.try_get(2)?,
            event_type: row.try_get(3)?,
            data: row.try_get(4)?,
            metadata: row.try_get(5)?,
            recorded_at: row.try_get(6)?,
        })
    }
}

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
    /// The handler SQL per event type, when the projector is defined by SQL
    /// statements taking `$1..$7` (config projectors). Stored with the
    /// version at registration so that `coord.publish` can run it inline;
    /// `None` (the default, Rust projectors) leaves SQL publishers' events to
    /// the follower.
    fn handler_sql(&self) -> Option<BTreeMap<String, String>> {
        None
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

/// The parameter types of config handlers, `$1`..`$7`.
const HANDLER_PARAM_TYPES: [Type; 7] = [
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
    Type::TIMESTAMPTZ,
];

/// Batches at most this large run each statement unprepared (one round trip
/// less); larger ones prepare each handler once.
const UNPREPARED_MAX_EVENTS: usize = 4;

/// A projector defined in `coord.toml`: one SQL statement per event type,
/// run either once per event (`handlers`) or once per batch over the
/// relation [`BATCH_RELATION`] (`batch_handlers`).
///
/// Within one call of [`Projector::apply`], events with per-event handlers
/// split the batch into runs: each run of consecutive events with batch
/// handlers gets each batch statement once (in the order of
/// `batch_handlers`, over the run's events of its type), and the per-event
/// statements run in position order between runs.
#[derive(Clone, Debug)]
pub struct SqlProjector {
    config: ProjectorConfig,
    batch_handlers: Vec<PreparedBatchHandler>,
}

impl SqlProjector {
    /// Wraps a validated configuration entry whose events are read from the
    /// bundled store `coord.events`.
    pub fn new(config: ProjectorConfig) -> Self {
        Self::with_event_store(config, &RelationName::default())
    }

    /// Wraps a validated configuration entry whose events a replay reads
    /// from `event_store` (batch handlers read a replayed batch back from it).
    pub fn with_event_store(config: ProjectorConfig, event_store: &RelationName) -> Self {
        let batch_handlers = config
            .batch_handlers
            .iter()
            .map(|h| PreparedBatchHandler::new(h, event_store))
            .collect();
        Self {
            config,
            batch_handlers,
        }
    }

    /// The configuration entry.
    pub fn config(&self) -> &ProjectorConfig {
        &self.config
    }

    fn params(event: &Event) -> [&(dyn ToSql + Sync); 7] {
        [
            &event.stream_id,
            &event.stream_version,
            &event.position,
            &event.event_type,
            &event.data,
            &event.metadata,
            &event.recorded_at,
        ]
    }
}

#[async_trait]
impl Projector for SqlProjector {
    fn name(&self) -> &ProjectorName {
        &self.config.name
    }
    fn version(&self) -> &Version {
        &self.config.version
    }
    fn event_types(&self) -> Vec<String> {
        let batch = self.config.batch_handlers.iter().map(|h| &h.event_type);
        self.config.handlers.keys().chain(batch).cloned().collect()
    }
    fn tables(&self) -> &str {
        &self.config.tables
    }
    fn mode(&self) -> Mode {
        self.config.mode
    }
    fn on_error(&self) -> OnError {
        self.config.on_error
    }
    fn verify(&self) -> Vec<String> {
        self.config.verify.clone()
    }
    /// Batch statements read a replayed batch back from the event store;
    /// only per-event handlers need the payload in the client.
    fn replay_reads_payload(&self) -> bool {
        !self.config.handlers.is_empty()
    }
    /// `None` when the projector has batch handlers: `coord.publish` runs
    /// only per-event SQL, and would otherwise record events of batch types
    /// as applied without applying them; their SQL publishers' events are
    /// left to the follower, as for Rust projectors.
    fn handler_sql(&self) -> Option<BTreeMap<String, String>> {
        if self.config.batch_handlers.is_empty() {
            Some(self.config.handlers.clone())
        } else {
            None
        }
    }
    fn fingerprint(&self) -> String {
        let handlers: Vec<String> = self
            .config
            .handlers
            .iter()
            .map(|(t, sql)| format!("{t}\0{sql}"))
            .collect();
        let mut definition = format!(
            "tables\0{}\0handlers\0{}",
            self.config.tables,
            handlers.join("\0")
        );
        // Only when present, so definitions without them keep their fingerprint.
        if !self.config.batch_handlers.is_empty() {
            let batch: Vec<String> = self
                .config
                .batch_handlers
                .iter()
                .map(|h| format!("{}\0{}", h.event_type, h.sql))
                .collect();
            definition.push_str("\0batch_handlers\0");
            definition.push_str(&batch.join("\0"));
        }
        sha256_hex(&definition)
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        // Runs of consecutive events alike: per-event handlers split the
        // batch, so events of both kinds apply in position order.
        let mut run: Vec<&Event> = Vec::new();
        let mut run_per_event = false;
        for event in events {
            let per_event = self.config.handlers.contains_key(&event.event_type);
            if per_event != run_per_event && !run.is_empty() {
                self.apply_run(tx, &run, run_per_event, ctx).await?;
                run.clear();
            }
            run_per_event = per_event;
            run.push(event);
        }
        if !run.is_empty() {
            self.apply_run(tx, &run, run_per_event, ctx).await?;
        }
        Ok(())
    }
}

impl SqlProjector {
    async fn apply_run(
        &self,
        tx: &Transaction<'_>,
        run: &[&Event],
        per_event: bool,
        ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        if per_event {
            self.apply_per_event(tx, run).await
        } else {
            Ok(batch_sql::run(tx, &self.batch_handlers, run, ctx.phase).await?)
        }
    }

    /// Runs the per-event handlers of `events`, pipelined, in position order.
    async fn apply_per_event(
        &self,
        tx: &Transaction<'_>,
        events: &[&Event],
    ) -> Result<(), HandlerError> {
        let handled = events
            .iter()
            .copied()
            .filter_map(|e| self.config.handlers.get(&e.event_type).map(|sql| (e, sql)));
        if events.len() <= UNPREPARED_MAX_EVENTS {
            let calls = handled.map(|(event, sql)| {
                let values = Self::params(event);
                async move {
                    let typed: Vec<(&(dyn ToSql + Sync), Type)> =
                        values.iter().copied().zip(HANDLER_PARAM_TYPES).collect();
                    tx.execute_typed(sql, &typed).await
                }
            });
            try_join_all(calls).await?;
            return Ok(());
        }
        let mut statements: HashMap<&str, Statement> = HashMap::new();
        let wanted: BTreeSet<&str> = events
            .iter()
            .filter(|e| self.config.handlers.contains_key(&e.event_type))
            .map(|e| e.event_type.as_str())
            .collect();
        let prepared = try_join_all(
            wanted
                .iter()
                .map(|t| tx.prepare_typed(&self.config.handlers[*t], &HANDLER_PARAM_TYPES)),
        )
        .await?;
        statements.extend(wanted.into_iter().zip(prepared));
        // Pipelined: every statement is sent before the first answer arrives;
        // the server runs them in order.
        try_join_all(handled.map(|(event, _)| {
            let statement = &statements[event.event_type.as_str()];
            let values = Self::params(event);
            async move { tx.execute(statement, &values).await }
        }))
        .await?;
        Ok(())
    }
}

/// The projectors one deployment runs: its configuration `C` of
/// `name@version`s.
#[derive(Clone, Default)]
pub struct ProjectorSet {
    projectors: Vec<Arc<dyn Projector>>,
}

impl std::fmt::Debug for ProjectorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.projectors.iter().map(|p| p.label()))
            .finish()
    }
}

impl ProjectorSet {
    /// A set of projectors; names must be unique.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when two projectors share a name.
    pub fn new(projectors: Vec<Arc<dyn Projector>>) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for p in &projectors {
            if !seen.insert(p.name().clone()) {
                return Err(Error::InvalidInput(format!(
                    "projector {} is registered twice",
                    p.name()
                )));
            }
            if p.event_types().is_empty() {
                return Err(Error::InvalidInput(format!(
                    "projector {} handles no event types",
                    p.label()
                )));
            }
        }
        Ok(Self { projectors })
    }

    /// The config-defined projectors of `config`.
    pub fn from_config(config: &Config) -> Self {
        let projectors = config
            .projectors
            .iter()
            .map(|p| {
                Arc::new(SqlProjector::with_event_store(
                    p.clone(),
                    &config.event_store,
                )) as Arc<dyn Projector>
            })
            .collect();
        Self { projectors }
    }

    /// Adds the projectors of `other`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when a name is in both.
    pub fn merge(self, other: ProjectorSet) -> Result<Self> {
        let mut all = self.projectors;
        all.extend(other.projectors);
        Self::new(all)
    }

    /// The projectors, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Projector>> {
        self.projectors.iter()
    }

    /// The projector called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Projector>> {
        self.projectors.iter().find(|p| p.name().as_str() == name)
    }

    /// Number of projectors.
    pub fn len(&self) -> usize {
        self.projectors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.projectors.is_empty()
    }

    /// `{"name": "version", ...}`: the `projectors` argument of `coord.check_publish`.
    pub fn versions_json(&self) -> serde_json::Value {
        let map: BTreeMap<String, String> = self
            .projectors
            .iter()
            .map(|p| (p.name().to_string(), p.version().to_string()))
            .collect();
        serde_json::to_value(map).expect("a map of strings serialises")
    }
}
