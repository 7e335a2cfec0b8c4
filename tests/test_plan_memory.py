"""``tools/plan_memory.py``: parameter counts against transformers and megatron-core, and the
Llama-3-70B plan against a hand calculation from the published formulas.

References: parameter counts of tiny models from transformers (whole model) and from megatron-core
GPTModel stages built at TP2 x PP2 under torchrun; Llama-3-70B from its published shape; bytes per
parameter from Megatron-LM's distributed-optimizer table (bf16 params, fp32 grads: 6 + 12/D);
activations from Korthikanti et al. 2022. Not checked: ``torch.cuda.max_memory_allocated`` on a
GPU (no GPU here).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
from conftest import REPO, TOOLS, last_json, run_tool, run_torchrun

from megatron_gvpo.models.hf_config import arch_from_dict, padded_vocab_size
from megatron_gvpo.models.tiny import TINY_FAMILIES, tiny_hf_config

GiB = 2**30


def _load_tool():
    spec = importlib.util.spec_from_file_location("plan_memory", TOOLS / "plan_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plan_memory"] = mod
    spec.loader.exec_module(mod)
    return mod


pm = _load_tool()

# Llama-3-70B, published config.json
H, L, A, G, D, F, V = 8192, 80, 64, 8, 128, 28672, 128256
# The 70B run planned below: TP8 x PP4 x DP2 on 64 GPUs, distributed optimizer, bf16,
# full recompute, 16384-token micro-batches, SGLang engines on their own GPUs at TP8.
RUN_70B = [
    "--arch",
    "llama3-70b",
    "--world-size",
    "64",
    "model=hf",
    "trainer=default",
    "trainer.prompts_per_step=64",  # one 64-prompt update per round: the hand calculation below
    "trainer.updates_per_round=1",
    "data=jsonl",
    "rollout=sglang",
    "rollout.sglang.weight_sync=distributed",
    "rollout.sglang.tp_size=8",
    "parallel.tp=8",
    "parallel.pp=4",
    "model.recompute_granularity=full",
]


def test_llama3_70b_parameter_count_is_exact():
    layer = H * A * D + 2 * H * G * D + A * D * H + 3 * H * F + 2 * H  # q, k+v, o, MLP, 2 norms
    total = L * layer + 2 * V * H + H  # untied embedding and output layer, final norm
    assert total == 70_553_706_496
    assert pm.total_params(arch_from_dict(pm.ARCHS["llama3-70b"])) == total


@pytest.mark.parametrize("name", sorted(pm.ARCHS))
def test_builtin_archs_build_and_split(name):
    arch = arch_from_dict(pm.ARCHS[name])
    stages = pm.stage_params(arch, 1, 1, padded_vocab_size(arch.vocab_size, 1))
    assert stages[0].total == pm.total_params(arch) + (
        padded_vocab_size(arch.vocab_size, 1) - arch.vocab_size
    ) * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)


def test_published_sizes():
    billions = {
        n: pm.total_params(arch_from_dict(c)) / 1e9 for n, c in pm.ARCHS.items()
    }  # the sizes the model cards state
    assert round(billions["llama3-8b"], 2) == 8.03
    assert round(billions["llama3.1-405b"]) == 406
    assert round(billions["qwen3-8b"], 1) == 8.2
    assert round(billions["qwen3-0.6b"], 1) == 0.6
    assert round(billions["qwen2.5-72b"], 1) == 72.7
    assert round(billions["mistral-7b"], 2) == 7.24


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_total_matches_transformers(family):
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family)
    model = AutoModelForCausalLM.from_config(config)
    arch = arch_from_dict(config.to_dict())
    assert pm.total_params(arch) == sum(p.numel() for p in model.parameters())


def test_stage_params_match_megatron_at_tp2_pp2(tmp_path):
    """Every rank's GPTModel stage (GQA, qwen2 bias + tied embeddings, qwen3 q/k norms)."""
    out = tmp_path / "counts"
    run_torchrun(
        REPO / "tests" / "dist_workers" / "plan_params_worker.py",
        4,
        "--tp",
        "2",
        "--pp",
        "2",
        "--out",
        str(out),
    )
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(ranks) == 4
    for r in ranks:
        for family, count in r["params"].items():
            arch = arch_from_dict(tiny_hf_config(family).to_dict())
            stages = pm.stage_params(arch, 2, 2, padded_vocab_size(arch.vocab_size, 2))
            assert stages[r["pp_rank"]].total == count, (family, r)


@pytest.mark.parametrize(
    "precision,distopt,dp,per_param",
    [
        ("bf16", True, 2, 6 + 12 / 2),
        ("bf16", True, 8, 6 + 12 / 8),
        ("bf16", False, 8, 18),
        ("fp16", True, 4, 6 + 12 / 4),
        ("fp32", True, 4, 8 + 8 / 4),
        ("fp32", False, 4, 16),
    ],
)
def test_bytes_per_parameter_follow_megatron(precision, distopt, dp, per_param):
    assert sum(pm.state_bytes_per_param(precision, dp, distopt).values()) == per_param


def test_llama3_70b_tp8_pp4_matches_hand_calculation():
    code, plan, text = pm.run(RUN_70B)
    assert code == 0, text
    assert (plan.tp, plan.pp, plan.dp) == (8, 4, 2)

    t, pp, dp, tokens = 8, 4, 2, 16384
    layer = (H * (A + 2 * G) * D + A * D * H + 3 * H * F) // t + 2 * H
    emb = V // t * H  # 128256 is a multiple of 128: no padding
    first = 20 * layer + emb
    last = 20 * layer + emb + H
    assert plan.stages[0]["params"] == first == 2_270_756_864
    assert plan.stages[3]["params"] == last == 2_270_765_056

    # 64 prompts x 8 samples x (1024 + 1024) tokens per step, over DP2, in 16384-token micro-batches
    assert plan.settings["microbatches"] == math.ceil(64 * 8 * 2048 / dp / tokens) == 32
    layer_input = 2 * tokens * H  # full recompute keeps each layer's input (bf16)
    working_layer = tokens * H * (10 + 24 / t)  # one layer recomputed, flash attention, no SP
    logits = tokens * (V // t) * 2
    expected = {
        0: dict(in_flight=pp, acts=pp * 20 * layer_input + working_layer, logprob=0, p=first),
        3: dict(
            in_flight=1,
            acts=20 * layer_input + working_layer,
            logprob=2 * logits + 4 * 1024 * (V // t),
            p=last,
        ),
    }
    for i, e in expected.items():
        st, p = plan.stages[i], e["p"]
        assert st["weights"] == 2 * p
        assert st["gradients"] == 4 * p
        assert st["optimizer"] == 12 * p / dp
        assert st["in_flight_microbatches"] == e["in_flight"]
        assert st["activations"] == pytest.approx(e["acts"], rel=1e-12)
        assert st["logprob_buffers"] == e["logprob"]
        total = 6 * p + 12 * p / dp + e["acts"] + e["logprob"] + 3 * GiB
        assert st["total"] == pytest.approx(total, rel=1e-12)
    # the figures quoted in the docs
    assert round(plan.stages[0]["total"] / GiB, 2) == 50.00
    assert round(plan.stages[3]["total"] / GiB, 2) == 36.04

    engine = plan.engine  # SGLang at TP8, bf16, mem_fraction_static 0.7 of 80 GiB
    weights = 2 * 70_553_706_496 / 8
    per_token = 2 * L * 1 * D * 2  # K and V, 80 layers, 8 KV heads / TP8 = 1, bf16
    assert engine["weights"] == weights
    assert engine["kv_bytes_per_token"] == per_token
    assert engine["kv_tokens"] == int((0.7 * 80 * GiB - weights) // per_token)
    assert engine["fits"]


def test_70b_without_recompute_does_not_fit():
    code, plan, text = pm.run([a for a in RUN_70B if "recompute" not in a])
    assert code == 1
    # 4 micro-batches x 20 layers x 16384 tokens x 8192 x 13 bytes = 130 GiB on stage 0
    assert plan.stages[0]["activations"] == 4 * 20 * 16384 * H * 13
    assert "pipeline stage 0 needs" in text and "activations 130.0 GiB" in text
    assert "model.recompute_granularity=full" in text


def test_70b_at_tp1_pp1_is_rejected_by_the_command():
    code, out, err = run_tool(
        "plan_memory.py",
        "--arch",
        "llama3-70b",
        "--world-size",
        "8",
        "model=hf",
        "trainer=default",
        "data=jsonl",
        "model.recompute_granularity=full",
        expect_ok=False,
    )
    assert code == 1, err
    assert "DOES NOT FIT: pipeline stage 0 needs" in out
    plan = last_json(out)
    assert plan["fits"] is False and plan["tp"] == 1 and plan["pp"] == 1
    # weights + grads + sharded optimizer alone: (6 + 12 / 8) x 70.55 B bytes = 492.8 GiB
    assert plan["stages"]["0"]["total"] > (6 + 12 / 8) * 70_553_706_496


def test_8b_fits_on_one_node():
    code, out, err = run_tool(
        "plan_memory.py",
        "--arch",
        "llama3-8b",
        "model=hf",
        "trainer=default",
        "data=jsonl",
        "rollout=sglang",
        "rollout.sglang.weight_sync=distributed",
        "parallel.tp=2",
        "model.recompute_granularity=full",
        expect_ok=False,
    )
    assert code == 0, out + err
    plan = last_json(out)
    assert plan["fits"] and plan["world_size"] == 8 and plan["dp"] == 4
    assert plan["stages"]["0"]["total"] < 80 * GiB


def test_colocated_engine_takes_its_memory_fraction():
    args = [
        "--arch",
        "llama3-8b",
        "model=hf",
        "trainer=default",
        "data=jsonl",
        "rollout=sglang",  # weight_sync: tensor = colocated
        "parallel.tp=2",
        "model.recompute_granularity=full",
    ]
    code, plan, text = pm.run(args)
    assert code == 1 and plan.engine_placement == "colocated"
    assert plan.budget == pytest.approx(0.3 * 80 * GiB)
    assert "rollout.sglang.weight_sync=distributed" in text
    code, plan, _ = pm.run([*args, "--engine-offload"])
    assert code == 0 and plan.budget == 80 * GiB


def test_engine_that_cannot_hold_the_model_is_named():
    code, plan, text = pm.run([*RUN_70B[:-4], "rollout.sglang.tp_size=1", *RUN_70B[-3:]])
    assert code == 1 and not plan.engine["fits"]
    assert "rollout.sglang.tp_size=1" in text


def test_fp8_rollout_halves_engine_linear_weights():
    arch = arch_from_dict(pm.ARCHS["llama3-70b"])
    bf16, fp8 = pm.engine_weight_bytes(arch, False), pm.engine_weight_bytes(arch, True)
    _, gemm = pm.layer_params(arch)
    linear = L * gemm
    assert bf16 - fp8 == pytest.approx(linear * (1 - 4 / (128 * 128)))


def test_reads_the_arch_from_model_path(tiny_models):
    code, plan, text = pm.run([f"model.path={tiny_models['qwen3']}", "model.precision=fp32"])
    assert code == 0, text
    arch = arch_from_dict(tiny_hf_config("qwen3").to_dict())
    assert plan.params_total == pm.total_params(arch)


@pytest.mark.parametrize(
    "args,key",
    [
        (["--arch", "llama3-70b", "parallel.tp=3"], "num_attention_heads"),
        (["--arch", "llama3-8b", "--world-size", "6", "parallel.tp=4"], "parallel.tp"),
        (["model=hf", "model.path=/nonexistent"], "model.path"),
        (["--arch", "llama3-8b", "model.fp8.bogus=1"], "model.fp8.bogus"),
    ],
)
def test_bad_config_exits_2_naming_the_key(args, key):
    code, _, text = pm.run(args)
    assert code == 2 and key in text


# -- mixture of experts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tp,pp,ep,etp",
    [(1, 2, 2, None), pytest.param(2, 1, 2, 1, marks=pytest.mark.one_leg)],
    ids=["tp1_pp2_ep2", "tp2_ep2_etp1"],
)
def test_moe_stage_params_match_megatron_per_rank_under_ep(tmp_path, tp, pp, ep, etp):
    families = ("qwen3_moe", "qwen2_moe")
    """Each rank's built qwen3_moe and qwen2_moe GPTModel (layer 0 dense, layer 1 with 4 experts;
    qwen2_moe with a shared expert over TP) against the planner at EP2: 2 experts per rank,
    split over ETP; the expert part (megatron's ``allreduce=False`` parameters) is what the
    planner shards over the expert-data-parallel group, whose size megatron-core reports. EP1
    per rank: the TP2 x PP2 test above."""
    out = tmp_path / "counts"
    extra = ["--etp", str(etp)] if etp is not None else []
    run_torchrun(
        REPO / "tests" / "dist_workers" / "plan_params_worker.py",
        4,
        *("--tp", str(tp), "--pp", str(pp), "--ep", str(ep), *extra),
        *("--families", ",".join(families), "--out", str(out)),
    )
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(ranks) == 4
    settings = pm.Settings(tp=tp, pp=pp, dp=4 // (tp * pp), ep=ep, etp=etp)
    for family in families:
        arch = arch_from_dict(tiny_hf_config(family).to_dict())
        vocab = padded_vocab_size(arch.vocab_size, tp)
        stages = pm.stage_params(arch, tp, pp, vocab, ep, etp)
        for r in ranks:
            stage = stages[r["pp_rank"]]
            assert stage.total == r["params"][family], (family, r)
            assert stage.expert == r["expert_params"][family], (family, r)
            assert (settings.dp, settings.expert_dp) == (r["dp"], r["expert_dp"]), r
        assert any(r["expert_params"][family] for r in ranks)  # the routed layer is here
        # the negative control: counting every expert (EP1) is not what the ranks hold
        ep1 = pm.stage_params(arch, tp, pp, vocab, 1, etp)
        assert any(ep1[r["pp_rank"]].total != r["params"][family] for r in ranks)
    assert {r["ep_rank"] for r in ranks} == {0, 1}


def test_moe_total_matches_transformers_and_presets_match_the_model_cards():
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config("qwen3_moe")
    model = AutoModelForCausalLM.from_config(config)
    arch = arch_from_dict(config.to_dict())
    assert pm.total_params(arch) == sum(p.numel() for p in model.parameters())
    experts = {n for n, _ in model.named_parameters() if ".experts." in n}
    per_expert = sum(p.numel() for n, p in model.named_parameters() if n in experts) // 4
    assert pm.active_params(arch) == pm.total_params(arch) - 2 * per_expert  # top-2 of 4

    a3b = arch_from_dict(pm.ARCHS["qwen3-30b-a3b"])
    # Qwen/Qwen3-30B-A3B model card: 30.5 B parameters, 3.3 B activated
    assert pm.total_params(a3b) == pytest.approx(30.5e9, rel=0.01)
    assert pm.total_params(a3b) == 30_532_122_624
    # 3.353 B counted (embeddings, router and 8 of 128 experts per layer); the card's 3.3 B is
    # that figure cut to one decimal, 1.6 % below it
    assert pm.active_params(a3b) == 3_353_032_704
    assert math.floor(pm.active_params(a3b) / 1e8) / 10 == 3.3
    a22b = arch_from_dict(pm.ARCHS["qwen3-235b-a22b"])
    assert pm.total_params(a22b) == pytest.approx(235e9, rel=0.01)  # card: 235 B, 22 B activated
    assert pm.active_params(a22b) == pytest.approx(22e9, rel=0.01)


def _moe_hand_state(arch, tp, ep, etp, dp, world, pp=1):
    """Weights + fp32 grads + Adam state per GPU, by hand: dense parameters sharded over DP,
    expert parameters over world / (ETP EP PP) (megatron-core parallel_state)."""
    h, d, a, g = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    L, E, f = arch.num_layers, arch.num_experts, arch.moe_ffn_hidden_size
    vocab = padded_vocab_size(arch.vocab_size, tp)
    attn = (h * (a + 2 * g) * d + a * d * h) // tp + 2 * h + 2 * d + E * h
    dense = L // pp * attn + 2 * vocab // tp * h + h  # one stage (pp 1): embedding, output, norm
    expert = L // pp * (E // ep) * 3 * h * (f // etp)
    edp = world // (etp * ep * pp)
    return dense, expert, 6 * (dense + expert) + 12 * dense / dp + 12 * expert / edp


@pytest.mark.parametrize(
    "overrides,world,tp,ep,etp",
    [
        (["parallel.ep=8"], 8, 1, 8, 1),  # the script's default: expert-DP 1
        (["parallel.ep=8"], 16, 1, 8, 1),  # two training nodes: expert-DP 2
        (["parallel.tp=2", "parallel.ep=4", "parallel.etp=1"], 16, 2, 4, 1),
    ],
)
def test_moe_state_bytes_shard_experts_over_the_expert_data_parallel_group(
    overrides, world, tp, ep, etp
):
    code, plan, text = pm.run(
        [
            "--arch",
            "qwen3-30b-a3b",
            "--world-size",
            str(world),
            "model=hf",
            "trainer=default",
            "data=jsonl",
            *overrides,
        ]
    )
    assert code in (0, 1), text
    arch = arch_from_dict(pm.ARCHS["qwen3-30b-a3b"])
    dp = world // tp
    dense, expert, state = _moe_hand_state(arch, tp, ep, etp, dp, world)
    st = plan.stages[0]
    assert (st["params"], st["expert_params"]) == (dense + expert, expert)
    assert st["weights"] + st["gradients"] + st["optimizer"] == pytest.approx(state, rel=1e-12)
    assert (plan.ep, plan.etp, plan.expert_dp) == (ep, etp, world // (etp * ep))
    assert "experts: EP" in text


def test_moe_dispatch_buffers_follow_the_alltoall_dispatcher():
    """One routed layer, one micro-batch of T tokens at TP1/EP8: permute, dispatch all-to-all,
    sort and unsort (16 local experts), combine all-to-all in bf16 (5 T k h x 2 bytes), the
    fp32 prob-weighted copy T k h and the fp32 output T h."""
    arch = arch_from_dict(pm.ARCHS["qwen3-30b-a3b"])
    h, k, t = 2048, 8, 16384
    s = pm.Settings(tp=1, pp=1, dp=8, ep=8, tokens_per_microbatch=t)
    assert pm.moe_dispatch_bytes(arch, s) == 5 * t * k * h * 2 + (t * k + t) * h * 4
    # ETP2 at TP2 (sequence parallel: T / 2 tokens here, r = T k / 2 routed copies): permute r,
    # dispatch r, expert-TP all-gather 2 r, sort and unsort 2 r each, reduce-scatter r, combine r
    s2 = pm.Settings(tp=2, pp=1, dp=4, ep=4, etp=2, tokens_per_microbatch=t)
    r = t // 2 * k
    assert pm.moe_dispatch_bytes(arch, s2) == 10 * r * h * 2 + (r + t // 2) * h * 4
    dense = arch_from_dict(pm.ARCHS["qwen3-8b"])
    assert pm.moe_dispatch_bytes(dense, s) == 0
