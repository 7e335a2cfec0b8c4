#!/usr/bin/env bash
# The GPU check in one command, for a machine with one GPU, Python 3.12 and a CUDA torch but no
# internet and no megatron-core (see DESIGN.md). From the repository root, with the wheel folder
# made beforehand by tools/prepare_gpu_wheels.sh beside it:
#
#   bash tools/gpu_check.sh            # the device tool: run(command=..., carry=[".whl"])
#
# 1. a venv at $GPU_CHECK_VENV (default /tmp/gvpo_gpu_venv) that sees the machine's packages
#    (torch, transformers, ...) behind its own, and our package (editable, from this tree) plus
#    the wheels of .whl installed into it, offline;
# 2. tools/gpu_check.py: the gpu-marked tests, logprob parity in bf16, bench_train, the demo on
#    CUDA, each with its own time limit, within $GPU_CHECK_BUDGET_S (default 480) seconds.
# Writes gpu_check.json, gpu_check.md and one log per stage into $OUT (default runs/gpu_check).
# Without CUDA the GPU stages are skipped and say so; GPU_CHECK_CPU_SMOKE=1 runs them at CPU size.
# Environment: PYTHON (default python3), WHL (default .whl), GPU_CHECK_INSTALL=0 to reuse a venv.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHL=${WHL:-.whl}
OUT=${OUT:-runs/gpu_check}
VENV=${GPU_CHECK_VENV:-/tmp/gvpo_gpu_venv}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
t0=$(date +%s)

install() {
    if [ ! -f "$WHL/MANIFEST.txt" ]; then
        echo "gpu_check: no wheel folder $WHL (make it with tools/prepare_gpu_wheels.sh)"
        return 1
    fi
    rm -rf "$VENV"
    "$PY" -m venv --system-site-packages "$VENV" || return 1
    # The machine's own site-packages behind the venv's, also when $PY is itself a venv.
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PY" -c 'import site, sysconfig; print("\n".join(dict.fromkeys(
        [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])))' \
        > "$site/_gpu_machine.pth" || return 1
    # --ignore-installed: the carried versions, also where the machine has its own copy.
    "$VENV/bin/pip" install -q --no-index --no-deps --ignore-installed "$WHL"/*.whl || return 1
    "$VENV/bin/pip" install -q --no-index --find-links "$WHL" --no-deps -e . || return 1
}

if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
    if install > "$OUT/install.log" 2>&1; then
        echo "gpu_check: installed into $VENV in $(($(date +%s) - t0)) s"
    else
        echo "gpu_check: install failed (see $OUT/install.log):"
        tail -5 "$OUT/install.log"
        exit 1
    fi
fi
budget=$((${GPU_CHECK_BUDGET_S:-480} - ($(date +%s) - t0)))
smoke=()
[ "${GPU_CHECK_CPU_SMOKE:-0}" = 1 ] && smoke=(--cpu-smoke)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} "$VENV/bin/python" tools/gpu_check.py --out "$OUT" \
    --budget-s "$budget" "${smoke[@]}"
