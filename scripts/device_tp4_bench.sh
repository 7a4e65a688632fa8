#!/usr/bin/env bash
# On a multi-GPU machine: tensor parallelism on the GPU, everything copied to $OUT.
#   1. TP2 vs TP1 bf16 logprobs of mixed-adapter batches (scripts/tp_logprob_check.py)
#   2. the decode benchmark at TP=$TP (default 4) and TP2: Qwen3-30B-A3B dummy, bf16, modes
#      lora_disabled / nolora_batch / lora_8x_r16, input 1024; rows with a `tp` key appended to
#      benchmarks/results/decode_<device>.json
#   3. SERVING=1: the serving benchmark's scenario (b) (8 adapters, uniform) at TP=$TP
#      (needs `.whl` carried, see scripts/prepare_device_wheels.sh)
#
#   STEPS="check tp tp2" TP=4 BS="1 64 128 256 512" scripts/device_tp4_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SGLORA_CACHE_DIR=${SGLORA_CACHE_DIR:-$PWD/.cache/sglora}
OUT=${OUT:-/tmp/sglora-tp}
TP=${TP:-4}
STEPS=${STEPS:-check tp tp2}
BS=${BS:-1 64 128 256 512}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
FAMILIES=${FAMILIES:-qwen3_moe mixtral llama}
for step in $STEPS; do
    start=$(date +%s)
    case $step in
    check)
        {
            CUDA_VISIBLE_DEVICES=0 python scripts/tp_logprob_check.py --save /tmp/tp1.json \
                --families $FAMILIES &&
                CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc-per-node 2 scripts/tp_logprob_check.py \
                    --tp 2 --compare /tmp/tp1.json --families $FAMILIES
        } 2>&1 | grep -v "Loading\|warn" | tee "$OUT/tp_check.log"
        ;;
    tp | tp2)
        n=$TP && [ "$step" = tp2 ] && n=2 && bs=${BS2:-1 64 256} || bs=$BS
        # shellcheck disable=SC2086
        torchrun --nproc-per-node "$n" scripts/bench_one_batch.py --tp "$n" --batch-sizes $bs \
            --decode-steps "${STEPS_PER_BS:-8}" --input-len 1024 2>&1 |
            grep -v "Loading\|warn" | tee "$OUT/bench_tp$n.log"
        cp benchmarks/results/decode_*.json "$OUT/"
        ;;
    serving)
        SCENARIOS=b SERVER_ARGS="--tp-size $TP ${SERVER_ARGS:-}" OUT="$OUT/serving" bash scripts/device_serving.sh
        ;;
    esac
    echo "== $step: $(($(date +%s) - start)) s"
done
