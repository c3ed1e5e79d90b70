//! `coord serve`: `/ready`, `/status` and `/metrics` over HTTP until Ctrl-C
//! (or SIGTERM).

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Args;

use crate::context::Context;

/// Connections the server may hold: a probe and a scrape at once, with room.
const POOL_SIZE: usize = 4;

/// Arguments of `coord serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

pub async fn run(ctx: &Context, args: ServeArgs) -> anyhow::Result<()> {
    let config = ctx.config()?;
    let url = ctx.database_url(Some(&config))?;
    let pool = coord::pool(&url, POOL_SIZE)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let router = coord::serve::router(pool, ctx.projectors(&config), config.event_store.clone());
    println!("listening on http://{addr}");
    tracing::info!(%addr, "serving /ready, /status, /metrics");
    coord::serve::serve(listener, router, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on Ctrl-C, or on SIGTERM where there is one (what orchestrators
/// send to stop a process).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
