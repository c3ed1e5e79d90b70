//! A throwaway database per benchmark run, dropped at the end.

use anyhow::Context as _;
use coord::DatabaseUrl;
use tokio_postgres::Client;

/// The arguments every benchmark of issue 11 shares.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Server to create the benchmark database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::OutputFormat::Text)]
    pub output: crate::OutputFormat,
}

/// A database created for one run.
pub struct BenchDb {
    admin: Client,
    pub name: String,
    pub url: DatabaseUrl,
}

impl BenchDb {
    /// Creates `coord_bench_{label}_{pid}` on the server of `server_url` and
    /// migrates it.
    pub async fn create(server_url: &str, label: &str) -> anyhow::Result<Self> {
        let server = DatabaseUrl::parse(server_url).map_err(anyhow::Error::msg)?;
        let admin = coord::connect(&server, std::time::Duration::from_secs(10)).await?;
        let name = format!("coord_bench_{label}_{}", std::process::id());
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url =
            DatabaseUrl::parse(&with_database(server_url, &name)).map_err(anyhow::Error::msg)?;
        let db = Self { admin, name, url };
        let mut client = db.client().await?;
        coord::migrate(&mut client).await.context("migrate")?;
        Ok(db)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(coord::connect(&self.url, std::time::Duration::from_secs(10)).await?)
    }

    /// Drops the database.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let base = match head[scheme_end..].find('/') {
        Some(slash) => &head[..scheme_end + slash],
        None => head,
    };
    format!("{base}/{db}{query}")
}

/// The process's peak resident set size so far (`VmHWM`), in MB; 0 where
/// `/proc` is not available.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets the peak resident set size (Linux `clear_refs` 5), so that
/// [`peak_rss_mb`] measures from here; does nothing where unsupported.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The median of `values` (the mean of the middle two for an even count);
/// `None` when there are none.
pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}
