//! `TestDb::snapshot` compares contents, not counts: one UPDATE of one row,
//! in a coord table or in a projection table, makes it differ, so "the
//! database is unchanged" checks cannot pass over a changed state.

#[tokio::test]
async fn an_update_of_one_row_changes_the_snapshot() {
    use crate::support::{assert_exit, balances_toml, TestDb};

    let db = TestDb::migrated().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    for (event_type, data) in [
        ("AccountOpened", "{}"),
        ("MoneyDeposited", "{\"amount\": 5}"),
    ] {
        let out = db.coord(&[
            "publish", "--stream", "a", "--type", event_type, "--data", data,
        ]);
        assert_exit(&out, 0);
    }
    let client = db.client().await;
    let before = db.snapshot().await;
    assert_eq!(before, db.snapshot().await, "the snapshot is not stable");
    // Each changes one value of one row and leaves every count as it was.
    for (change, undo) in [
        (
            "UPDATE coord.projector_versions SET events_processed = events_processed + 1",
            "UPDATE coord.projector_versions SET events_processed = events_processed - 1",
        ),
        (
            "UPDATE coord.projector_states SET updated_at = updated_at + interval '1 s'",
            "UPDATE coord.projector_states SET updated_at = updated_at - interval '1 s'",
        ),
        (
            "UPDATE balances_v1_0_0.balances SET amount = amount + 1 WHERE account = 'a'",
            "UPDATE balances_v1_0_0.balances SET amount = amount - 1 WHERE account = 'a'",
        ),
    ] {
        client.batch_execute(change).await.unwrap();
        assert_ne!(before, db.snapshot().await, "{change} went unseen");
        client.batch_execute(undo).await.unwrap();
        assert_eq!(before, db.snapshot().await, "{undo} did not restore it");
    }
}
