//! [`SqlProjector`]: a projector defined in `coord.toml`, whose handlers
//! are SQL statements run per event or once per batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use futures_util::future::try_join_all;
use semver::Version;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Statement, Transaction};

use crate::config::{Mode, OnError, ProjectorConfig};
use crate::names::{sha256_hex, ProjectorName, RelationName};
use crate::projector::batch_sql::{self, PreparedBatchHandler, PreparedChecks};
use crate::projector::{ApplyContext, Event, HandlerError, Projector};

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
/// relation [`BATCH_RELATION`](crate::projector::BATCH_RELATION) (`batch_handlers`).
///
/// Within one call of [`Projector::apply`], events with per-event handlers
/// split the batch into runs: each run of consecutive events with batch
/// handlers gets each batch statement once (in the order of
/// `batch_handlers`, over the run's events of its type), and the per-event
/// statements run in position order between runs.
#[derive(Clone, Debug)]
pub struct SqlProjector {
    config: ProjectorConfig,
    /// `batch_checks`, run before the batch handlers of a call.
    checks: PreparedChecks,
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
        let checks = PreparedChecks::new(&config.batch_checks, event_store);
        let batch_handlers = config
            .batch_handlers
            .iter()
            .map(|h| PreparedBatchHandler::new(h, event_store))
            .collect();
        Self {
            config,
            checks,
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
    /// `None` when the projector has batch handlers: a definition of only
    /// per-event SQL would make a `coord.publish` older than migration V5
    /// record events of batch types as applied without applying them.
    /// [`Projector::stored_definition`] carries both kinds.
    fn handler_sql(&self) -> Option<BTreeMap<String, String>> {
        if self.config.batch_handlers.is_empty() {
            Some(self.config.handlers.clone())
        } else {
            None
        }
    }
    /// `{"handlers": {...}, "batch_handlers": [{"event_type", "sql"}, ...]}`
    /// when there are batch handlers: each statement with its inline
    /// `batch_events` CTE over `$1..$7` as arrays, the checks first, then
    /// the handlers in file order, which `coord.publish` (migration V5)
    /// runs as [`Projector::apply`] does.
    fn stored_definition(&self) -> Option<serde_json::Value> {
        if self.batch_handlers.is_empty() {
            return crate::store::versions::definition_of(Some(&self.config.handlers));
        }
        // Checks first: coord.publish runs the list in order.
        let batch: Vec<serde_json::Value> = self
            .checks
            .stored()
            .chain(self.batch_handlers.iter().map(|h| h.stored()))
            .collect();
        Some(serde_json::json!({
            "handlers": self.config.handlers,
            "batch_handlers": batch,
        }))
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
        for (label, entries) in [
            ("batch_checks", &self.config.batch_checks),
            ("batch_handlers", &self.config.batch_handlers),
        ] {
            if !entries.is_empty() {
                let entries: Vec<String> = entries
                    .iter()
                    .map(|h| format!("{}\0{}", h.event_type, h.sql))
                    .collect();
                definition.push_str(&format!("\0{label}\0"));
                definition.push_str(&entries.join("\0"));
            }
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
            batch_sql::run(
                tx,
                self.checks.for_call(ctx),
                &self.batch_handlers,
                run,
                ctx.phase,
            )
            .await
            .map_err(batch_sql::handler_error)
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
