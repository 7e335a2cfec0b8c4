"""The one-command GPU check and its helpers, as far as a CPU machine can test them: the scripts
are shellcheck-clean, the check runs in its skip mode and says what it skipped, and bench_train's
FLOP count uses the parameter count transformers gives for the same shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TOOLS
from test_slurm import shellcheck_binary

sys.path.insert(0, str(TOOLS))


def test_scripts_are_shellcheck_clean():
    scripts = ["tools/gpu_check.sh", "tools/prepare_gpu_wheels.sh", ".ci/run"]
    p = subprocess.run(
        [shellcheck_binary(), "--severity=style", *scripts],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs its GPU stages")
@pytest.mark.one_leg
def test_gpu_check_skip_mode_writes_both_summaries(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "gpu_check.py"), "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["env", "gpu_tests", "logprob_parity", "bench_train", "demo"]
    assert stages["env"]["status"] == "passed"
    assert stages["env"]["result"]["cuda"] is False
    assert stages["env"]["result"]["megatron_core"]
    for name in ("gpu_tests", "logprob_parity", "bench_train", "demo"):
        assert stages[name]["status"] == "skipped" and "no CUDA" in stages[name]["detail"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "GPU stages skipped" in md and "| demo | skipped |" in md


@pytest.mark.parametrize("tied", [False, True])
def test_bench_train_counts_the_matmul_weights_transformers_has(tied):
    from bench_train import matmul_params, step_flops
    from transformers import AutoModelForCausalLM

    from megatron_gvpo.models.hf_config import arch_from_dict
    from megatron_gvpo.models.tiny import tiny_hf_config

    config = tiny_hf_config("llama", tie_word_embeddings=tied, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    arch = arch_from_dict(config.to_dict())
    assert matmul_params(arch) == linear  # lm_head counts even when it shares the embedding
    seq, tokens = 64, 512
    attn = 12 * config.num_hidden_layers * seq * config.hidden_size  # heads * head_dim = hidden
    assert step_flops(arch, seq, tokens) == (6 * linear + attn) * tokens
