use crate::support::TestDb;

#[tokio::test]
async fn migrate_twice_leaves_exactly_the_contract_tables() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let first = coord::migrate(&mut client).await.unwrap();
    assert_eq!(
        first.applied,
        vec![
            "V1__coord_schema",
            "V2__publisher_gate",
            "V3__pruned_status",
            "V4__exact_inline_checkpoints",
            "V5__sql_publish_batch_handlers",
            "V8__gate_refuses_during_critical_section",
            "V9__event_errors"
        ]
    );
    let second = coord::migrate(&mut client).await.unwrap();
    assert!(second.applied.is_empty());

    let tables: Vec<String> = client
        .query(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "coord.applied_ahead",
            "coord.events",
            "coord.parked_events",
            "coord.projector_states",
            "coord.projector_versions",
            "coord.schema_history",
            "coord.transitions",
        ]
    );
    let columns: Vec<String> = client
        .query(
            "SELECT column_name FROM information_schema.columns \
             WHERE table_schema = 'coord' AND table_name = 'projector_states' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        [
            "name",
            "active_version",
            "activating_version",
            "replaying_version",
            "updated_at"
        ]
    );
}

#[tokio::test]
async fn concurrent_migrations_both_succeed() {
    let db = TestDb::new().await;
    let (mut a, mut b) = (db.client().await, db.client().await);
    let (ra, rb) = tokio::join!(coord::migrate(&mut a), coord::migrate(&mut b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let known = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("sql".as_ref()))
        .count();
    assert_eq!(
        ra.applied.len() + rb.applied.len(),
        known,
        "each migration applied exactly once: {ra:?} {rb:?}"
    );
}

#[tokio::test]
async fn plain_inserts_work_and_duplicate_stream_versions_are_refused() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let insert = "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
                  VALUES ('account-1', 1, 'AccountOpened', '{}') RETURNING position, xact_id::text, metadata::text";
    let row = client.query_one(insert, &[]).await.unwrap();
    assert!(row.get::<_, i64>(0) >= 1);
    assert!(row.get::<_, String>(1).parse::<u64>().unwrap() > 0);
    assert_eq!(row.get::<_, String>(2), "{}");
    let err = client.query_one(insert, &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505", "{err}");
}

#[tokio::test]
async fn status_requires_the_schema() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let err = coord::status(&client, &coord::RelationName::default())
        .await
        .unwrap_err();
    assert!(matches!(err, coord::Error::NotMigrated), "{err}");
}
