#!/usr/bin/env bash
# A complete rolling upgrade against a local PostgreSQL: v1 of the bank serves
# and publishes; v2 instances start and wait for readiness (`coord wait`); v2
# is built beside v1 from the event store and activated with the bank's own
# binary (`bank coord activate-current-config`, the embedded coord CLI); v1's
# publishers are then refused with NewerProjectorIsActive while v2's publish.
# Nothing races a fixed time: every step waits for the state it needs. Ends
# with a summary table; exits non-zero when a row says FAIL. Everything it
# starts is stopped and its database dropped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres

EVENTS="${DEMO_EVENTS:-300000}"
V2_PUBLISH_SECONDS="${DEMO_V2_PUBLISH_SECONDS:-5}"
db="coord_demo_$$"
admin="${DEMO_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export DATABASE_URL="${admin%/*}/$db"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Bold titles on a terminal only: no escape codes in logs and pipes.
if [ -t 1 ]; then bold=$'\033[1m'; plain=$'\033[0m'; else bold=""; plain=""; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }

# The `demo` profile (Cargo.toml): optimised code, built in the shortest cold
# build time (docs/decisions/0021-demo-build-profile.md).
step "building coord and the bank example (cargo build --profile demo)"
cargo build --profile demo --bin coord --example bank
coord=target/demo/coord
bank=target/demo/examples/bank
psql "$admin" -qc "CREATE DATABASE $db"

step "coord migrate"
$coord migrate

step "the bank's history: $EVENTS events imported into coord.events"
$bank --app-version 1 load --events "$EVENTS" --accounts 10000

step "v1 goes live: bank --app-version 1 coord activate-current-config (bootstrap replay)"
$bank --app-version 1 coord activate-current-config

step "v1 instances publish (until refused); v2 instances start and wait for readiness (coord wait)"
$bank --app-version 1 publish --publishers 4 --seconds 900 --out "$work/v1.json" &
v1_pid=$!
pids+=("$v1_pid")
(
  started=$(date +%s.%N)
  $bank --app-version 2 coord wait --until active --timeout 900 >"$work/wait.txt"
  echo "$started $(date +%s.%N)" >"$work/wait.times"
  # Ready: this instance joins the load balancer and publishes for a while.
  $bank --app-version 2 publish --publishers 2 --seconds "$V2_PUBLISH_SECONDS" --out "$work/v2.json"
) &
v2_pid=$!
pids+=("$v2_pid")
$bank --app-version 1 coord status

step "deploying v2: bank --app-version 2 coord activate-current-config (replay balances@2.0.0 beside v1, verify, activate)"
$bank --app-version 2 coord activate-current-config --output json >"$work/activate.json"
python3 - "$work/activate.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for s in report["steps"]:
    sw = s.get("switch") or {}
    print(f"  {s['projector']}: {s['action']} {sw.get('from') or '-'} -> {sw.get('to') or '-'}, "
          f"replayed {s['replayed_events']} events in {s['replay_seconds']:.1f} s, "
          f"publishers held back {sw.get('held_back_ms', 0):.1f} ms")
PY

step "v1 is refused: bank --app-version 1 coord check"
set +e
$bank --app-version 1 coord check --output json >"$work/check.json" 2>"$work/check.err"
check_exit=$?
set -e
echo "  exit code $check_exit: $(cat "$work/check.err")"

step "waiting for v1's publishers to stop at their refusal and v2's to finish"
set +e
wait "$v1_pid"; v1_exit=$?
wait "$v2_pid"; v2_exit=$?
set -e
pids=()

step "coord status"
$coord status

step "checking v2's tables against a from-scratch computation over every event"
mismatches=$(psql "$DATABASE_URL" -Atc "
  WITH truth AS (
    SELECT stream_id AS account,
           sum(CASE event_type WHEN 'MoneyDeposited' THEN (data->>'amount')::bigint
                               WHEN 'MoneyWithdrawn' THEN -(data->>'amount')::bigint ELSE 0 END) AS amount,
           count(*) FILTER (WHERE event_type = 'MoneyDeposited') AS deposits
    FROM coord.events GROUP BY 1)
  SELECT count(*) FROM truth t FULL JOIN balances_v2_0_0.balances b USING (account)
  WHERE t.amount IS DISTINCT FROM b.amount OR t.deposits IS DISTINCT FROM b.deposits")
total=$(psql "$DATABASE_URL" -Atc "SELECT count(*) FROM coord.events")

step "summary"
python3 - "$work" "$check_exit" "$v1_exit" "$v2_exit" "$mismatches" "$total" <<'PY'
import json, os, sys
work, check_exit, v1_exit, v2_exit, mismatches, total = sys.argv[1:7]
def load(name):
    path = os.path.join(work, name)
    return json.load(open(path)) if os.path.exists(path) else None
v1, v2, act = load("v1.json"), load("v2.json"), load("activate.json")
rows = []
def row(what, value, ok):
    rows.append((what, str(value), "ok" if ok else "FAIL"))
step = next((s for s in (act or {}).get("steps", []) if s["projector"] == "balances"), None)
if step:
    rate = step["replayed_events"] / max(step["replay_seconds"], 1e-9)
    row("replay of balances@2.0.0", f"{step['replayed_events']} events, {rate:.0f} events/s", True)
    held = (step.get("switch") or {}).get("held_back_ms")
    row("publishers held back at activation", f"{held:.1f} ms" if held is not None else "?", held is not None)
else:
    row("activation of balances@2.0.0", "no report", False)
row("events published by v1 instances", v1["published"] if v1 else "?", bool(v1))
refused = v1["refused_newer_active"] if v1 else 0
row("v1 publishers refused after activation", f"{refused} of 4", refused == 4 and v1_exit == "0")
if v1 and v1.get("first_refusal"):
    row("  refused with", v1["first_refusal"].split(":")[0], "NewerProjectorIsActive" in v1["first_refusal"])
row("bank --app-version 1 coord check", f"exit {check_exit} (3 = NewerProjectorIsActive)", check_exit == "3")
times = open(os.path.join(work, "wait.times")).read().split() if os.path.exists(os.path.join(work, "wait.times")) else None
row("v2 instances waited for readiness", f"{float(times[1]) - float(times[0]):.1f} s (coord wait)" if times else "?", bool(times))
published = v2["published"] if v2 else 0
row("events published by v2 instances after activation", published, published > 0 and v2_exit == "0")
row("v2 tables vs. every event", f"{mismatches} accounts differ over {total} events", mismatches == "0")
width = [max(len(r[i]) for r in rows + [("WHAT", "RESULT", "CHECK")]) for i in range(3)]
for r in [("WHAT", "RESULT", "CHECK")] + rows:
    print("  " + "  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())
failed = [r for r in rows if r[2] == "FAIL"]
print()
print("demo complete" if not failed else f"demo FAILED: {len(failed)} check(s) above say FAIL")
sys.exit(1 if failed else 0)
PY
