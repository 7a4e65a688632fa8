# Shell helpers shared by the device scripts that run an sglora server (device_serving.sh,
# device_soak.sh): source it from the repository root after setting OUT and PORT.
#   install_wheels                 the server's packages from .whl (WHEELS=0: installed already)
#   adapter_dir DISTINCT           prints where DISTINCT ~1.3 GB adapters fit (/dev/shm or /tmp)
#   make_adapters DIR N RANK TGT.. N random adapters of MODEL (skipped if they exist)
#   start_server NAME ARGS...      launch_server on PORT, log $OUT/server_NAME.log, wait healthy
#   stop_server                    SIGTERM (a drain), then SIGKILL after 20 s

install_wheels() {
    if [ "${WHEELS:-1}" = 1 ]; then
        [ -d .whl ] || { echo "error: no .whl: run scripts/prepare_device_wheels.sh, carry .whl" && return 2; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 2
    fi
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export TQDM_DISABLE=1 # progress bars would fill the logs
    export SGLORA_CACHE_DIR=${SGLORA_CACHE_DIR:-$PWD/.cache/sglora}
}

adapter_dir() { # ~1.3 GB a rank-16 attention + experts adapter of a 30B MoE
    local shm_gb
    shm_gb=$(df --output=avail -BG /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
    if [ "${shm_gb:-0}" -ge $((2 * $1)) ]; then echo /dev/shm/sglora-adapters; else echo /tmp/sglora-adapters; fi
}

make_adapters() { # $1 dir, $2 number, $3 rank, then targets
    local dir=$1 num=$2 rank=$3
    shift 3
    [ -f "$dir/lora$((num - 1))/adapter_model.safetensors" ] && return 0
    python3 scripts/make_adapters.py --config "$MODEL" --out "$dir" --num "$num" --rank "$rank" \
        --targets "$@" --device "${GEN_DEVICE:-cuda}"
}

SERVER_PID=
start_server() { # $1: log name, then launch_server flags
    local name=$1
    shift
    python3 -m sglora.launch_server --model-path "$MODEL" --load-format dummy --port "$PORT" \
        "$@" >"$OUT/server_$name.log" 2>&1 &
    SERVER_PID=$!
    python3 - "$PORT" "$SERVER_PID" "${SERVER_TIMEOUT:-420}" <<'PY'
import os, sys, time, urllib.request
port, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.time() + timeout
while time.time() < end:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("server exited during start-up")
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(f"server not healthy after {timeout} s")
PY
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null # a graceful drain, but bounded
    for _ in $(seq 20); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    # its ranks exit once it is gone (scheduler/process.py); the next step needs their GPUs
    for _ in $(seq 60); do
        [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && break
        sleep 1
    done
    SERVER_PID=
}
