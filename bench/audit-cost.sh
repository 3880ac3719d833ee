#!/usr/bin/env bash
# What the audit trail costs a Check. Starts two one-node clusters side by
# side, one with the audit trail and one without (`--no-audit`), and runs
# `tollgate bench --compare-cluster-dir`: the offered load goes to one node
# at a time, switching every SLICE seconds (target, compare, compare,
# target, ...), so both are measured on the same machine at the same time.
# RUNS such runs, each with fresh nodes; prints every run's report and then
# one JSON object with the medians over runs.
#
# CONTROL=1 runs the same with the trail off on both nodes: the ratios it
# prints are the noise floor of this machine, what "no difference" looks
# like.
#
#   bench/audit-cost.sh                    # 10,000 Checks/s, 3 runs of 60 s
#   RUNS=5 DURATION=120 bench/audit-cost.sh
#   CONTROL=1 bench/audit-cost.sh
#
# Uses the release binary (built if missing) and a scratch data dir.
set -euo pipefail
cd "$(dirname "$0")/.."

RPS=${RPS:-10000}
RUNS=${RUNS:-3}
DURATION=${DURATION:-60}
SLICE=${SLICE:-1}
WARMUP=${WARMUP:-2}
CONTROL=${CONTROL:-0}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN="$TARGET_DIR/release/tollgate"

cargo build --release -q -p tollgate-node
work=$(mktemp -d)
pids=()
stop_nodes() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_nodes
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a one-node cluster in $1 with flags $2..; ready once cluster.json
# is written and a Check is answered.
start_node() {
  local dir=$1
  shift
  RUST_LOG=warn "$BIN" up --nodes 1 --data-dir "$dir" "$@" >"$dir.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    if [ -f "$dir/cluster.json" ] &&
      "$BIN" bench --cluster-dir "$dir" --rps 100 --duration 1 --warmup 0 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "node in $dir did not start; its log:" >&2
  cat "$dir.log" >&2
  return 1
}

target_flags=()
[ "$CONTROL" = 1 ] && target_flags=(--no-audit)
for i in $(seq 1 "$RUNS"); do
  start_node "$work/target-$i" "${target_flags[@]}"
  start_node "$work/compare-$i" --no-audit
  "$BIN" bench --cluster-dir "$work/target-$i" --compare-cluster-dir "$work/compare-$i" \
    --rps "$RPS" --duration "$DURATION" --slice "$SLICE" --warmup "$WARMUP" |
    tee -a "$work/runs.jsonl"
  stop_nodes
done

python3 - "$work/runs.jsonl" "$RPS" "$CONTROL" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = lambda xs: round(statistics.median(xs), 3)
out = {
    "rps": int(sys.argv[2]),
    "control": sys.argv[3] == "1",
    "runs": len(runs),
    "slices_per_node": sum(r["slices"] for r in runs),
}
for side in ("target", "compare"):
    for key in ("p50_us", "p99_us", "errors"):
        out[f"{key}_{side}"] = med([r[side][key] for r in runs])
for key in ("p50_ratio", "p99_ratio", "p50_paired_ratio_median", "p99_paired_ratio_median"):
    out[key] = med([r[key] for r in runs])
    out[f"{key}_runs"] = [r[key] for r in runs]
print(json.dumps(out))
EOF
