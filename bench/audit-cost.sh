#!/usr/bin/env bash
# What the audit trail costs a Check: `tollgate bench` at a fixed rate
# against a one-node `tollgate up`, alternating audit off (`--no-audit`) and
# on, PAIRS pairs in one sequence. Prints every run and then one JSON object
# with the median p50 and p99 of each mode, the ratio of the medians, and the
# median of the per-pair ratios.
#
#   bench/audit-cost.sh                # 10,000 Checks/s, 10 s runs, 7 pairs
#   RPS=5000 PAIRS=3 bench/audit-cost.sh
#
# Uses the release binary (built if missing) and a scratch data dir.
set -euo pipefail
cd "$(dirname "$0")/.."

RPS=${RPS:-10000}
PAIRS=${PAIRS:-7}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN="$TARGET_DIR/release/tollgate"

cargo build --release -q -p tollgate-node
work=$(mktemp -d)
node_pid=""
cleanup() {
  if [ -n "$node_pid" ]; then kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# One run: starts a fresh node (audit on or off), measures, stops it.
run() {
  local mode=$1 dir="$work/$1-$2"
  local flags=()
  [ "$mode" = off ] && flags=(--no-audit)
  RUST_LOG=warn "$BIN" up --nodes 1 --data-dir "$dir" "${flags[@]}" >"$work/up.log" 2>&1 &
  node_pid=$!
  # Ready once cluster.json is written and a Check is answered.
  for _ in $(seq 1 300); do
    if [ -f "$dir/cluster.json" ] &&
      "$BIN" bench --cluster-dir "$dir" --rps 100 --duration 1 --warmup 0 >/dev/null 2>&1; then
      break
    fi
    sleep 0.1
  done
  "$BIN" bench --cluster-dir "$dir" --rps "$RPS" --duration "$DURATION" --warmup "$WARMUP" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["audit"]=sys.argv[1]; print(json.dumps(r))' "$mode" |
    tee -a "$work/runs.jsonl"
  kill "$node_pid"
  wait "$node_pid" 2>/dev/null || true
  node_pid=""
}

for i in $(seq 1 "$PAIRS"); do
  run off "$i"
  run on "$i"
done

python3 - "$work/runs.jsonl" "$RPS" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(mode, key):
    return statistics.median(r[key] for r in runs if r["audit"] == mode)
out = {"rps": int(sys.argv[2]), "pairs": len(runs) // 2}
for mode in ("off", "on"):
    for key in ("p50_us", "p99_us", "achieved_rps", "errors"):
        out[f"{key}_{mode}"] = med(mode, key)
out["p99_ratio_on_over_off"] = round(out["p99_us_on"] / out["p99_us_off"], 3)
out["p50_ratio_on_over_off"] = round(out["p50_us_on"] / out["p50_us_off"], 3)
# Paired: each "on" run against the "off" run just before it, which cancels
# drift in the machine's load; the median of those ratios.
offs = [r for r in runs if r["audit"] == "off"]
ons = [r for r in runs if r["audit"] == "on"]
for key in ("p50_us", "p99_us"):
    ratios = [b[key] / a[key] for a, b in zip(offs, ons)]
    out[f"{key.split('_')[0]}_paired_ratio_median"] = round(statistics.median(ratios), 3)
print(json.dumps(out))
EOF
