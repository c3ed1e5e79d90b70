//! Integration tests: each test gets a fresh database on the server of
//! `DATABASE_URL` (default the local one), so they run in parallel.

mod activation;
mod batch_bytes;
mod batch_handlers;
mod bulk;
mod cli;
mod config;
mod gate;
mod migrate;
mod parking;
#[path = "../../src/bin/coord-bench/reference.rs"]
mod reference;
mod replay;
mod run;
mod serve;
mod support;
