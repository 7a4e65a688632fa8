#!/usr/bin/env bash
# Here (not on the GPU machine): download into .whl/ the wheels the HTTP server and the serving
# benchmark need and the GPU image lacks (it has torch, transformers, peft, numpy, tqdm,
# prometheus-client, but no fastapi/uvicorn/pydantic/pyzmq). Python 3.12, manylinux x86_64,
# one version of each, every dependency named (pip runs with --no-deps on both sides).
#
#   scripts/prepare_device_wheels.sh                       # ~10 MB
#   WITH_MATPLOTLIB=1 scripts/prepare_device_wheels.sh     # + matplotlib and its deps (~25 MB)
#
# On the GPU machine (scripts/device_serving.sh does it), with .whl in the call's carry list:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
# Versions are those the CPU test suite runs with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY=${PYTHON:-python3}
WHEELS=(
    # HTTP server: sglora/server
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 click==8.5.1 h11==0.16.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    annotated-doc==0.0.7 typing-extensions==4.16.0 anyio==4.16.0 idna==3.20 pyzmq==27.3.0
    opentelemetry-api==1.45.2
    # the benchmark's HTTP client: sglora/bench_serving
    httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.19.post1 sniffio==1.3.1
)
if [ "${WITH_MATPLOTLIB:-0}" = 1 ]; then
    WHEELS+=(matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.60.1
        kiwisolver==1.4.9 pillow==12.0.0 pyparsing==3.2.5 python-dateutil==2.9.0.post0 six==1.17.0)
fi
# pip matches manylinux tags exactly: name each one a wheel may carry
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
mkdir -p .whl
for w in "${WHEELS[@]}"; do
    # one at a time: a failure names the wheel, and pure-Python ones match any platform
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .whl "$w" || {
        echo "error: no cp312 manylinux x86_64 wheel of $w" >&2
        exit 1
    }
done
# one version of each package, or the install on the device stops
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "error: several versions in .whl of: $dupes" >&2 && exit 1; }
du -sh .whl
ls .whl
