"""HF <-> Megatron conversion: bitwise round trip, resharding across layouts, clear input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import last_json, run_tool
from safetensors.torch import load_file

from megatron_gvpo.bridge.hf_io import SafetensorsReader
from megatron_gvpo.models.hf_config import read_hf_config
from megatron_gvpo.models.tiny import save_tiny_hf_model


def _load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf = save_tiny_hf_model(tmp_path / "hf", family, seed=3, dtype=torch.bfloat16)
    run_tool(
        "convert_hf_to_mcore.py", "--hf-dir", str(hf), "--out-dir", str(tmp_path / "m"), "--tp", "2"
    )
    run_tool(
        "convert_mcore_to_hf.py",
        "--mcore-dir",
        str(tmp_path / "m"),
        "--out-dir",
        str(tmp_path / "h2"),
        "--pp",
        "2",
    )
    src, back = _load_all(hf), _load_all(tmp_path / "h2")
    assert set(src) == set(back)
    for name in src:
        assert back[name].dtype == src[name].dtype == torch.bfloat16, name
        assert torch.equal(back[name], src[name]), name
    index = json.loads((tmp_path / "h2" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "h2"))
    ref = AutoModelForCausalLM.from_pretrained(str(hf))
    ids = torch.randint(0, 250, (1, 12))
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.slow
def test_checkpoint_from_tp2_loads_at_pp2_with_same_logprobs(tmp_path, tiny_models):
    hf = tiny_models["llama"]
    run_tool(
        "convert_hf_to_mcore.py", "--hf-dir", str(hf), "--out-dir", str(tmp_path / "m"), "--tp", "2"
    )
    results = {}
    for tp, pp in [(2, 1), (1, 2)]:
        dump = tmp_path / f"lp_tp{tp}_pp{pp}.safetensors"
        _, out, _ = run_tool(
            "logprob_parity.py",
            "--hf-dir",
            str(hf),
            "--mcore-dir",
            str(tmp_path / "m"),
            "--tp",
            str(tp),
            "--pp",
            str(pp),
            "--dump",
            str(dump),
        )
        assert last_json(out)["max_abs_diff"] <= 1e-4
        results[(tp, pp)] = load_file(str(dump))
    a, b = results[(2, 1)], results[(1, 2)]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


# ---- bad input: clear errors before heavy work -------------------------------------------------


def _config(tmp_path: Path, **changes) -> Path:
    hf = save_tiny_hf_model(tmp_path / "hf", "llama")
    cfg = json.loads((hf / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (hf / "config.json").write_text(json.dumps(cfg))
    return hf


def test_unsupported_model_type_lists_supported(tmp_path):
    hf = _config(tmp_path, model_type="gpt2")
    with pytest.raises(
        ValueError,
        match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3",
    ):
        read_hf_config(hf)


def test_missing_required_field_is_named(tmp_path):
    hf = _config(tmp_path, hidden_size=None)
    with pytest.raises(ValueError, match=r"config.json: missing required field\(s\) hidden_size"):
        read_hf_config(hf)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tp", "3"], "num_attention_heads=4 is not divisible by tp=3"),
        (["--tp", "4"], "num_key_value_heads=2 is not divisible by tp=4"),
        (["--pp", "3"], "num_hidden_layers=4 is not divisible by pp=3"),
    ],
)
def test_layout_errors_from_the_tool(tmp_path, tiny_models, flags, message):
    code, _, err = run_tool(
        "convert_hf_to_mcore.py",
        "--hf-dir",
        str(tiny_models["llama"]),
        "--out-dir",
        str(tmp_path / "m"),
        *flags,
        expect_ok=False,
    )
    assert code != 0 and message in err
    assert not (tmp_path / "m").exists()


def test_truncated_shard_is_reported(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2")
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated safetensors file"):
        SafetensorsReader(hf)
    code, _, err = run_tool(
        "convert_hf_to_mcore.py",
        "--hf-dir",
        str(hf),
        "--out-dir",
        str(tmp_path / "m"),
        expect_ok=False,
    )
    assert code != 0 and "truncated safetensors file" in err


def test_missing_shard_listed_in_index_is_reported(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2")
    names = list(load_file(str(hf / "model.safetensors")))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    with pytest.raises(
        FileNotFoundError, match=r"model-00002-of-00002.safetensors: safetensors shard is missing"
    ):
        SafetensorsReader(hf)


def test_folder_without_safetensors_is_refused(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen2")
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        SafetensorsReader(hf)


def test_not_a_checkpoint_is_reported(tmp_path):
    code, _, err = run_tool(
        "convert_mcore_to_hf.py",
        "--mcore-dir",
        str(tmp_path),
        "--out-dir",
        str(tmp_path / "o"),
        expect_ok=False,
    )
    assert code != 0 and "not a megatron_gvpo checkpoint" in err


def _newer_mcore() -> str:
    """A megatron-core release one minor version above the installed one."""
    from importlib.metadata import version

    from packaging.version import Version

    v = Version(version("megatron-core"))
    return f"{v.major}.{v.minor + 1}.0"


def test_checkpoint_from_a_newer_megatron_core_is_refused_naming_both(tmp_path, tiny_models):
    from importlib.metadata import version

    m = tmp_path / "m"
    run_tool("convert_hf_to_mcore.py", "--hf-dir", str(tiny_models["llama"]), "--out-dir", str(m))
    meta_file = m / "megatron_gvpo.json"
    meta = json.loads(meta_file.read_text())
    assert meta["megatron_core"] == version("megatron-core")
    # A checkpoint that recorded no version (written before it was recorded) still loads.
    del meta["megatron_core"]
    meta_file.write_text(json.dumps(meta))
    run_tool("convert_mcore_to_hf.py", "--mcore-dir", str(m), "--out-dir", str(tmp_path / "h1"))
    newer = _newer_mcore()
    meta_file.write_text(json.dumps({**meta, "megatron_core": newer}))
    code, _, err = run_tool(
        "convert_mcore_to_hf.py",
        "--mcore-dir",
        str(m),
        "--out-dir",
        str(tmp_path / "h2"),
        expect_ok=False,
    )
    assert code != 0
    assert f"written by megatron-core {newer}" in err
    assert f"runs megatron-core {version('megatron-core')}" in err
    assert "pip install" in err and not (tmp_path / "h2").exists()
