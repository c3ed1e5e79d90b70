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
# Default features are empty: every target (binaries, the bank example,
# the tests that run them) needs --all-features.
echo "== cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --all-targets --all-features --quiet -- -D warnings
echo "== the library without features: cargo check --lib --no-default-features"
cargo check --lib --no-default-features --quiet
cli_crates='^(anyhow|axum|clap|clap_complete|gethostname|indicatif|tracing-subscriber) '
for features in "" --no-default-features; do
  # shellcheck disable=SC2086 # an empty $features means the default features
  if cargo tree -e normal $features --prefix none | grep -E "$cli_crates"; then
    echo "the library (cargo tree -e normal $features) depends on the crates above: keep them behind cli or serve" >&2
    exit 1
  fi
done
echo "== cargo test"
cargo test --all-targets --all-features --quiet
cargo test --doc --all-features --quiet
