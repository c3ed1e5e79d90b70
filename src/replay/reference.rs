//! A reference projector written in Rust against the batch-aware API: bank
//! balances per account, folded in memory per batch and written with one
//! statement per kind of change. Used by `coord-bench` and the tests; it is
//! also a model for application projectors.

use std::collections::HashMap;

use async_trait::async_trait;
use futures_util::future::try_join;
use semver::Version;
use tokio_postgres::Transaction;

use crate::names::{sha256_hex, ProjectorName};
use crate::projector::{ApplyContext, Event, EventError, HandlerError, Projector};

// Every batch updates most rows: free space on each page keeps those
// updates HOT (no index entries, no page splits).
const TABLES: &str =
    "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0) WITH (fillfactor = 50);";

const INSERT: &str = "INSERT INTO balances (account, amount) \
    SELECT * FROM unnest($1::text[], $2::bigint[])";

const UPDATE: &str = "UPDATE balances AS b SET amount = b.amount + d.delta \
    FROM unnest($1::text[], $2::bigint[]) AS d(account, delta) WHERE b.account = d.account";

/// Balances per account from `AccountOpened`, `MoneyDeposited` and
/// `MoneyWithdrawn` (`data.amount`), in table `balances (account, amount)`:
/// the same result as the config-defined projector of DESIGN.md.
#[derive(Clone, Debug)]
pub struct BalancesProjector {
    name: ProjectorName,
    version: Version,
}

impl BalancesProjector {
    /// The projector `name@version`.
    pub fn new(name: ProjectorName, version: Version) -> Self {
        Self { name, version }
    }
}

#[derive(Default)]
struct Fold {
    opened: bool,
    delta: i64,
}

fn amount(event: &Event) -> Result<i64, HandlerError> {
    event
        .data
        .get("amount")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| {
            // Naming the event lets a replay park it without bisecting.
            EventError::new(
                event.position,
                format!(
                    "event at position {} ({}) has no integer data.amount",
                    event.position, event.event_type
                ),
            )
            .into()
        })
}

#[async_trait]
impl Projector for BalancesProjector {
    fn name(&self) -> &ProjectorName {
        &self.name
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn event_types(&self) -> Vec<String> {
        vec![
            "AccountOpened".into(),
            "MoneyDeposited".into(),
            "MoneyWithdrawn".into(),
        ]
    }
    fn tables(&self) -> &str {
        TABLES
    }
    fn fingerprint(&self) -> String {
        sha256_hex(&format!("rust BalancesProjector 1\0{TABLES}"))
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        _ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        let mut order: Vec<&str> = Vec::new();
        let mut folds: HashMap<&str, Fold> = HashMap::new();
        for event in events {
            let account = event.stream_id.as_str();
            let fold = folds.entry(account).or_insert_with(|| {
                order.push(account);
                Fold::default()
            });
            match event.event_type.as_str() {
                // Like the SQL handlers: changes before the account exists
                // touch no row.
                "AccountOpened" => {
                    *fold = Fold {
                        opened: true,
                        delta: 0,
                    }
                }
                "MoneyDeposited" => fold.delta += amount(event)?,
                "MoneyWithdrawn" => fold.delta -= amount(event)?,
                _ => {}
            }
        }
        let (mut new_accounts, mut new_amounts) = (Vec::new(), Vec::new());
        let (mut accounts, mut deltas) = (Vec::new(), Vec::new());
        for account in order {
            let fold = &folds[account];
            if fold.opened {
                new_accounts.push(account);
                new_amounts.push(fold.delta);
            } else if fold.delta != 0 {
                accounts.push(account);
                deltas.push(fold.delta);
            }
        }
        // Pipelined; the two touch disjoint accounts.
        try_join(
            async {
                if new_accounts.is_empty() {
                    Ok(0)
                } else {
                    tx.execute(INSERT, &[&new_accounts, &new_amounts]).await
                }
            },
            async {
                if accounts.is_empty() {
                    Ok(0)
                } else {
                    tx.execute(UPDATE, &[&accounts, &deltas]).await
                }
            },
        )
        .await?;
        Ok(())
    }
}
