//! `--batch-bytes` on the commands that take `--batch-size`: the library's
//! default, refused at 0 with nothing written, and honoured (a budget of one
//! byte makes every event its own batch, so its own transaction).

use tokio_postgres::Client;

use crate::support::{assert_exit, run_coord, stderr, stdout, TestDb};

const TOML: &str = r#"
[[projector]]
name = "seen"
version = "1.0.0"
tables = "CREATE TABLE seen (position bigint PRIMARY KEY, tx bigint NOT NULL);"

[projector.handlers]
Noted = "INSERT INTO seen VALUES ($3, txid_current())"
"#;

async fn append(client: &Client, n: i64) {
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 's-' || i, 1, 'Noted', '{}' FROM generate_series(1, $1::bigint) i \
             WHERE NOT EXISTS (SELECT 1 FROM coord.events e WHERE e.stream_id = 's-' || i)",
            &[&n],
        )
        .await
        .unwrap();
}

/// (events applied, transactions they were applied in).
async fn applied(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT tx) FROM seen_v1_0_0.seen",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn batch_bytes_defaults_to_the_librarys_budget() {
    let dir = tempfile::tempdir().unwrap();
    let default = format!("[default: {}]", coord::replay::DEFAULT_BATCH_BYTES);
    for command in ["activate-current-config", "replay", "catch-up", "rollback"] {
        let out = run_coord(dir.path(), &[], &[command, "--help"]);
        assert_exit(&out, 0);
        let help = stdout(&out);
        let line = help
            .lines()
            .skip_while(|l| !l.contains("--batch-bytes"))
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(line.contains(&default), "{command}: {line}");
    }
}

#[tokio::test]
async fn batch_bytes_bounds_the_batches_of_replay_catch_up_and_activation() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    db.write_config("coord.toml", TOML);
    append(&client, 30).await;

    for command in ["replay", "catch-up", "activate-current-config"] {
        let out = db.coord(&[command, "--batch-bytes", "0"]);
        assert_exit(&out, 2);
        assert!(stderr(&out).contains("--batch-bytes"), "{}", stderr(&out));
    }
    let versions: i64 = client
        .query_one("SELECT count(*) FROM coord.projector_versions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 0, "a refused flag writes nothing");

    assert_exit(&db.coord(&["replay", "--batch-bytes", "1"]), 0);
    assert_eq!(applied(&client).await, (30, 30));

    append(&client, 40).await;
    assert_exit(&db.coord(&["catch-up", "--batch-bytes", "1"]), 0);
    assert_eq!(applied(&client).await, (40, 40));

    append(&client, 50).await;
    assert_exit(
        &db.coord(&["activate-current-config", "--batch-bytes", "1"]),
        0,
    );
    assert_eq!(applied(&client).await, (50, 50));

    // The default budget takes them all in one batch.
    append(&client, 60).await;
    assert_exit(&db.coord(&["catch-up"]), 0);
    assert_eq!(applied(&client).await, (60, 51));
}
