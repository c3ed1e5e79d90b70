//! Progress bars on stderr (one per projector version) when stderr is a
//! terminal and the output is text; hidden otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use coord::replay::{Progress, ProgressFn};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bars {
    multi: MultiProgress,
    bars: Arc<Mutex<HashMap<String, ProgressBar>>>,
}

impl Bars {
    pub fn new(text_output: bool) -> Self {
        let target = if text_output && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            bars: Arc::default(),
        }
    }

    pub fn callback(&self) -> ProgressFn {
        let multi = self.multi.clone();
        let bars = Arc::clone(&self.bars);
        Arc::new(move |p: &Progress| {
            let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
            let bar = bars.entry(p.projector.clone()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(p.total.unwrap_or(0)));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>24} [{bar:30}] {pos}/{len} events {msg} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(p.projector.clone());
                bar
            });
            if let Some(total) = p.total {
                bar.set_length(total);
            }
            bar.set_position(p.done);
            bar.set_message(format!("{:.0}/s", p.rate_per_s));
        })
    }

    pub fn finish(&self) {
        let bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        for bar in bars.values() {
            bar.finish_and_clear();
        }
    }
}

/// A progress callback for commands that do not keep the bars around
/// (activation, rollback, rebuild): bars on a terminal, nothing otherwise.
pub fn callback(ctx: &crate::context::Context) -> Option<ProgressFn> {
    Some(Bars::new(!ctx.json()).callback())
}

/// A token cancelled by the first Ctrl-C: long work stops at a batch boundary.
pub fn cancel_on_ctrl_c() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
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
