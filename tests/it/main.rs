//! Integration tests: each test gets a fresh database on the server of
//! `DATABASE_URL` (default the local one), so they run in parallel.

mod activation;
mod activation_faults;
mod bad_input;
mod batch_bytes;
mod batch_checks;
mod batch_handlers;
mod bulk;
mod cli;
mod cli_batch_bytes;
mod cli_tools;
mod config;
mod connect;
mod connection_loss;
mod contents;
mod event_stats;
mod faults;
mod faults_suite;
mod gate;
mod handler_errors;
mod interrupted;
mod migrate;
mod park_named;
mod park_slices;
mod parking;
mod privileges;
mod properties;
mod publish_paths;
#[path = "../../src/bin/coord-bench/reference.rs"]
mod reference;
mod replay;
mod replay_metadata;
mod run;
mod schema_drop;
mod serve;
mod sql_publish_batch;
mod support;
mod tls;
mod wait_superseded;
