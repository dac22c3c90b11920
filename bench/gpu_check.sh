#!/usr/bin/env bash
# The GPU smoke check (python -m bench.gpu_smoke) on the lent GPU machine, in one command.
#
#   here, once (needs PyPI):  bash bench/gpu_check.sh --fetch-wheels
#       hydra-core and omegaconf (pure-Python wheels) and antlr4-python3-runtime 4.9.3 (PyPI has
#       only its sdist: the wheel is built here) into .whl/, which is added to .git/info/exclude.
#   there, through the device tool's `run` (carry [".whl"], timeout_s 600):
#       bash bench/gpu_check.sh [extra bench.gpu_smoke arguments, e.g. --quick or --budget-s 300]
#       installs the wheels into /tmp/site when hydra is missing, runs
#       `python -m bench.gpu_smoke --device cuda --out $OUT --work /tmp/gpu_smoke_runs`, and leaves in $OUT
#       smoke.json, summary.md, log.txt and nvidia-smi.txt. Exit status: the check's.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    set -e
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4"
    python3 -m pip wheel --quiet --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
    ls -l .whl
    echo "now: device run, command 'bash bench/gpu_check.sh', carry [\".whl\"], timeout_s 600"
    exit 0
fi

OUT="${OUT:-/tmp/gpu_smoke_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "hydra-core/omegaconf are not installed and no wheels came along: run" \
             "'bash bench/gpu_check.sh --fetch-wheels' here first and carry .whl" | tee "$OUT/log.txt"
        exit 3
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# The script keeps to its own budget (480 s); the timeout is only a backstop inside the tool's 600 s,
# so that log.txt and the smoke.json written after each section still come back.
timeout -k 10 560 python3 -m bench.gpu_smoke --device cuda --out "$OUT" --work /tmp/gpu_smoke_runs "$@" 2>&1 \
    | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
