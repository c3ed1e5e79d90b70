#!/usr/bin/env bash
# A short demo of coord against a throwaway database on the local PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres

db="coord_demo_$$"
admin="postgres://postgres@127.0.0.1:5432/postgres"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
cleanup() { psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== building coord"
cargo build --release --quiet --bin coord
coord=target/release/coord
psql "$admin" -qc "CREATE DATABASE $db"

echo "== coord migrate"
$coord migrate
echo "== coord status"
$coord status
