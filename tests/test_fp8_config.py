"""FP8 training settings (``model.fp8.*``) and FP8 rollout (``rollout.fp8``).

CPU checks: every validation error names its Hydra key; enabling FP8 here fails with the
TE/GPU message before any model is built; the TransformerConfig fields are real megatron-core
fields (a TransformerConfig is constructed with them). Hardware branches are exercised by
replacing ``fp8.probe``. The ``gpu`` test builds and runs a tiny FP8 model (skipped without CUDA).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from megatron_gvpo.models import fp8 as fp8_mod
from megatron_gvpo.models.fp8 import FP8Config

FAKE = str(Path(__file__).with_name("sglang_fake_server.py"))
WORKER = Path(__file__).parent / "dist_workers" / "fp8_forward_worker.py"


def _fake_hardware(monkeypatch, cuda=True, capability=(9, 0), te=(2, 8), error=""):
    monkeypatch.setattr(fp8_mod, "probe", lambda: (cuda, capability, te, error))


def _compose_model(group: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_gvpo.trainer.config import register_configs

    register_configs()  # the schemas the YAML groups start from
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={group}"])
    return OmegaConf.to_container(cfg.model, resolve=False)


@pytest.mark.parametrize("group", ["demo", "hf"])
def test_yaml_blocks_hold_every_field_with_the_dataclass_defaults(group):
    raw = _compose_model(group)["fp8"]
    assert set(raw) == {f.name for f in dataclasses.fields(FP8Config)}
    assert FP8Config.from_dict(raw) == FP8Config()


@pytest.mark.parametrize(
    "fields,precision,impl,key",
    [
        ({"format": "e5m2"}, "bf16", "auto", "model.fp8.format"),
        ({"recipe": "fancy"}, "bf16", "auto", "model.fp8.recipe"),
        ({"amax_compute_algo": "mean"}, "bf16", "auto", "model.fp8.amax_compute_algo"),
        ({"amax_history_len": 0}, "bf16", "auto", "model.fp8.amax_history_len"),
        ({"margin": -1}, "bf16", "auto", "model.fp8.margin"),
        ({"margin": 0.5}, "bf16", "auto", "model.fp8.margin"),
        ({"num_layers_at_start_in_bf16": -1}, "bf16", "auto", "model.fp8.num_layers_at_start"),
        ({"num_layers_at_end_in_bf16": -2}, "bf16", "auto", "model.fp8.num_layers_at_end"),
        ({"enabled": "yes"}, "bf16", "auto", "model.fp8.enabled"),
        (
            {"first_last_layers_bf16": True, "recipe": "delayed"},
            "bf16",
            "auto",
            "model.fp8.first_last_layers_bf16",
        ),
        ({"enabled": True}, "fp32", "auto", "model.precision=bf16"),
        ({"enabled": True}, "fp16", "auto", "model.precision=bf16"),
        ({"enabled": True}, "bf16", "local", "model.transformer_impl"),
    ],
)
def test_config_errors_name_their_key(monkeypatch, fields, precision, impl, key):
    _fake_hardware(monkeypatch)  # the hardware would pass: the config is what fails
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FP8Config(**fields).validate(precision, impl)


@pytest.mark.parametrize(
    "hardware,recipe,message",
    [
        (dict(cuda=False, te=None), "delayed", "model.fp8.enabled=true needs Transformer Engine"),
        (dict(te=None, error="ImportError: no TE"), "delayed", "model.fp8.enabled=true needs"),
        (dict(capability=(8, 0)), "delayed", "model.fp8.recipe=delayed needs compute capab"),
        (dict(capability=(8, 6)), "tensorwise", "model.fp8.recipe=tensorwise needs compute"),
        (dict(capability=(8, 9)), "blockwise", r"model.fp8.recipe=blockwise needs compute .*9\.0"),
        (dict(capability=(9, 0)), "mxfp8", "model.fp8.recipe=mxfp8 needs compute capability"),
        (dict(capability=(12, 0)), "mxfp8", "model.fp8.recipe=mxfp8 needs compute capability"),
        (dict(te=(2, 1)), "blockwise", r"model.fp8.recipe=blockwise needs Transformer Engine >= 2"),
        (dict(te=(2, 1)), "tensorwise", "model.fp8.recipe=tensorwise needs Transformer Engine"),
    ],
)
def test_hardware_errors_name_their_key(monkeypatch, hardware, recipe, message):
    _fake_hardware(monkeypatch, **hardware)
    with pytest.raises(ValueError, match=message):
        FP8Config(enabled=True, recipe=recipe).validate("bf16", "auto")


@pytest.mark.parametrize(
    "capability,recipe",
    [((8, 9), "delayed"), ((8, 9), "tensorwise"), ((9, 0), "blockwise"), ((10, 0), "mxfp8")],
)
def test_supported_hardware_passes(monkeypatch, capability, recipe):
    _fake_hardware(monkeypatch, capability=capability, te=(2, 3))
    FP8Config(enabled=True, recipe=recipe).validate("bf16", "transformer_engine")


def test_disabled_fp8_needs_no_hardware_and_sets_nothing(monkeypatch):
    _fake_hardware(monkeypatch, cuda=False, te=None)
    cfg = FP8Config()
    cfg.validate("fp32", "local")
    assert cfg.transformer_config_kwargs() == {}


def test_unknown_key_is_named_with_its_full_path():
    from megatron_gvpo.trainer.config import ModelSection, sections_from_dict

    with pytest.raises(ValueError, match=r"model\.fp8\.bogus"):
        FP8Config.from_dict({"enabled": False, "bogus": 1})
    with pytest.raises(ValueError, match=r"model\.fp8\.bogus"):
        sections_from_dict({"model": {"fp8": {"bogus": 1}}})
    section = ModelSection(fp8={"enabled": False, "recipe": "blockwise"})
    assert section.fp8 == FP8Config(recipe="blockwise")


def test_run_config_validation_checks_fp8_before_any_model(monkeypatch):
    from megatron_gvpo.trainer.config import run_config_from_dict

    raw = {"model": {"precision": "fp32", "fp8": {"enabled": True}}}
    with pytest.raises(ValueError, match=r"model\.fp8\.enabled=true needs model\.precision=bf16"):
        run_config_from_dict(raw)
    raw["model"]["fp8"] = {"recipe": "nope"}
    with pytest.raises(ValueError, match=r"model\.fp8\.recipe"):
        run_config_from_dict(raw)


def test_kwargs_are_transformer_config_fields_and_construct_one_on_cpu():
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = FP8Config(
        enabled=True,
        format="e4m3",
        recipe="blockwise",
        first_last_layers_bf16=True,
        num_layers_at_start_in_bf16=1,
        num_layers_at_end_in_bf16=2,
        amax_history_len=16,
        amax_compute_algo="most_recent",
        margin=1,
    )
    kwargs = cfg.transformer_config_kwargs()
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(kwargs) <= names
    assert {"fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len"} <= set(kwargs)
    tc = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        bf16=True,
        params_dtype=torch.bfloat16,
        use_cpu_initialization=True,
        **kwargs,
    )
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin) == ("e4m3", "blockwise", 1)
    assert (tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (16, "most_recent")
    assert (tc.first_last_layers_bf16, tc.num_layers_at_end_in_bf16) == (True, 2)


def test_model_config_carries_fp8_into_transformer_config(monkeypatch):
    from megatron_gvpo.models.gpt import ModelConfig, transformer_config
    from megatron_gvpo.models.hf_config import arch_from_dict
    from megatron_gvpo.models.tiny import tiny_hf_config

    arch = arch_from_dict(tiny_hf_config("llama").to_dict())
    _fake_hardware(monkeypatch)
    fp8 = FP8Config(enabled=True, recipe="tensorwise", first_last_layers_bf16=True)
    tc = transformer_config(arch, ModelConfig(precision="bf16", fp8=fp8), tp=1, pp=1)
    assert (tc.fp8, tc.fp8_recipe, tc.first_last_layers_bf16) == ("hybrid", "tensorwise", True)
    assert transformer_config(arch, ModelConfig(precision="bf16"), tp=1, pp=1).fp8 is None
    # 4 layers over 2 stages: at most 2 bf16 layers at each end, named by key
    too_many = FP8Config(enabled=True, recipe="tensorwise", first_last_layers_bf16=True)
    too_many.num_layers_at_start_in_bf16 = 3
    with pytest.raises(ValueError, match=r"model\.fp8\.num_layers_at_start_in_bf16=3"):
        transformer_config(arch, ModelConfig(precision="bf16", fp8=too_many), tp=1, pp=2)


def _train(cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEGATRON_GVPO_CACHE=str(cache), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "megatron_gvpo.train", *overrides],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.fp8.enabled=true", "model.precision=bf16"],
            "model.fp8.enabled=true needs Transformer Engine",
        ),
        (["model.fp8.enabled=true"], "model.fp8.enabled=true needs model.precision=bf16"),
        (["model.fp8.recipe=fancy"], "model.fp8.recipe"),
        (["model.fp8.bogus=1"], "model.fp8.bogus"),
    ],
)
def test_trainer_command_fails_before_any_model_is_built(tmp_path, overrides, message):
    if torch.cuda.is_available() and "model.precision=bf16" in overrides:
        pytest.skip("with CUDA (and maybe TE) this run would start; the check is for CPU")
    cache = tmp_path / "empty_cache"  # a model build would show up here
    proc = _train(cache, f"trainer.run_dir={tmp_path / 'run'}", *overrides)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sglang_kwargs_start_servers_from_an_fp8_checkpoint_with_fp8_sync():
    from megatron_gvpo.rollout.sglang import SGLangConfig
    from megatron_gvpo.trainer.config import RolloutSection, sglang_kwargs

    on = sglang_kwargs(RolloutSection(backend="sglang", fp8=True, sglang={"tp_size": 2}), "/m",
                       run_dir="/run")
    assert on == {"model_path": "/m", "tp_size": 2, "fp8": True, "fp8_dir": "/run/fp8_model"}
    assert SGLangConfig(**on).quantization is None  # no online quantization
    off = sglang_kwargs(RolloutSection(backend="sglang", fp8=False), "/m")
    assert "fp8" not in off and SGLangConfig(**off).fp8 is False
    with pytest.raises(ValueError, match="drop quantization"):
        SGLangConfig(**sglang_kwargs(RolloutSection(
            backend="sglang", fp8=True, sglang={"quantization": "fp8"}), "/m"))


@pytest.mark.parametrize("fp8", [True, False])
def test_started_sglang_server_loads_the_fp8_checkpoint(tmp_path, tiny_models, fp8):
    """Against the protocol fake (not SGLang): the launched command line starts from the FP8
    copy written into the run folder, never with --quantization."""
    from megatron_gvpo.trainer.config import RolloutSection
    from megatron_gvpo.trainer.setup import build_engine

    sglang = {
        "launch_command": [sys.executable, FAKE],
        "log_dir": str(tmp_path / "logs"),
        "health_poll_s": 0.05,
        "startup_timeout_s": 60.0,
        "shutdown_grace_s": 5.0,
    }
    section = RolloutSection(backend="sglang", fp8=fp8, sglang=sglang)
    engine = build_engine(section, str(tiny_models["llama"]), trust_remote_code=False,
                          run_dir=str(tmp_path / "run"))
    try:
        args = list(engine._servers[0].proc.args)
    finally:
        engine.shutdown()
    assert "--quantization" not in args
    model = args[args.index("--model-path") + 1]
    assert model == (str(tmp_path / "run" / "fp8_model") if fp8 else str(tiny_models["llama"]))


@pytest.mark.gpu
def test_tiny_model_runs_forward_and_backward_with_fp8(tmp_path):
    """On a CUDA machine with TE and FP8: a tiny GPTModel under FP8 runs and stays close to bf16."""
    try:
        FP8Config(enabled=True).validate("bf16", "auto")
    except ValueError as e:
        pytest.skip(str(e))
    from megatron_gvpo.models.tiny import save_tiny_hf_model

    hf = save_tiny_hf_model(tmp_path / "hf", "llama", seed=3, dtype=torch.bfloat16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO)])))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--hf-dir", str(hf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fp8 forward ok" in proc.stdout
