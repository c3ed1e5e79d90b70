#!/usr/bin/env bash
# Builds and passes every check and test: formatting, clippy, the library
# without the command line's and HTTP server's dependencies, unit,
# integration (against PostgreSQL) and doc tests (README examples included).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== the library without features: cargo check --lib --no-default-features"
cargo check --lib --no-default-features --quiet
cli_crates='^(anyhow|axum|clap|clap_complete|gethostname|indicatif|tracing-subscriber) '
if cargo tree -e normal --no-default-features --prefix none | grep -E "$cli_crates"; then
  echo "the library without features depends on the crates above: keep them behind cli or serve" >&2
  exit 1
fi
echo "== cargo test"
cargo test --all-targets --quiet
cargo test --doc --quiet
