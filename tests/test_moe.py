"""Mixture-of-experts (qwen3_moe, qwen2_moe): config, HF expert layouts, parity and conversion
under EP."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, last_json, run_tool, run_torchrun, torchrun_cmd
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_gvpo.bridge.mapping import (
    fused_expert_source,
    hf_names,
    mcore_names,
    read_fused_expert,
    unfuse_experts,
)
from megatron_gvpo.models.hf_config import arch_from_dict, check_parallel_layout, read_hf_config
from megatron_gvpo.models.tiny import save_tiny_hf_model


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A random tiny qwen3_moe saved by transformers: layer 0 dense, layer 1 with 4 experts."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("moe") / "hf", "qwen3_moe", seed=5)


MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")


# qwen2_moe's conversion and parity run in the Python 3.11 leg only (CI budget); the 3.12 leg
# still reads and trains a qwen2_moe (test_gvpo_trains_at_ep2_with_router_losses_and_metrics).
@pytest.fixture(
    scope="module",
    params=[MOE_FAMILIES[0], pytest.param(MOE_FAMILIES[1], marks=pytest.mark.one_leg)],
)
def moe_model(request, tiny_moe, tmp_path_factory):
    """Each MoE family as transformers saves it: the qwen3_moe above, and a qwen2_moe (the same
    routed layer plus a shared expert behind its sigmoid gate, q/k/v biases, no q/k norms,
    top-k probabilities not renormalised)."""
    if request.param == "qwen3_moe":
        return tiny_moe
    return save_tiny_hf_model(tmp_path_factory.mktemp("moe2") / "hf", request.param, seed=6)


def _moe_config(**overrides) -> dict:
    raw = dict(
        model_type="qwen3_moe",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
    )
    raw.update(overrides)
    return raw


def test_config_reads_sparse_layers_as_transformers_decides_them():
    # HF: sparse when not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0.
    arch = arch_from_dict(_moe_config(decoder_sparse_step=2, mlp_only_layers=[3]))
    assert arch.moe_layers == [0, 1, 0, 0]
    assert arch.qk_layernorm and arch.is_moe and not arch.norm_topk_prob
    # transformers 5 writes the count as num_local_experts
    raw = _moe_config(norm_topk_prob=True)
    raw["num_local_experts"] = raw.pop("num_experts")
    arch = arch_from_dict(raw)
    assert (arch.num_experts, arch.norm_topk_prob, arch.moe_layers) == (8, True, [1, 1, 1, 1])


def test_qwen2_moe_config_reads_the_shared_expert_and_qkv_bias():
    raw = _moe_config(model_type="qwen2_moe", shared_expert_intermediate_size=40)
    arch = arch_from_dict(raw)
    assert (arch.shared_expert_ffn_hidden_size, arch.add_qkv_bias, arch.qk_layernorm) == (
        40,
        True,  # transformers' Qwen2MoeConfig.qkv_bias defaults to True
        False,
    )
    assert not arch.norm_topk_prob and arch.moe_layers == [1, 1, 1, 1]
    assert not arch_from_dict({**raw, "qkv_bias": False}).add_qkv_bias
    assert arch_from_dict(_moe_config()).shared_expert_ffn_hidden_size == 0  # qwen3_moe: none
    with pytest.raises(ValueError, match="missing required field.*shared_expert_intermediate_size"):
        arch_from_dict(_moe_config(model_type="qwen2_moe"))
    with pytest.raises(
        ValueError, match="shared_expert_intermediate_size=40 is not divisible by tp=3"
    ):
        check_parallel_layout(
            arch_from_dict({**raw, "num_attention_heads": 3, "num_key_value_heads": 3}), 3, 1
        )
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        arch_from_dict({**raw, "use_sliding_window": True})


def test_config_and_layout_errors_name_the_field():
    with pytest.raises(ValueError, match="c.json: missing required field.*moe_intermediate_size"):
        arch_from_dict({**_moe_config(), "moe_intermediate_size": None}, source="c.json")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        arch_from_dict(_moe_config(num_experts_per_tok=9))
    with pytest.raises(ValueError, match="mlp_only_layers \\[7\\]"):
        arch_from_dict(_moe_config(mlp_only_layers=[7]))
    arch = arch_from_dict(_moe_config())
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by ep=3"):
        check_parallel_layout(arch, 1, 1, ep=3)
    with pytest.raises(ValueError, match="moe_intermediate_size=24 is not divisible by etp=5"):
        check_parallel_layout(arch, 1, 1, ep=2, etp=5)
    dense = arch_from_dict({**_moe_config(), "model_type": "qwen3"})
    with pytest.raises(ValueError, match="parallel.ep=2 needs a mixture-of-experts model"):
        check_parallel_layout(dense, 1, 1, ep=2)


def test_moe_settings_errors_name_the_key():
    from megatron_gvpo.models.moe import MoEConfig

    for bad, key in [
        (dict(token_dispatcher="flex"), "model.moe.token_dispatcher"),
        (dict(routing_replay="fresh"), "model.moe.routing_replay"),
        (dict(aux_loss_coeff=-1.0), "model.moe.aux_loss_coeff"),
    ]:
        with pytest.raises(ValueError, match=key):
            MoEConfig(**bad).validate()


def test_expert_names_cover_the_checkpoint_and_the_fused_layout(moe_model):
    """Every tensor transformers saved is some Megatron parameter's source, and the fused 3-D
    expert tensors transformers holds in memory cut back into exactly the saved ones."""
    from transformers import AutoModelForCausalLM

    tiny_moe = moe_model
    arch = read_hf_config(tiny_moe)
    saved = load_file(str(tiny_moe / "model.safetensors"))
    mapped = [n for m in mcore_names(arch) for n in hf_names(m, arch)]
    assert sorted(mapped) == sorted(saved)
    assert "model.layers.0.mlp.gate_proj.weight" in mapped  # mlp_only_layers=[0]: dense
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in mapped
    if arch.model_type == "qwen2_moe":
        assert "model.layers.1.mlp.shared_expert_gate.weight" in mapped
        assert "model.layers.1.mlp.shared_expert.up_proj.weight" in mapped
        assert "model.layers.1.self_attn.q_proj.bias" in mapped

    in_memory = AutoModelForCausalLM.from_pretrained(str(tiny_moe)).state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in in_memory
    unfused = unfuse_experts(in_memory)
    for name, tensor in saved.items():
        assert torch.equal(unfused[name], tensor), name
        if fused_expert_source(name) is not None:
            assert torch.equal(read_fused_expert(name, in_memory.__getitem__), tensor), name


def test_logprobs_and_gradients_match_transformers_at_ep1(moe_model):
    _, out, _ = run_tool(
        "logprob_parity.py", "--hf-dir", str(moe_model), "--random-tokens", "--grad"
    )
    result = last_json(out)
    assert result["model_type"] == read_hf_config(moe_model).model_type
    assert result["max_abs_diff"] <= 1e-4
    assert result["grad_max_rel_err"] <= 1e-4, result


@pytest.mark.slow
def test_ep2_conversion_round_trip_is_bitwise_and_loads_under_other_layouts(moe_model, tmp_path):
    """TP1 x PP2 x EP2 conversion, back to HF at EP2 (bitwise), then the checkpoint at
    TP2 x EP2 (4 ranks, experts split over TP as well; qwen2_moe's shared expert over TP) against
    transformers, gradients too."""
    tiny_moe = moe_model
    model_type = read_hf_config(tiny_moe).model_type
    m, back = tmp_path / "m", tmp_path / "back"
    run_tool(
        "convert_hf_to_mcore.py",
        "--hf-dir",
        str(tiny_moe),
        "--out-dir",
        str(m),
        "--pp",
        "2",
        "--ep",
        "2",
    )
    run_tool("convert_mcore_to_hf.py", "--mcore-dir", str(m), "--out-dir", str(back), "--ep", "2")
    src, out = (
        load_file(str(tiny_moe / "model.safetensors")),
        load_file(str(back / "model.safetensors")),
    )
    assert set(src) == set(out)
    for name in src:
        assert torch.equal(src[name], out[name]), name
    assert json.loads((back / "config.json").read_text())["model_type"] == model_type
    _, stdout, _ = run_tool(
        "logprob_parity.py",
        "--hf-dir",
        str(tiny_moe),
        "--mcore-dir",
        str(m),
        "--tp",
        "2",
        "--ep",
        "2",
        "--random-tokens",
        "--grad",
    )
    result = last_json(stdout)
    assert (result["tp"], result["ep"]) == (2, 2)
    assert result["max_abs_diff"] <= 1e-4
    assert result["grad_max_rel_err"] <= 1e-4, result


LAYOUT_WORKER = Path(__file__).resolve().parent / "dist_workers" / "loss_layout_worker.py"
# (tp, ep, world): EP takes its ranks from DP; at TP2 the experts are split over TP as well.
EP_LAYOUTS = {"tp1_ep1": (1, 1, 1), "tp1_ep2": (1, 2, 2), "tp2_ep2": (2, 2, 4)}


@pytest.mark.slow
def test_gvpo_step_gradient_is_the_same_at_ep1_and_ep2(tiny_moe, tmp_path):
    """GVPO's (and GRPO's) step gradient with the router's aux loss off, at (TP, EP) = (1, 1),
    (1, 2), (2, 2), with several micro-batches and groups split across them and DP ranks."""
    grads, infos = {}, {}
    for name, (tp, ep, world) in EP_LAYOUTS.items():
        out = tmp_path / f"{name}.safetensors"
        budget = "4096" if world == 1 else "48"
        run_torchrun(
            LAYOUT_WORKER,
            world,
            "--hf-dir",
            str(tiny_moe),
            "--tp",
            str(tp),
            "--ep",
            str(ep),
            "--budget",
            budget,
            "--split",
            "--losses",
            "gvpo,grpo",
            "--out",
            str(out),
        )
        with safe_open(str(out), "pt") as f:
            infos[name] = {k: json.loads(v) for k, v in f.metadata().items()}
        grads[name] = load_file(str(out))
    ref = grads["tp1_ep1"]
    assert any(".mlp.experts.3." in k for k in ref) and any(".mlp.gate." in k for k in ref)
    for name in ("tp1_ep2", "tp2_ep2"):
        assert infos[name]["gvpo"]["groups_whole"] is False
        assert set(grads[name]) == set(ref)
        for k, want in ref.items():
            err = ((grads[name][k] - want).norm() / want.norm().clamp_min(1e-12)).item()
            assert err < 1e-5, f"{name} {k}: rel err {err:.2e}"
        for loss in ("gvpo", "grpo"):
            want = torch.sqrt(
                sum(v.double().square().sum() for k, v in ref.items() if k.startswith(loss + "/"))
            )
            got = infos[name][loss]["grad_norm"]
            assert abs(got - want.item()) <= 1e-5 * want.item(), (name, loss, got, want.item())


@pytest.fixture(scope="module")
def char_moe(tmp_path_factory):
    """A tiny qwen3_moe over the demo's character tokenizer, so the trainer can run the demo
    task on it."""
    return _char_model(tmp_path_factory, "qwen3_moe")


def _char_model(tmp_path_factory, family: str):
    from megatron_gvpo.demo.task import build_char_tokenizer, save_char_tokenizer

    tok = build_char_tokenizer()
    out = save_tiny_hf_model(
        tmp_path_factory.mktemp("char_moe") / "hf",
        family,
        seed=2,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=64,
    )
    save_char_tokenizer(out)
    return out


TRAIN = ("-m", "megatron_gvpo.train")
# megatron_gvpo.train with SGLang's tensor-bucket metadata class stood in for (colocated sync)
TRAIN_TENSOR_SYNC = (
    str(Path(__file__).resolve().parent / "dist_workers" / "train_sglang_standin.py"),
)


def _train_ep2(char_moe, run_dir, *overrides, entry=TRAIN):
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_GVPO_CACHE=str(run_dir.parent / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("WORLD_SIZE", "RANK"):
        env.pop(key, None)
    cmd = torchrun_cmd(
        2,
        *entry,
        "model=hf",
        f"model.path={char_moe}",
        "model.precision=fp32",
        "parallel.ep=2",
        "trainer.max_steps=2",
        "trainer.prompts_per_step=4",
        "rollout.n_samples_per_prompt=4",
        "data.builtin_eval_size=8",
        f"trainer.run_dir={run_dir}",
        *overrides,
    )
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["step"] >= 1]


def _model_bytes(hf_dir) -> int:
    return sum(
        t.numel() * t.element_size() for t in load_file(str(hf_dir / "model.safetensors")).values()
    )


@pytest.mark.slow
@pytest.mark.parametrize("family,replay", [("qwen3_moe", "old"), ("qwen3_moe", "rollout"),
                                           ("qwen2_moe", "old")])
def test_gvpo_trains_at_ep2_with_router_losses_and_metrics(
    char_moe, tmp_path_factory, tmp_path, family, replay
):
    """Two GVPO rounds at EP2 (2 updates each, router aux and z losses on, routes replayed:
    theta''s, or the embedded engine's) with the embedded engine: finite losses, every expert
    (and qwen2_moe's shared expert) synced (the whole model's bytes; the engine's logprobs equal
    the trainer's), router metrics."""
    if family != "qwen3_moe":
        char_moe = _char_model(tmp_path_factory, family)
    rows = _train_ep2(
        char_moe,
        tmp_path / "run",
        "trainer.updates_per_round=2",
        "model.moe.aux_loss_coeff=0.01",
        "model.moe.z_loss_coeff=0.001",
        f"model.moe.routing_replay={replay}",
    )
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["sync/bytes"] == _model_bytes(char_moe)
        assert r["rollout/logprob_abs_diff/max"] < 1e-4  # the engine got the trained experts
        # layer 0 is dense (mlp_only_layers); layer 1 routes each token to 2 of 4 experts
        assert "moe/layer_0/tokens_mean" not in r
        mean, top = r["moe/layer_1/tokens_mean"], r["moe/layer_1/tokens_max"]
        assert top >= mean > 0 and r["moe/load_max_over_mean"] >= 1  # averaged over 2 updates
        assert r["moe/aux_loss"] > 0 and r["moe/z_loss"] > 0
        assert 0 <= r["moe/routing_replay_flips"] <= 1
        # rollout: the theta' pass replayed the engine's routes; the fp32 engine holds the
        # trained weights, so its routes are the theta' router's up to float near-ties
        assert ("moe/rollout_route_flips" in r) == (replay == "rollout")
        assert r.get("moe/rollout_route_flips", 0.0) <= 0.01


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distributed", "disk", "tensor"])
def test_weight_sync_at_ep2_against_the_protocol_fake(char_moe, tmp_path, mode):
    """Two GVPO rounds at EP2 syncing into tests/sglang_fake_server.py, a PROTOCOL FAKE (fake
    tokens, no model: this checks the wiring and the bytes, not SGLang). distributed: the source
    replica broadcasts every expert, its EP peer joins the gathers; disk: rank 0 writes the
    gathered model; tensor: flattened buckets pickled by the client's own serializer and decoded
    by the fake with SGLang's allow-list. After the last sync the fake holds exactly the trained
    model: the names are those transformers saved the model under (SGLang's Qwen3-MoE loader
    reads them), every expert of both EP ranks; the values equal, bitwise, the HF export the
    final checkpoint writes (``trainer.export_hf``: safetensors on disk, not the sync's transport)."""
    dump = tmp_path / "fake_weights.safetensors"
    fake = [sys.executable, str(REPO / "tests" / "sglang_fake_server.py")]
    fake += ["--fake-dump-weights", str(dump)]
    overrides = [
        "rollout=sglang",
        "rollout.max_new_tokens=4",
        f"rollout.sglang.weight_sync={mode}",
        f"++rollout.sglang.launch_command=[{','.join(fake)}]",
        "++rollout.sglang.startup_timeout_s=60",
        "trainer.export_hf=true",
        # the fake's tokens earn equal rewards (zero policy gradient): decoupled weight decay
        # still moves every weight, so the last sync carries weights the optimizer changed
        "trainer.weight_decay=0.1",
    ]
    if mode == "distributed":
        overrides.append("++rollout.sglang.dist_backend=gloo")
    if mode == "disk":
        overrides.append(f"++rollout.sglang.sync_dir={tmp_path / 'sync'}")
    entry = TRAIN_TENSOR_SYNC if mode == "tensor" else TRAIN
    rows = _train_ep2(char_moe, tmp_path / "run", *overrides, entry=entry)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["sync/bytes"] == _model_bytes(char_moe) for r in rows)
    assert rows[-1]["engine/weight_syncs"] == 2

    final = tmp_path / "run" / "checkpoints" / "step_000002" / "hf"
    want = {}
    for shard in sorted(final.glob("*.safetensors")):
        want.update(load_file(str(shard)))
    got = load_file(str(dump))
    initial = load_file(str(char_moe / "model.safetensors"))
    assert set(got) == set(want) == set(initial)
    experts = [
        f"model.layers.1.mlp.experts.{e}.{w}_proj.weight"
        for e in range(4)
        for w in ("gate", "up", "down")
    ]
    assert set(experts) <= set(got)  # SGLang's per-expert names, all 4 experts of both EP ranks
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert all(not torch.equal(got[n], initial[n]) for n in experts)  # stepped, not the start


REPLAY_WORKER = Path(__file__).resolve().parent / "dist_workers" / "routing_replay_worker.py"


def _hf_response_logprobs(model, prompt, response) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt) - 1 :]


def _engine_samples(hf_dir: Path) -> list:
    """Six samples (3 prompts x 2) of the embedded engine with routes, no EOS (full length)."""
    from megatron_gvpo.rollout.base import GenerateRequest, SamplingParams
    from megatron_gvpo.rollout.local import LocalEngine

    engine = LocalEngine(hf_dir, return_routes=True, eos_token_ids=[])
    g = torch.Generator().manual_seed(3)
    requests = [
        GenerateRequest(torch.randint(0, 100, (n,), generator=g).tolist(), 2, seed=n)
        for n in (3, 7, 5)
    ]
    return [s for group in engine.generate(requests, SamplingParams(max_new_tokens=6)) for s in group]


class _HFRoutes:
    """transformers' qwen3_moe router, spied on (the top-k it chose per layer) or forced to
    given experts (rows of -1: its own choice)."""

    def __init__(self):
        from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_moe

        self.cls, self.original = hf_moe.Qwen3MoeTopKRouter, hf_moe.Qwen3MoeTopKRouter.forward
        self.seen: list[torch.Tensor] = []
        self.forced: list[torch.Tensor] = []  # per MoE layer, in order

    @contextlib.contextmanager
    def spying(self):
        self.seen = []

        def spy(router, hidden):
            logits, scores, indices = self.original(router, hidden)
            self.seen.append(indices)
            return logits, scores, indices

        self.cls.forward = spy
        try:
            yield self
        finally:
            self.cls.forward = self.original

    @contextlib.contextmanager
    def forcing(self, routes: list[torch.Tensor]):
        calls = iter(routes)

        def force(router, hidden):
            hidden = hidden.reshape(-1, router.hidden_dim)
            logits = torch.nn.functional.linear(hidden, router.weight)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            target = next(calls)
            own = probs.topk(router.top_k, dim=-1).indices
            free = (target < 0).any(-1, keepdim=True)
            indices = torch.where(free, own, target[: own.shape[0]])
            top = probs.gather(-1, indices)
            top = top / top.sum(-1, keepdim=True) if router.norm_topk_prob else top
            return logits, top.to(logits.dtype), indices

        self.cls.forward = force
        try:
            yield self
        finally:
            self.cls.forward = self.original


@pytest.fixture(scope="module")
def replay_run(tiny_moe, tmp_path_factory):
    """One torchrun (EP2) of the routing-replay worker: the ``old`` part on its own batch and the
    ``rollout`` part on the embedded engine's samples (generated here, routes included)."""
    tmp = tmp_path_factory.mktemp("replay")
    samples = _engine_samples(tiny_moe)
    engine_file = tmp / "engine.safetensors"
    rows = {"prompts": [s.prompt_ids for s in samples], "responses": [s.response_ids for s in samples]}
    save_file(
        {f"routes.{i}": s.routes.contiguous() for i, s in enumerate(samples)},
        str(engine_file),
        metadata={"batch": json.dumps(rows)},
    )
    out = tmp / "replay.safetensors"
    run_torchrun(
        REPLAY_WORKER, 2, "--hf-dir", str(tiny_moe), "--out", str(out),
        "--engine-samples", str(engine_file),
    )
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    return samples, load_file(str(out)), meta


def test_local_engine_routes_are_transformers_top_k(tiny_moe):
    """The embedded engine's routes (batched, left-padded, decoded with a KV cache) equal the
    top-k transformers' router picks in an independent forward of the whole sequence, for every
    token but the last; the layout is [MoE layers, tokens, k]."""
    from transformers import AutoModelForCausalLM

    arch = read_hf_config(tiny_moe)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe)).eval()
    hf = _HFRoutes()
    for s in _engine_samples(tiny_moe):
        ids = s.prompt_ids + s.response_ids
        assert s.routes.dtype == torch.int32
        assert tuple(s.routes.shape) == (sum(arch.moe_layers), len(ids) - 1, arch.moe_router_topk)
        with torch.no_grad(), hf.spying():
            model(input_ids=torch.tensor([ids]))
        want = torch.stack(hf.seen)[:, :-1]
        assert torch.equal(s.routes.long().sort(-1).values, want.sort(-1).values)


@pytest.mark.slow
def test_routing_replay_routes_every_update_like_theta_prime(tiny_moe, replay_run):
    """Routes recorded at EP2 are transformers' top-k; after the router is perturbed, a pass
    under another placement with replay routes exactly those experts (its logprobs equal
    transformers forced to them) while without replay (the negative control) routes change."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_moe

    _, saved, meta = replay_run
    layer, batch = int(meta["layer"]), json.loads(meta["batch"])
    assert int(meta["micro_batches"]) > 2  # the replayed pass used another placement
    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe)).eval()
    hf_router = model.model.layers[layer].mlp.gate

    # 1. The recorded routes are transformers' own top-k under the unperturbed router.
    seen = {}
    original_forward = hf_moe.Qwen3MoeTopKRouter.forward

    def spy(self, hidden):
        logits, scores, indices = original_forward(self, hidden)
        seen["indices"] = indices
        return logits, scores, indices

    forced = {}

    def force(self, hidden):
        hidden = hidden.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top = probs.gather(-1, forced["indices"])
        top = top / top.sum(-1, keepdim=True) if self.norm_topk_prob else top
        return logits, top.to(logits.dtype), forced["indices"]

    changed = 0
    with torch.no_grad():
        for i, (prompt, response) in enumerate(
            zip(batch["prompts"], batch["responses"], strict=True)
        ):
            hf_moe.Qwen3MoeTopKRouter.forward = spy
            try:
                model(input_ids=torch.tensor([prompt + response]))
            finally:
                hf_moe.Qwen3MoeTopKRouter.forward = original_forward
            routes = saved[f"routes.{i}"]
            assert torch.equal(routes.sort(-1).values, seen["indices"].sort(-1).values), i
            changed += int(
                (saved[f"free_routes.{i}"].sort(-1).values != routes.sort(-1).values).any(-1).sum()
            )

        # 2. Perturbed router, the recorded routes forced: equals the replayed pass.
        hf_router.weight.copy_(saved["router_weight"])
        for i, (prompt, response) in enumerate(
            zip(batch["prompts"], batch["responses"], strict=True)
        ):
            forced["indices"] = saved[f"routes.{i}"]
            hf_moe.Qwen3MoeTopKRouter.forward = force
            try:
                want = _hf_response_logprobs(model, prompt, response)
            finally:
                hf_moe.Qwen3MoeTopKRouter.forward = original_forward
            got = saved[f"replayed.{i}"].double()
            assert (got - want).abs().max() < 1e-4, i
    # 3. Negative control: without replay the perturbed router routes some tokens elsewhere,
    # which is what the replayed pass reported as flips.
    assert changed > 0 and float(meta["flips"]) > 0
    diff = max(
        (saved[f"free.{i}"] - saved[f"replayed.{i}"]).abs().max().item()
        for i in range(len(batch["prompts"]))
    )
    assert diff > 1e-3


@pytest.mark.slow
def test_rollout_routing_replay_routes_theta_prime_as_the_engine_did(tiny_moe, replay_run):
    """routing_replay=rollout: after the router is perturbed, the theta' pass (small
    micro-batches over two DP ranks at EP2) replays the embedded engine's routes exactly: its
    logprobs equal transformers' with the perturbed router forced to the engine's routes (the
    last token, which has none, routed freely). Negative control: without replay the perturbed
    router routes some tokens elsewhere and the logprobs move."""
    from transformers import AutoModelForCausalLM

    samples, saved, meta = replay_run
    layer = int(meta["layer"])
    assert int(meta["rollout.micro_batches"]) > 2
    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe)).eval()
    with torch.no_grad():
        model.model.layers[layer].mlp.gate.weight.copy_(saved["router_weight"])
    hf = _HFRoutes()
    changed, moved = 0, 0.0
    for i, s in enumerate(samples):
        ids = s.prompt_ids + s.response_ids
        target = torch.full((len(ids), s.routes.shape[-1]), -1, dtype=torch.long)
        target[: len(ids) - 1] = s.routes[0].long()  # the tiny model's one MoE layer
        with torch.no_grad(), hf.forcing([target]):
            want = _hf_response_logprobs(model, s.prompt_ids, s.response_ids)
        got = saved[f"rollout.replayed.{i}"].double()
        assert (got - want).abs().max() < 1e-4, i
        free = saved[f"rollout.free_routes.{i}.{layer}"][: len(ids) - 1]
        changed += int((free.sort(-1).values != target[:-1].sort(-1).values).any(-1).sum())
        moved = max(moved, (saved[f"rollout.free.{i}"] - saved[f"rollout.replayed.{i}"]).abs().max().item())
    assert changed > 0 and moved > 1e-3
    assert 0 <= float(meta["rollout.flips"]) <= 1


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["parallel.ep=2"], "parallel.ep"),
        (["model.moe.routing_replay=old"], "model.moe.routing_replay"),  # the demo is dense
        (["model.moe.routing_replay=rollout"], "model.moe.routing_replay"),
    ],
)
def test_bad_moe_settings_fail_before_any_model_is_built(tmp_path, overrides, key):
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_GVPO_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for k in ("WORLD_SIZE", "RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "megatron_gvpo.train", f"trainer.run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        cmd + overrides, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr
    assert not (tmp_path / "cache").exists()  # no demo model was built


def test_rollout_routing_replay_config_errors_name_the_key(tiny_moe):
    """routing_replay=rollout: a one-line error naming the key, at validation (no model built),
    for a dense model, for preference training (no rollouts) and for replayed older groups (no
    engine routes); the MoE model with rollouts validates."""
    from megatron_gvpo.trainer.config import run_config_from_dict

    moe = {"path": str(tiny_moe), "moe": {"routing_replay": "rollout"}}
    dense = save_tiny_hf_model(tiny_moe.parent / "dense", "qwen3", seed=1)
    cases = [
        ({"model": {**moe, "path": str(dense)}}, "needs a mixture-of-experts model"),
        ({"model": moe, "algorithm": {"name": "dpo"}, "data": {"builtin": "preference_demo"}},
         "preference training has no rollouts"),
        ({"model": moe, "trainer": {"max_steps": 1, "replay_ratio": 0.5}},
         "carry no engine routes"),
    ]
    base = {"trainer": {"max_steps": 1}, "rollout": {"n_samples_per_prompt": 2},
            "data": {"builtin": "toy_addition"}}
    for raw, why in cases:
        with pytest.raises(ValueError, match=f"model.moe.routing_replay.*{why}") as err:
            run_config_from_dict({**base, **raw})
        assert "\n" not in str(err.value)
    run_config_from_dict({**base, "model": moe})


AUX_WORKER = Path(__file__).resolve().parent / "dist_workers" / "moe_aux_worker.py"


def test_router_loss_gradient_is_the_step_token_mean(tiny_moe, tmp_path):
    """With only the load-balancing loss (coeff c), the router weight's gradient over a step of
    micro-batches equals d/dW of c x sum_mb (T_mb / T) aux_mb in float64, aux_mb being
    megatron-core's documented switch loss E x sum_i f_i P_i of the micro-batch (f_i: share of
    its T_mb x k routes to expert i, P_i: its mean softmax probability of expert i)."""
    coeff = 0.5
    out = tmp_path / "aux.safetensors"
    run_torchrun(AUX_WORKER, 1, "--hf-dir", str(tiny_moe), "--coeff", str(coeff), "--out", str(out))
    saved = load_file(str(out))
    arch = read_hf_config(tiny_moe)
    e, k = arch.num_experts, arch.moe_router_topk
    weight = saved["weight"].double().requires_grad_(True)
    inputs = [saved[f"input.{i}"].double() for i in range(2)]
    total_tokens = sum(x.shape[0] for x in inputs)
    loss = 0.0
    for x in inputs:
        t = x.shape[0]
        probs = torch.softmax(x @ weight.T, dim=-1)
        top = probs.detach().topk(k, dim=-1).indices
        counts = torch.zeros(e, dtype=torch.float64).scatter_add_(
            0, top.flatten(), torch.ones(t * k, dtype=torch.float64)
        )
        aux = e * ((counts / (t * k)) * probs.mean(0)).sum()
        loss = loss + coeff * aux * t / total_tokens
    loss.backward()
    want, got = weight.grad, saved["grad"].double()
    assert want.norm() > 0
    assert ((got - want).norm() / want.norm()).item() < 1e-5
