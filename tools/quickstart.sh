#!/usr/bin/env bash
# The embedded default until the trainer lands: make a tiny random Qwen2-style HF model, convert it
# to a Megatron-Core checkpoint at TP2, back to HF at PP2, and print logprob/gradient parity
# against transformers at TP2 x PP2 on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN_DIR:-runs/quickstart}
mkdir -p "$RUN"
"$PY" - "$RUN/hf" <<'PYEOF'
import sys
from megatron_gvpo.models.tiny import save_tiny_hf_model
save_tiny_hf_model(sys.argv[1], "qwen2")
PYEOF
"$PY" tools/convert_hf_to_mcore.py --hf-dir "$RUN/hf" --out-dir "$RUN/mcore" --tp 2
"$PY" tools/convert_mcore_to_hf.py --mcore-dir "$RUN/mcore" --out-dir "$RUN/hf_back" --pp 2
"$PY" tools/logprob_parity.py --hf-dir "$RUN/hf" --mcore-dir "$RUN/mcore" --tp 2 --pp 2 --grad
