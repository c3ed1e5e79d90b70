//! The event store's planner statistics are refreshed before a pass when
//! they are stale (`coord::refresh_statistics`).

use std::time::Duration;

use coord::names::RelationName;

use crate::support::{eventually, TestDb};

async fn insert_events(client: &tokio_postgres::Client, from: i64, count: i64) {
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acc-' || a, 1, 'AccountOpened', '{}' FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) a",
            &[&from, &count],
        )
        .await
        .unwrap();
}

async fn changed_since_analyze(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT n_mod_since_analyze FROM pg_stat_all_tables WHERE relid = 'coord.events'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Many events inserted since the last `ANALYZE` are analyzed (once); a
/// fresh table and a view are left alone.
#[tokio::test]
async fn stale_event_store_statistics_are_refreshed() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let events = RelationName::default();
    insert_events(&client, 1, 100).await;
    client.batch_execute("ANALYZE coord.events").await.unwrap();
    assert!(!coord::refresh_statistics(&client, &events).await.unwrap());

    insert_events(&client, 101, 20_000).await;
    // Statistics reach the shared counters within seconds.
    eventually(
        Duration::from_secs(60),
        "the stale statistics to be refreshed",
        || async { coord::refresh_statistics(&client, &events).await.unwrap() },
    )
    .await;
    assert_eq!(changed_since_analyze(&client).await, 0);
    assert!(!coord::refresh_statistics(&client, &events).await.unwrap());

    // A view over the events is not analyzed (and is no error).
    client
        .batch_execute("CREATE VIEW public.all_events AS SELECT * FROM coord.events")
        .await
        .unwrap();
    let view = RelationName::parse("public.all_events").unwrap();
    assert!(!coord::refresh_statistics(&client, &view).await.unwrap());
}
