//! Integration tests: each test gets a fresh database on the server of
//! `DATABASE_URL` (default the local one), so they run in parallel.

mod activation;
mod cli;
mod cli_tools;
mod config;
mod connect;
mod gate;
mod migrate;
mod replay;
mod run;
mod serve;
mod support;
mod tls;
