//! Batches close on a byte budget as well as on a count.

use coord::replay::{run_pass, start_replay, CancellationToken, ReplayOptions};

use crate::reference::BalancesProjector;
use coord::Actor;
use coord::{ProjectorName, RelationName};
use semver::Version;

use crate::support::TestDb;

async fn replay_with(db: &TestDb, name: &str, batch_bytes: usize) -> (u64, u64) {
    let projector =
        BalancesProjector::new(ProjectorName::new(name).unwrap(), Version::new(1, 0, 0));
    let mut client = db.client().await;
    start_replay(&mut client, &projector, &Actor::new("test-host", "test"))
        .await
        .unwrap();
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let options = ReplayOptions {
        batch_size: 1_000,
        batch_bytes,
        ..ReplayOptions::default()
    };
    let report = run_pass(
        &pool,
        &projector,
        &RelationName::default(),
        &options,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let wrong: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT stream_id AS account, sum(CASE WHEN event_type = 'MoneyDeposited' \
                 THEN (data->>'amount')::bigint ELSE 0 END)::bigint AS amount FROM coord.events GROUP BY 1) e \
                 FULL JOIN {name}_v1_0_0.balances r USING (account) WHERE e.amount IS DISTINCT FROM r.amount"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        wrong, 0,
        "{name}: balances differ from a from-scratch computation"
    );
    (report.applied, report.batches)
}

#[tokio::test]
async fn batches_close_on_the_byte_budget_and_hold_at_least_one_event() {
    let db = TestDb::migrated().await;
    // 300 events of about 600 bytes each (500 of payload).
    db.client()
        .await
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || (i % 10), i / 10 + 1, \
               CASE WHEN i < 10 THEN 'AccountOpened' ELSE 'MoneyDeposited' END, \
               jsonb_build_object('amount', i, 'note', repeat('x', 500)) \
             FROM generate_series(0, 299) AS i ORDER BY i",
        )
        .await
        .unwrap();
    // By count only (the default budget is far above 300 such events).
    assert_eq!(
        replay_with(&db, "by_count", coord::replay::DEFAULT_BATCH_BYTES).await,
        (300, 1)
    );
    // 6,000 bytes hold at most 10 of them.
    let (applied, batches) = replay_with(&db, "by_bytes", 6_000).await;
    assert_eq!(applied, 300);
    assert!(batches >= 30, "{batches} batches");
    // A budget below one event still moves one event per batch.
    assert_eq!(replay_with(&db, "one_each", 1).await, (300, 300));
}
