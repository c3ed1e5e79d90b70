//! "Nothing changed" means the same contents: a digest of every schema,
//! relation (with its kind), function, and the rows of every table outside
//! the system schemas. Counts would miss an UPDATE; this does not.

use crate::support::{assert_exit, stderr, TestDb};

const OBJECTS: &str = "
SELECT 'schema ' || nspname FROM pg_namespace
    WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
UNION ALL
SELECT format('relation %s.%s %s', n.nspname, c.relname, c.relkind)
    || CASE WHEN c.relkind IN ('v', 'm') THEN ' ' || md5(pg_get_viewdef(c.oid)) ELSE '' END
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
UNION ALL
SELECT format('function %s.%s', n.nspname, p.oid::regprocedure)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
ORDER BY 1";

const TABLES: &str = "
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%'
      AND n.nspname <> 'information_schema'
    ORDER BY 1";

/// The digest of `db`'s contents: equal before and after an operation
/// means the operation changed nothing (sequences aside: they are not
/// transactional).
pub async fn digest(db: &TestDb) -> String {
    let client = db.client().await;
    let mut out: Vec<String> = client
        .query(OBJECTS, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let tables: Vec<String> = client
        .query(TABLES, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in tables {
        let hash: String = client
            .query_one(
                &format!(
                    "SELECT count(*) || ' ' || md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) \
                     FROM {table} t"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        out.push(format!("rows {table} {hash}"));
    }
    out.join("\n")
}

/// Runs `coord args`, expecting exit 2 with `needle` on stderr and the
/// database's contents unchanged.
pub async fn refused_and_unchanged(db: &TestDb, args: &[&str], needle: &str) {
    let before = digest(db).await;
    let out = db.coord(args);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    assert_eq!(before, digest(db).await, "{args:?} changed the database");
}
