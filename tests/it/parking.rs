//! Parking without a slow path: a failing event costs a search of its own
//! batch (direct when the error names the event, a bisection otherwise),
//! and every other batch is still applied in one call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use coord::projector::{ApplyContext, Event, HandlerError};
use coord::replay::ReplayOptions;

use crate::reference::BalancesProjector;
use coord::records::parked_events;
use coord::{Config, OnError, Projector, ProjectorName, SqlProjector};
use semver::Version;
use tokio_postgres::Transaction;

use crate::batch_handlers::replay_with;
use crate::support::TestDb;

/// Delegates to `inner` with the policy `on_error` (park unless set), and
/// counts the calls of `apply` and the events they were given.
pub(crate) struct Counting {
    pub(crate) inner: Arc<dyn Projector>,
    pub(crate) calls: AtomicUsize,
    pub(crate) events: AtomicUsize,
    pub(crate) on_error: OnError,
}

impl Counting {
    pub(crate) fn new(inner: Arc<dyn Projector>, on_error: OnError) -> Self {
        Self {
            inner,
            calls: AtomicUsize::new(0),
            events: AtomicUsize::new(0),
            on_error,
        }
    }
}

#[async_trait]
impl Projector for Counting {
    fn name(&self) -> &ProjectorName {
        self.inner.name()
    }
    fn version(&self) -> &Version {
        self.inner.version()
    }
    fn event_types(&self) -> Vec<String> {
        self.inner.event_types()
    }
    fn tables(&self) -> &str {
        self.inner.tables()
    }
    fn on_error(&self) -> OnError {
        self.on_error
    }
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.events.fetch_add(events.len(), Ordering::SeqCst);
        self.inner.apply(tx, events, ctx).await
    }
}

/// 2,000 bank events over 20 accounts; every 101st after the openings
/// (`i % 101 == 50`) has no amount. Returns the positions of those.
async fn store_with_bad_events(db: &TestDb) -> Vec<i64> {
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || (i % 20), i / 20 + 1, \
               CASE WHEN i < 20 THEN 'AccountOpened' WHEN i % 3 = 0 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
               CASE WHEN i >= 20 AND i % 101 = 50 THEN '{\"note\": \"no amount\"}'::jsonb \
                    ELSE jsonb_build_object('amount', i % 97 + 1) END \
             FROM generate_series(0, 1999) AS i ORDER BY i",
        )
        .await
        .unwrap();
    client
        .query(
            "SELECT position FROM coord.events WHERE NOT data ? 'amount' AND event_type <> 'AccountOpened' \
             ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn replay(db: &TestDb, projector: &Counting, batch_size: usize) -> (u64, u64) {
    let options = ReplayOptions {
        batch_size,
        ..ReplayOptions::default()
    };
    let report = replay_with(db, projector, options).await;
    (report.applied, report.parked)
}

async fn parked_positions(db: &TestDb, name: &str) -> Vec<i64> {
    parked_events(&db.client().await, name, "1.0.0")
        .await
        .unwrap()
        .iter()
        .map(|p| p.position)
        .collect()
}

/// Accounts whose balance differs from a from-scratch computation over the
/// events that have an amount.
async fn mismatches(db: &TestDb, schema: &str) -> i64 {
    db.client()
        .await
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT stream_id AS account, sum(CASE event_type \
                   WHEN 'MoneyDeposited' THEN (data->>'amount')::bigint \
                   WHEN 'MoneyWithdrawn' THEN -(data->>'amount')::bigint ELSE 0 END)::bigint AS amount \
                 FROM coord.events WHERE event_type = 'AccountOpened' OR data ? 'amount' GROUP BY stream_id) e \
                 FULL JOIN {schema}.balances r USING (account) WHERE e.amount IS DISTINCT FROM r.amount"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn events_named_by_their_error_are_parked_with_one_call_per_failure() {
    let db = TestDb::migrated().await;
    let bad = store_with_bad_events(&db).await;
    assert_eq!(bad.len(), 20);
    let projector = Counting::new(
        Arc::new(BalancesProjector::new(
            ProjectorName::new("named").unwrap(),
            Version::new(1, 0, 0),
        )),
        OnError::Park,
    );
    let (applied, parked_count) = replay(&db, &projector, 500).await;
    assert_eq!((applied, parked_count), (1_980, 20));
    assert_eq!(parked_positions(&db, "named").await, bad);
    assert_eq!(mismatches(&db, "named_v1_0_0").await, 0);
    // 4 batches, each failing once per bad event it holds, then applied whole.
    assert_eq!(projector.calls.load(Ordering::SeqCst), 4 + 20);
}

#[tokio::test]
async fn an_unnamed_failure_is_bisected_within_its_batch_only() {
    let db = TestDb::migrated().await;
    let bad = store_with_bad_events(&db).await;
    let config = Config::parse(
        r#"
[[projector]]
name = "bisected"
version = "1.0.0"
tables = "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);"
[projector.batch_handlers]
AccountOpened = "INSERT INTO balances (account) SELECT stream_id FROM batch_events"
MoneyDeposited = """UPDATE balances b SET amount = b.amount + d.s FROM (SELECT stream_id,
  sum(coalesce(data->>'amount', 'missing')::bigint) AS s FROM batch_events GROUP BY stream_id) d
  WHERE b.account = d.stream_id"""
MoneyWithdrawn = """UPDATE balances b SET amount = b.amount - d.s FROM (SELECT stream_id,
  sum(coalesce(data->>'amount', 'missing')::bigint) AS s FROM batch_events GROUP BY stream_id) d
  WHERE b.account = d.stream_id"""
"#,
        "test",
    )
    .unwrap();
    let projector = Counting::new(
        Arc::new(SqlProjector::new(config.projectors[0].clone())),
        OnError::Park,
    );
    // Batches of 250 hold 2 or 3 bad events each.
    let (applied, parked_count) = replay(&db, &projector, 250).await;
    assert_eq!((applied, parked_count), (1_980, 20));
    assert_eq!(mismatches(&db, "bisected_v1_0_0").await, 0);
    let calls = projector.calls.load(Ordering::SeqCst);
    // 8 batches; each bad event costs at most 2 calls per halving of 250
    // (8 levels). Event by event would be at least 250 calls per batch.
    assert!(calls <= 8 + 20 * 2 * 8, "{calls} calls");
    assert!(calls < 500, "{calls} calls");
    assert_eq!(parked_positions(&db, "bisected").await, bad);
}
