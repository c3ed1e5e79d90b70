//! The bank's balance projector, written in Rust, in two versions.
//!
//! v1 keeps a balance per account. v2 also counts deposits and withdrawals.
//! Both fold a whole batch in memory and write it with one statement, which
//! is what makes a replay fast.

use std::collections::HashMap;

use async_trait::async_trait;
use coord::{ApplyContext, Event, HandlerError, Projector, ProjectorName};
use semver::Version;
use tokio_postgres::Transaction;

/// `balances@1.0.0` or `balances@2.0.0`.
pub struct Balances {
    name: ProjectorName,
    version: Version,
}

impl Balances {
    pub fn new(app_version: u8) -> Self {
        Self {
            name: ProjectorName::new("balances").expect("valid name"),
            version: Version::new(u64::from(app_version), 0, 0),
        }
    }

    fn v2(&self) -> bool {
        self.version.major >= 2
    }
}

#[derive(Default)]
struct Delta {
    amount: i64,
    deposits: i64,
    withdrawals: i64,
}

const UPSERT_V1: &str = "INSERT INTO balances (account, amount) \
    SELECT * FROM unnest($1::text[], $2::int8[]) \
    ON CONFLICT (account) DO UPDATE SET amount = balances.amount + EXCLUDED.amount";

const UPSERT_V2: &str = "INSERT INTO balances (account, amount, deposits, withdrawals) \
    SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
    ON CONFLICT (account) DO UPDATE SET amount = balances.amount + EXCLUDED.amount, \
    deposits = balances.deposits + EXCLUDED.deposits, withdrawals = balances.withdrawals + EXCLUDED.withdrawals";

#[async_trait]
impl Projector for Balances {
    fn name(&self) -> &ProjectorName {
        &self.name
    }

    fn version(&self) -> &Version {
        &self.version
    }

    fn event_types(&self) -> Vec<String> {
        ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn"]
            .map(String::from)
            .to_vec()
    }

    fn tables(&self) -> &str {
        if self.v2() {
            "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0, \
             deposits bigint NOT NULL DEFAULT 0, withdrawals bigint NOT NULL DEFAULT 0);"
        } else {
            "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);"
        }
    }

    fn verify(&self) -> Vec<String> {
        if self.v2() {
            vec!["SELECT count(*) = 0 FROM balances WHERE deposits < 0 OR withdrawals < 0".into()]
        } else {
            Vec::new()
        }
    }

    fn fingerprint(&self) -> String {
        // Bump the revision whenever the handler code below changes meaning.
        format!("bank-balances-rev1-v{}", self.version.major)
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        _ctx: &ApplyContext,
    ) -> Result<(), HandlerError> {
        let mut folded: HashMap<&str, Delta> = HashMap::new();
        for event in events {
            let amount = event
                .data
                .get("amount")
                .and_then(|a| a.as_i64())
                .unwrap_or(0);
            let delta = folded.entry(event.stream_id.as_str()).or_default();
            match event.event_type.as_str() {
                "MoneyDeposited" => {
                    delta.amount += amount;
                    delta.deposits += 1;
                }
                "MoneyWithdrawn" => {
                    delta.amount -= amount;
                    delta.withdrawals += 1;
                }
                _ => {}
            }
        }
        let accounts: Vec<&str> = folded.keys().copied().collect();
        let amounts: Vec<i64> = accounts.iter().map(|a| folded[a].amount).collect();
        if self.v2() {
            let deposits: Vec<i64> = accounts.iter().map(|a| folded[a].deposits).collect();
            let withdrawals: Vec<i64> = accounts.iter().map(|a| folded[a].withdrawals).collect();
            tx.execute(UPSERT_V2, &[&accounts, &amounts, &deposits, &withdrawals])
                .await?;
        } else {
            tx.execute(UPSERT_V1, &[&accounts, &amounts]).await?;
        }
        Ok(())
    }
}
