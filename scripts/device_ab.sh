#!/usr/bin/env bash
# Side-by-side decode A/B: the working tree (NEW) against another revision (OLD), alternated in
# one device call so that both run on the same machine (machines differ by a few percent, more
# than most changes are worth). How every "A -> B, twice" number in docs/benchmarks.md is made.
#
# Here, first (git archive of REV's sglora/, scripts/ and benchmarks/configs/ into .abtest/old,
# which .git/info/exclude keeps out of git):
#   scripts/device_ab.sh --prepare REV
# On the GPU machine, carrying .abtest and .whl (scripts/prepare_device_wheels.sh):
#   scripts/device_ab.sh --batch-sizes 1 8 --modes lora_disabled lora
# Every argument goes to scripts/bench_one_batch.py (default --decode-steps 16 --input-len 1024
# before them). ROUNDS (default 2) rounds of OLD then NEW; TIMEOUT (default 280) seconds a run.
# Rows and logs: $OUT/ab_{old,new}_{round}.{json,log}; the table lines also to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --prepare ]; then
    rev=${2:?usage: scripts/device_ab.sh --prepare REV}
    grep -qxF '/.abtest/' .git/info/exclude 2>/dev/null || echo '/.abtest/' >>.git/info/exclude
    rm -rf .abtest/old && mkdir -p .abtest/old
    git archive "$rev" sglora scripts benchmarks/configs | tar -x -C .abtest/old
    echo "OLD = $(git rev-parse --short "$rev") in .abtest/old"
    exit 0
fi
[ -d .abtest/old/sglora ] || { echo "error: no .abtest/old: run --prepare REV here, carry .abtest" && exit 2; }
: "${OUT:?set OUT (the device call sets it)}"
source scripts/device_lib.sh
install_wheels || exit 2
root=$PWD
for round in $(seq "${ROUNDS:-2}"); do
    for side in old new; do
        dir=$root
        [ $side = old ] && dir=$root/.abtest/old
        echo "== $side, round $round, $(date -u +%T)"
        (cd "$dir" && PYTHONPATH="/tmp/site:$dir" timeout "${TIMEOUT:-280}" python3 \
            scripts/bench_one_batch.py --decode-steps 16 --input-len 1024 "$@" \
            --out "$OUT/ab_${side}_$round.json" >"$OUT/ab_${side}_$round.log" 2>&1)
        grep -E '^(lora|nolora)' "$OUT/ab_${side}_$round.log" || tail -5 "$OUT/ab_${side}_$round.log"
    done
done
