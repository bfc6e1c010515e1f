# Shared by the scripts in scripts/bench/ (sourced, not run): builds the release binaries once
# and runs synchub-load with --json, keeping each scenario's JSON under target/bench-results/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    cargo build --release -q -p synchub-hub -p synchub-tests --bins
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
LOAD="$TARGET/release/synchub-load"
OUT="${BENCH_OUT:-$TARGET/bench-results}"
mkdir -p "$OUT"
export SYNCHUB_BIN="$TARGET/release/synchub"
# One process holds at most ~19,000 sockets here (hard open-file limit 20,000); synchub-load
# and the hub raise their soft limits themselves. Elsewhere: `ulimit -n 65536` or LimitNOFILE.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# run NAME ARGS...: human lines on the terminal, JSON in $OUT/NAME.json
run() {
    local name="$1"
    shift
    "$LOAD" --json "$@" >"$OUT/$name.json"
    echo "-> $OUT/$name.json"
}
