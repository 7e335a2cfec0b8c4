"""tools/convert_hf_to_fp8.py: a blockwise-FP8 HF checkpoint that transformers loads, and SGLang
servers (here: the protocol fake) started from it when ``fp8=true``.

transformers is the independent reader: its ``FineGrainedFP8Config`` parses our
``quantization_config`` and, on CPU, its FP8 integration dequantizes the weights on load; the
result is compared with the original BF16/FP32 weights within e4m3's rounding error.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from megatron_gvpo.models.tiny import save_tiny_hf_model
from megatron_gvpo.rollout.sglang import SGLangConfig, SGLangEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from sglang_fake_server import sglang_standin  # noqa: E402

from tools.convert_hf_to_fp8 import main as convert_main  # noqa: E402

FAKE = str(Path(__file__).with_name("sglang_fake_server.py"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = save_tiny_hf_model(root / "src", "llama", hidden_size=256, intermediate_size=384)
    convert_main(["--src", str(src), "--dst", str(root / "fp8")])
    return src, root / "fp8"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_layout_and_config_are_hf_fp8(converted):
    from transformers import AutoConfig, FineGrainedFP8Config

    src, dst = converted
    orig, q = _tensors(src), _tensors(dst)
    quantized = [n for n in orig if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    assert quantized and set(q) == set(orig) | {n + "_scale_inv" for n in quantized}
    for n in quantized:
        rows, cols = orig[n].shape
        assert q[n].dtype == torch.float8_e4m3fn and q[n].shape == orig[n].shape
        s = q[n + "_scale_inv"]
        assert s.dtype == torch.float32 and s.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    for n in set(orig) - set(quantized):
        assert torch.equal(q[n], orig[n]), n  # embeddings, norms, lm_head untouched
    qc = AutoConfig.from_pretrained(dst).quantization_config
    parsed = FineGrainedFP8Config.from_dict(qc)
    assert parsed.quant_method == "fp8" and list(parsed.weight_block_size) == [128, 128]
    assert parsed.activation_scheme == "dynamic" and qc["fmt"] == "e4m3"


def test_transformers_loads_it_within_fp8_rounding(converted):
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    from transformers import AutoModelForCausalLM

    src, dst = converted
    orig = _tensors(src)
    q = _tensors(dst)
    model = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32)
    params = dict(model.named_parameters())
    for n, w in orig.items():
        if n not in params:
            continue  # tied lm_head
        got = params[n].detach().float()
        if n + "_scale_inv" not in q:
            assert torch.equal(got, w.float()), n
            continue
        # e4m3: 3 mantissa bits -> relative rounding <= 2^-4; subnormal step 2^-9 of the scale
        s = q[n + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
        s = s[: w.shape[0], : w.shape[1]]
        err = (got - w.float()).abs()
        assert bool((err <= w.float().abs() * 2**-4 + s * 2**-9 + 1e-12).all()), n
        assert err.max() > 0  # really quantized, not copied


def test_reuse_keeps_a_matching_conversion(converted, tmp_path):
    from megatron_gvpo.bridge.fp8_checkpoint import convert_hf_to_fp8

    src, dst = converted
    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    convert_hf_to_fp8(src, dst, reuse=True)
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before
    with pytest.raises(ValueError, match="already quantized"):
        convert_hf_to_fp8(dst, tmp_path / "twice")


def _serializer(flat, metas, tp_size):
    """The client's colocated serializer with SGLang's metadata class stood in for; the fake
    runs in its own process, so CPU tensors go by shared-memory file names (torch's
    ``file_system`` strategy) rather than by file descriptors only related processes can pass."""
    from megatron_gvpo.rollout.sglang import sglang_flattened_bucket_serializer

    with sglang_standin():
        return sglang_flattened_bucket_serializer(flat, metas, tp_size)


@pytest.fixture
def file_system_sharing():
    import torch.multiprocessing as mp

    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    yield
    mp.set_sharing_strategy(before)


def _scale_bucket():
    return [[("model.layers.0.mlp.up_proj.weight", torch.zeros(384, 256).to(torch.float8_e4m3fn)),
             ("model.layers.0.mlp.up_proj.weight_scale_inv", torch.ones(3, 2))]]


def test_fp8_servers_start_from_the_converted_checkpoint(converted, tmp_path,
                                                          file_system_sharing):
    src, _ = converted
    fast = dict(health_poll_s=0.05, startup_timeout_s=30.0, shutdown_grace_s=5.0)
    cfg = SGLangConfig(model_path=str(src), fp8=True, launch_command=[sys.executable, FAKE],
                       log_dir=str(tmp_path / "logs"), **fast)
    with SGLangEngine(cfg, serializer=_serializer) as eng:
        info = requests.get(eng.urls[0] + "/server_info", timeout=5).json()
        eng.update_weights(_scale_bucket(), version=1)  # scale_inv parameters exist
    fp8_dir = Path(info["model_path"])
    assert fp8_dir == tmp_path / "logs" / "fp8_model"
    assert json.loads((fp8_dir / "config.json").read_text())["quantization_config"][
        "quant_method"] == "fp8"
    # a BF16 checkpoint has no weight_scale_inv to receive (online --quantization fp8 neither)
    cfg = SGLangConfig(model_path=str(src), launch_command=[sys.executable, FAKE],
                       log_dir=str(tmp_path / "logs2"), **fast)
    with SGLangEngine(cfg, serializer=_serializer) as eng:
        with pytest.raises(Exception, match="weight_scale_inv.*does not exist"):
            eng.update_weights(_scale_bucket(), version=1)
    with pytest.raises(ValueError, match="drop quantization"):
        SGLangConfig(model_path=str(src), fp8=True, quantization="fp8")
