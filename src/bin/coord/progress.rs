//! Progress display for long work: an indicatif bar with rate and ETA when
//! stderr is a terminal, nothing otherwise (tracing logs the batches), and
//! Ctrl-C turned into a cancellation that stops at a batch boundary.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use coord::replay::{Progress, ProgressFn};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// A progress callback drawing one bar per projector version, or `None`
/// when stderr is not a terminal or the output is JSON.
pub fn callback(ctx: &Context) -> Option<ProgressFn> {
    if ctx.json() || !std::io::stderr().is_terminal() {
        return None;
    }
    let multi = MultiProgress::new();
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let style = ProgressStyle::with_template(
        "{prefix:>24} [{bar:30}] {pos}/{len} events  {per_sec}  ETA {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    Some(Arc::new(move |p: &Progress| {
        let mut bars = bars.lock().expect("not poisoned");
        let bar = bars.entry(p.projector.clone()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(p.total.unwrap_or(0)));
            bar.set_style(style.clone());
            bar.set_prefix(p.projector.clone());
            bar
        });
        if let Some(total) = p.total {
            bar.set_length(total.max(p.done));
        }
        bar.set_position(p.done);
    }))
}

/// A token cancelled by the first Ctrl-C.
pub fn cancel_on_ctrl_c() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "coord: interrupted; stopping at the next batch boundary (the checkpoint is saved)"
            );
            child.cancel();
        }
    });
    token
}
