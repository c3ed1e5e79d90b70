//! A projector whose error names every failing event of a call
//! ([`EventErrors`], decision 0070): under `park` they are all parked and
//! the rest of the batch is applied in one more call; under `fail` the pass
//! stops just before the first of them, with that event's own message.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use coord::records::parked_events;
use coord::replay::{run_pass, start_replay, CancellationToken, ReplayOptions};
use coord::{Actor, OnError, ProjectorName, RelationName};
use semver::Version;

use crate::batch_handlers::replay_with;
use crate::parking::Counting;
use crate::reference::BalancesProjector;
use crate::support::TestDb;

/// 2,000 bank events over 20 accounts; every 101st after the openings has
/// no amount. Returns the positions of those, in order.
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
            "SELECT position FROM coord.events WHERE NOT data ? 'amount' ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn projector(name: &str, on_error: OnError) -> BalancesProjector {
    BalancesProjector::new(ProjectorName::new(name).unwrap(), Version::new(1, 0, 0))
        .with_on_error(on_error)
        .naming_every_failure()
}

#[tokio::test]
async fn every_named_event_is_parked_and_the_rest_applied_in_one_more_call() {
    let db = TestDb::migrated().await;
    let bad = store_with_bad_events(&db).await;
    assert_eq!(bad.len(), 20);
    let counting = Counting::new(
        Arc::new(projector("all_named", OnError::Park)),
        OnError::Park,
    );
    let options = ReplayOptions {
        batch_size: 500,
        ..ReplayOptions::default()
    };
    let report = replay_with(&db, &counting, options).await;
    assert_eq!((report.applied, report.parked), (1_980, 20));
    // 4 batches, each failing once (naming all its bad events) and then
    // applied whole: not one more call per bad event.
    assert_eq!(counting.calls.load(Ordering::SeqCst), 4 + 4);
    let client = db.client().await;
    let parked = parked_events(&client, "all_named", "1.0.0").await.unwrap();
    assert_eq!(parked.iter().map(|p| p.position).collect::<Vec<_>>(), bad);
    for p in &parked {
        // Each with its own message, not the combined one.
        assert_eq!(
            p.error,
            format!(
                "event at position {} ({}) has no integer data.amount",
                p.position, p.event_type
            )
        );
    }
    let wrong: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT stream_id AS account, sum(CASE event_type \
               WHEN 'MoneyDeposited' THEN (data->>'amount')::bigint \
               WHEN 'MoneyWithdrawn' THEN -(data->>'amount')::bigint ELSE 0 END)::bigint AS amount \
             FROM coord.events WHERE event_type = 'AccountOpened' OR data ? 'amount' GROUP BY stream_id) e \
             FULL JOIN all_named_v1_0_0.balances r USING (account) WHERE e.amount IS DISTINCT FROM r.amount",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "balances differ: an event applied twice or lost");
}

#[tokio::test]
async fn under_fail_the_pass_stops_before_the_first_named_event_with_its_message() {
    let db = TestDb::migrated().await;
    let bad = store_with_bad_events(&db).await;
    let projector = projector("first_named", OnError::Fail);
    let mut client = db.client().await;
    start_replay(&mut client, &projector, &Actor::new("test-host", "test"))
        .await
        .unwrap();
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let options = ReplayOptions {
        batch_size: 500,
        retries: 0,
        ..ReplayOptions::default()
    };
    let err = run_pass(
        &pool,
        &projector,
        &RelationName::default(),
        &options,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let coord::Error::Handler {
        position, message, ..
    } = &err
    else {
        panic!("not a handler error: {err:?}");
    };
    assert_eq!(*position, bad[0]);
    assert!(
        message.starts_with(&format!("event at position {} ", bad[0])) && !message.contains("more"),
        "{message}"
    );
    let cursor: Option<i64> = client
        .query_one(
            "SELECT pass_cursor FROM coord.projector_versions WHERE name = 'first_named'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor, Some(bad[0] - 1));
}
