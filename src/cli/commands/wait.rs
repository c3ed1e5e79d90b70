//! `coord wait`: block until this configuration's versions are active,
//! within `--timeout` all told: connecting (and retrying a refused
//! connection), reading and a server that stops answering all count against
//! it.

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use crate::context::Context;
use crate::output;

/// How often the versions are read again.
const POLL: Duration = Duration::from_millis(200);

/// What `coord wait` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Until {
    /// Every configured version is active.
    Active,
}

/// Arguments of `coord wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The condition.
    #[arg(long, value_enum, default_value_t = Until::Active)]
    pub until: Until,
    /// Give up after this many seconds (exit code 8), connecting included.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub timeout: f64,
}

pub async fn run(ctx: &Context, args: WaitArgs) -> anyhow::Result<()> {
    if !(args.timeout.is_finite() && (0.0..=1e9).contains(&args.timeout)) {
        return Err(coord::Error::InvalidInput(
            "--timeout must be a number of seconds >= 0".into(),
        )
        .into());
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let started = Instant::now();
    let config = ctx.config()?;
    let url = ctx.database_url(Some(&config))?;
    let Until::Active = args.until;
    let projectors = ctx.projectors(&config);
    // Connecting counts against the timeout: a refused connection is retried
    // until it passes (at least one attempt is made).
    let connect_for = timeout.max(Duration::from_millis(100));
    let mut client = coord::connect(&url, connect_for)
        .await
        .map_err(|e| match e {
            coord::Error::Db(_) => {
                anyhow::Error::from(e).context(format!("cannot connect to {url}"))
            }
            other => other.into(),
        })?;
    let left = timeout.saturating_sub(started.elapsed());
    let waited = tokio::time::timeout(left + Duration::from_millis(500), async {
        refuse_if_superseded(&mut client, &projectors).await?;
        coord::activation::wait_until_active(&client, &projectors, left, POLL).await?;
        anyhow::Ok(())
    })
    .await;
    match waited {
        Ok(result) => result?,
        Err(_) => {
            return Err(coord::Error::Timeout(format!(
                "timed out after {:.1} s waiting for this configuration's versions to be active: \
                 the database at {url} stopped answering",
                args.timeout
            ))
            .into())
        }
    }
    if ctx.json() {
        return output::json(&serde_json::json!({ "active": true }));
    }
    println!("every configured version is active");
    Ok(())
}

/// Fails at once, with the gate's error, when this configuration can never
/// become active: a newer version is already active, or a projector it does
/// not have. Waiting for it would only run into the timeout.
async fn refuse_if_superseded(
    client: &mut tokio_postgres::Client,
    projectors: &coord::ProjectorSet,
) -> anyhow::Result<()> {
    let publisher = coord::Publisher::new(projectors.clone());
    let tx = client.transaction().await?;
    // An unmigrated database fails here too; `wait_until_active` says so.
    let gate = publisher.check(&tx, None).await;
    tx.rollback().await?;
    match gate {
        Err(
            e @ (coord::Error::NewerProjectorIsActive { .. }
            | coord::Error::UnknownProjectorActive { .. }),
        ) => Err(e.into()),
        _ => Ok(()),
    }
}
