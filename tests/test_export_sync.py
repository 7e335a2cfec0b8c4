"""Weight sync (bridge/export.py, bridge/fp8.py) and the local rollout engine (rollout/local.py).

References: the HF safetensors source files (bitwise), transformers' forward, ``generate`` and its
FP8 integration (``Fp8Quantize``, ``_dequantize_fp8_weight``, and loading an FP8 checkpoint when
accelerate is installed), and float64 formulas for sampling and FP8 error bounds. The multi-rank
test runs a Megatron actor at TP2 x PP2 on CPU (gloo) under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from megatron_gvpo.bridge.fp8 import (
    FP8_DTYPE,
    dequantize_blockwise,
    fp8_quantization_config,
    quantize_blockwise,
    quantize_named,
)
from megatron_gvpo.models.tiny import save_tiny_hf_model
from megatron_gvpo.rollout.base import GenerateRequest, SamplingParams
from megatron_gvpo.rollout.local import LocalEngine

WORKER = REPO / "tests" / "dist_workers" / "export_sync_worker.py"
BUCKET_BYTES = 40_000  # as in the worker
DIST_FAMILIES = ("llama", "qwen2")  # untied lm_head sent from the last stage; tied + qkv bias


def _char(i: int) -> str:
    return chr(0x100 + i)  # printable letters, one per token id


def add_char_tokenizer(folder: Path, vocab_size: int = 250) -> None:
    """A tokenizer.json decoding token i to one character, so stop strings can be tested."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({_char(i): i for i in range(vocab_size)}, unk_token=_char(0)))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread, so a shared CPU does not stall every op (restored)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny qwen2 folders: A and B differ only in their random seed; A has a tokenizer."""
    root = tmp_path_factory.mktemp("sync")
    a = save_tiny_hf_model(root / "a", "qwen2", seed=0)
    add_char_tokenizer(a)
    return {"a": a, "b": save_tiny_hf_model(root / "b", "qwen2", seed=3)}


@pytest.fixture(scope="module")
def engine(models) -> LocalEngine:
    return LocalEngine(models["a"], max_batch_size=1024)


@pytest.fixture(scope="module")
def hf_model(models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(models["a"]), dtype=torch.float32).eval()


PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 7, 8, 200, 11, 12, 13], [1]]


def _requests(n: int = 2, seed0: int = 0) -> list[GenerateRequest]:
    return [GenerateRequest(p, n=n, seed=seed0 + i) for i, p in enumerate(PROMPTS)]


def _ref_logprobs(hf_model, prompt, response, temperature) -> torch.Tensor:
    """transformers, no cache, one sequence: log_softmax(logits / T) of each response token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


# ---- FP8 ---------------------------------------------------------------------------------------


def _e4m3_bound(x: torch.Tensor, scale_inv_full: torch.Tensor) -> torch.Tensor:
    """Worst-case |dequant - x| per element for round-to-nearest e4m3 with scale s per block.

    y = x / s has |y| <= 448. e4m3 has 3 mantissa bits: a normal y (|y| >= 2^-6) is off by at most
    half an ulp = 2^-4 |y|; a subnormal one by half the spacing 2^-9, i.e. 2^-10. Times s:
    2^-4 |x| + 2^-10 s; 2^-22 |x| covers the float32 division and product. (Since |x| <= 448 s,
    this implies the per-block bound (2^-4 + 2^-10 / 448) * amax.)
    """
    x64, s64 = x.double(), scale_inv_full.double()
    return 2.0**-4 * x64.abs() + 2.0**-10 * s64 + 2.0**-22 * x64.abs()


def _expand_scales(s: torch.Tensor, shape, block=(128, 128)) -> torch.Tensor:
    rows, cols = shape[-2:]
    return s.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :rows, :cols]


def _block_amax_f64(w: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """Per-block max |w| by explicit loops, float64."""
    *lead, rows, cols = w.shape
    flat = w.double().reshape(-1, rows, cols)
    out = torch.zeros(flat.shape[0], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    out = out.double()
    for e in range(flat.shape[0]):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                blk = flat[e, i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
                out[e, i, j] = blk.abs().max()
    return out.reshape(*lead, *out.shape[1:])


def _fp8_test_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 200, generator=g)  # partial blocks on both dims
    a[128:256, :128] = 0  # an all-zero block
    a[:128, 128:] *= torch.logspace(-6, 0, 72)  # wide dynamic range: subnormals in the block
    b = torch.randn(256, 384, generator=g, dtype=torch.float64).to(torch.bfloat16)
    c = torch.randn(3, 130, 129, generator=g)  # leading (expert) dim
    return [a, b, c]


@pytest.mark.parametrize("idx", [0, 1, 2], ids=["300x200", "bf16-256x384", "3x130x129"])
def test_fp8_roundtrip_within_e4m3_bound(idx):
    w = _fp8_test_weights()[idx]
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    grid = (*w.shape[:-2], math.ceil(w.shape[-2] / 128), math.ceil(w.shape[-1] / 128))
    assert s.dtype == torch.float32 and tuple(s.shape) == grid
    amax = _block_amax_f64(w)
    want = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    assert torch.allclose(s.double(), want, rtol=2**-23, atol=0)
    deq = dequantize_blockwise(q, s)
    err = (deq.double() - w.double()).abs()
    bound = _e4m3_bound(w, _expand_scales(s, w.shape))
    assert bool((err <= bound).all()), (err - bound).max()
    assert err.max() > 0.25 * (2.0**-4 * amax.max())  # the bound is not vacuous: real rounding


def test_fp8_dequantize_matches_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    for w in _fp8_test_weights():
        q, s = quantize_blockwise(w)
        ref = _dequantize_fp8_weight(q.clone(), s, [128, 128], torch.float32)
        assert torch.equal(dequantize_blockwise(q, s), ref)


def test_fp8_names_and_values_match_transformers_quantizer():
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    hf = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config()))
    name = "model.layers.3.mlp.up_proj.weight"
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1))
    ref = hf.convert({name: w})
    ours = dict(quantize_named(name, w))
    assert sorted(ours) == sorted(ref) == [name, "model.layers.3.mlp.up_proj.weight_scale_inv"]
    scale = name + "_scale_inv"
    assert ours[scale].shape == ref[scale].shape == (2, 3)
    assert torch.allclose(ours[scale], ref[scale], rtol=2**-22, atol=0)
    assert torch.equal(ours[name].float(), ref[name].float())


def test_fp8_leaves_norms_embeddings_head_and_biases_alone():
    cases = {
        "model.embed_tokens.weight": torch.randn(250, 64),
        "lm_head.weight": torch.randn(250, 64),
        "model.norm.weight": torch.randn(64),
        "model.layers.0.input_layernorm.weight": torch.randn(64),
        "model.layers.0.self_attn.q_norm.weight": torch.randn(32),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(64),
    }
    for name, t in cases.items():
        assert quantize_named(name, t) == [(name, t)], name
    for proj in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ):
        name = f"model.layers.1.{proj}.weight"
        out = quantize_named(name, torch.randn(64, 64))
        assert [n for n, _ in out] == [name, f"model.layers.1.{proj}.weight_scale_inv"]
        assert out[0][1].dtype == FP8_DTYPE
    cfg = fp8_quantization_config()
    assert cfg["quant_method"] == "fp8" and cfg["fmt"] == "e4m3"
    assert cfg["weight_block_size"] == [128, 128] and cfg["activation_scheme"] == "dynamic"


def _fp8_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        out.update(quantize_named(name, t))
    return out


def test_fp8_checkpoint_loads_in_transformers_like_in_the_engine(tmp_path):
    """Our FP8 tensors + quantization_config as a checkpoint: transformers dequantises it as the
    engine does (multi-block grids: hidden 256, intermediate 384)."""
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    from transformers import AutoModelForCausalLM

    src = save_tiny_hf_model(tmp_path / "src", "llama", hidden_size=256, intermediate_size=384)
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    state = _fp8_state(src)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(fp8_dir / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = fp8_quantization_config()
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    ref = AutoModelForCausalLM.from_pretrained(str(fp8_dir), dtype=torch.float32)
    eng = LocalEngine(src)
    eng.update_weights([list(state.items())], version=4)
    ref_params = dict(ref.named_parameters())
    for name, p in eng.model.named_parameters():
        assert torch.equal(p, ref_params[name].to(p.dtype)), name


# ---- local engine: generation ------------------------------------------------------------------


def test_greedy_matches_transformers_generate(engine, hf_model):
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    out = engine.generate(_requests(n=1), sp)
    for req, (s,) in zip(_requests(n=1), out, strict=True):
        ref = hf_model.generate(
            torch.tensor([req.prompt_ids]), max_new_tokens=8, do_sample=False, pad_token_id=0
        )[0, len(req.prompt_ids) :].tolist()
        assert s.response_ids == ref
        assert s.finish_reason == "length" and len(s.logprobs) == 8
        want = _ref_logprobs(hf_model, req.prompt_ids, s.response_ids, 1.0)  # greedy: T = 1
        assert torch.allclose(torch.tensor(s.logprobs).double(), want, atol=1e-5)


def test_sampled_logprobs_are_tempered_and_untruncated(engine, hf_model):
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.8, top_k=30)
    for req, group in zip(_requests(), engine.generate(_requests(), sp), strict=True):
        for s in group:
            want = _ref_logprobs(hf_model, s.prompt_ids, s.response_ids, 0.7)
            assert torch.allclose(torch.tensor(s.logprobs).double(), want, atol=1e-5)
            assert s.prompt_ids == req.prompt_ids and s.weight_version == engine.weight_version


def test_samples_stay_inside_top_k_and_top_p(engine, hf_model):
    """Every drawn token is in the float64 reference's top-k, then top-p, set."""
    k, top_p, temp = 20, 0.6, 1.3
    sp = SamplingParams(max_new_tokens=6, temperature=temp, top_p=top_p, top_k=k)
    for group in engine.generate(_requests(n=4), sp):
        for s in group:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            with torch.no_grad():
                logits = hf_model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1].double()
            for t, row in zip(s.response_ids, logits, strict=True):
                p, order = torch.softmax(row / temp, -1).sort(descending=True)
                p = p[:k] / p[:k].sum()
                kept = order[:k][(p.cumsum(0) - p) < top_p]
                assert t in kept.tolist()


def test_sampling_frequencies_follow_the_truncated_distribution(engine, hf_model):
    """2000 one-token draws vs the float64 top-k renormalised probabilities (4.5 sigma)."""
    prompt, k, temp, n = [5, 17, 42, 9], 4, 0.9, 2000
    sp = SamplingParams(max_new_tokens=1, temperature=temp, top_k=k)
    (group,) = engine.generate([GenerateRequest(prompt, n=n, seed=123)], sp)
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    p, order = torch.softmax(logits / temp, -1).sort(descending=True)
    p = p[:k] / p[:k].sum()
    counts = torch.zeros(k, dtype=torch.float64)
    for s in group:
        counts[order[:k].tolist().index(s.response_ids[0])] += 1
    sigma = (n * p * (1 - p)).sqrt()
    assert bool(((counts - n * p).abs() <= 4.5 * sigma).all()), (counts, n * p)


def test_each_prompt_is_prefilled_once_and_its_samples_decode_from_copies(models, hf_model):
    """The first forward of a batch holds each distinct prompt once (a batch boundary may cut a
    request's samples: both parts prefill it); every sample's logprobs are still those of an
    independent no-cache forward of its own sequence."""
    small = LocalEngine(models["a"], max_batch_size=5)  # 8 samples: batches of 5 and 3
    widths, original = [], small.model.forward

    def spy(*args, **kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    small.model.forward = spy
    sp = SamplingParams(max_new_tokens=4, temperature=1.0)
    reqs = [GenerateRequest([5, 17, 42, 9], n=3, seed=1), GenerateRequest([100, 3], n=5, seed=2)]
    out = small.generate(reqs, sp)
    # rows sorted by prompt length: [100, 3] x5, then [5, 17, 42, 9] x3, in batches of 5 and 3
    prefills = [w for w in widths if w[1] > 1]
    assert prefills == [(1, 2), (1, 4)]
    assert [w[0] for w in widths if w[1] == 1] and all(w[0] in (5, 3) for w in widths if w[1] == 1)
    for req, group in zip(reqs, out, strict=True):
        assert len(group) == req.n and len({tuple(s.response_ids) for s in group}) > 1
        for s in group:
            want = _ref_logprobs(hf_model, req.prompt_ids, s.response_ids, 1.0)
            assert torch.allclose(torch.tensor(s.logprobs).double(), want, atol=1e-5)


def _by_seed(requests, out) -> dict:
    return {
        (req.seed, j): (s.response_ids, s.logprobs)
        for req, group in zip(requests, out, strict=True)
        for j, s in enumerate(group)
    }


def test_seeded_generation_is_reproducible_across_batch_composition(models, engine):
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95)
    reqs = _requests(n=2, seed0=50)
    first = _by_seed(reqs, engine.generate(reqs, sp))
    assert _by_seed(reqs, engine.generate(reqs, sp)) == first
    # Other order, an extra request, smaller batches: same response for each (seed, j).
    other = [GenerateRequest([9] * 11, n=2, seed=7), *reversed(reqs)]
    small = LocalEngine(models["a"], max_batch_size=3)
    second = _by_seed(other, small.generate(other, sp))
    for key, (ids, lps) in first.items():
        assert second[key][0] == ids, key
        assert torch.allclose(torch.tensor(second[key][1]), torch.tensor(lps), atol=1e-5)
    assert len({tuple(v[0]) for v in first.values()}) > len(PROMPTS)  # responses do differ


def _greedy_reference(engine, prompt, n_tokens=12) -> list[int]:
    sp = SamplingParams(max_new_tokens=n_tokens, temperature=0.0)
    return engine.generate([GenerateRequest(prompt, n=1)], sp)[0][0].response_ids


def test_stop_token_ids_eos_and_stop_strings(models, engine):
    prompt = [7, 7, 8, 200, 11, 12, 13]
    ref = _greedy_reference(engine, prompt)
    # stop_token_ids: stops at the first occurrence, the stop token is kept.
    stop_tok = ref[3]
    cut = ref.index(stop_tok) + 1
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop_tok])
    (s,) = engine.generate([GenerateRequest(prompt, n=1)], sp)[0]
    assert s.response_ids == ref[:cut] and s.finish_reason == "stop" and len(s.logprobs) == cut
    # eos from the engine's settings behaves the same.
    eos_engine = LocalEngine(models["a"], eos_token_ids=[stop_tok])
    (s,) = eos_engine.generate([GenerateRequest(prompt, n=1)], SamplingParams(12, 0.0))[0]
    assert s.response_ids == ref[:cut] and s.finish_reason == "stop"
    # A stop string: text is cut before it, tokens end with the one completing it.
    text = "".join(_char(t) for t in ref)
    stop = text[4:6]
    end = text.index(stop)
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, stop=["not-there", stop])
    (s,) = engine.generate([GenerateRequest(prompt, n=1)], sp)[0]
    assert s.finish_reason == "stop"
    assert s.response_ids == ref[: end + len(stop)] and s.text == text[:end]
    # No stop: length, full text.
    (s,) = engine.generate([GenerateRequest(prompt, n=1)], SamplingParams(12, 0.0))[0]
    assert s.finish_reason == "length" and s.text == text


# ---- local engine: weights and errors ----------------------------------------------------------


def test_update_weights_from_hf_tensors_makes_the_models_agree(models):
    """Engine B loaded with A's tensors (bf16 in transit, cast back): same greedy samples as A."""
    src = load_file(str(models["a"] / "model.safetensors"))
    eng_b = LocalEngine(models["b"], tokenizer=None)
    eng_a = LocalEngine(models["a"])
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert _greedy_reference(eng_b, PROMPTS[0]) != _greedy_reference(eng_a, PROMPTS[0])
    items = list(src.items())
    eng_b.update_weights([items[i : i + 5] for i in range(0, len(items), 5)], version=3)
    assert eng_b.weight_version == 3
    state = dict(eng_b.model.named_parameters())
    for name, t in src.items():
        assert torch.equal(state[name], t), name
    out_a, out_b = eng_a.generate(_requests(), sp), eng_b.generate(_requests(), sp)
    assert [[s.response_ids for s in g] for g in out_a] == [
        [s.response_ids for s in g] for g in out_b
    ]
    assert out_b[0][0].weight_version == 3


def test_update_weights_errors_name_the_tensor(models):
    eng = LocalEngine(models["b"])
    w = torch.zeros(64, 64)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.nope.weight"):
        eng.update_weights([[("model.layers.0.self_attn.nope.weight", w)]], version=1)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight.*\(64, 64\)"):
        eng.update_weights([[("model.layers.0.mlp.up_proj.weight", w)]], version=1)
    name = "model.layers.0.mlp.up_proj.weight"
    q, _ = quantize_blockwise(torch.randn(96, 64))
    with pytest.raises(ValueError, match=name + "_scale_inv"):
        eng.update_weights([[(name, q)]], version=1)
    with pytest.raises(ValueError, match="scale_inv shape"):
        eng.update_weights([[(name, q), (name + "_scale_inv", torch.ones(2, 2))]], version=1)
    with pytest.raises(KeyError, match="model.layers.0.mlp.nope.weight_scale_inv"):
        eng.update_weights([[("model.layers.0.mlp.nope.weight_scale_inv", torch.ones(1, 1))]], 1)
    assert eng.weight_version == -1  # no failed update changes the version


def test_model_path_errors(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocalEngine(tmp_path / "missing")
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    shutil.copy(models["a"] / "config.json", bin_only / "config.json")
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LocalEngine(bin_only)


def test_bad_requests_and_lifecycle(models):
    eng = LocalEngine(models["b"])
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([GenerateRequest([5, 250], n=1)], SamplingParams(2))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.generate([GenerateRequest([5], n=1)], SamplingParams(2, stop=["x"]))
    assert eng.health()
    eng.shutdown()
    eng.shutdown()
    assert not eng.health()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.generate([GenerateRequest([5], n=1)], SamplingParams(2))


def test_pack_buckets_respects_size_and_keeps_pairs_together():
    from megatron_gvpo.bridge.export import bucket_nbytes, pack_buckets

    sizes = [10, 30, 25, 100, 5, 5, 60, 1]  # float32 elements
    items = [[(f"t{i}", torch.zeros(n))] for i, n in enumerate(sizes)]
    items[2].append(("t2_scale_inv", torch.zeros(3)))
    buckets = list(pack_buckets(items, bucket_bytes=160))
    names = [n for b in buckets for n, _ in b]
    assert names == [n for it in items for n, _ in it]
    for b in buckets:
        assert bucket_nbytes(b) <= 160 or len(b) == 1
    assert any(("t2", "t2_scale_inv") == tuple(n for n, _ in b[-2:]) for b in buckets)
    # Streaming: when a bucket is handed out, at most one item beyond it has been pulled.
    pulled = []

    def source():
        for it in items:
            pulled.append(it)
            yield it

    seen = 0
    for b in pack_buckets(source(), bucket_bytes=160):
        seen += len(b)
        assert sum(len(it) for it in pulled) <= seen + 2  # + the next item (a weight and scale)


# ---- TP2 x PP2 actor -> engine on rank 0 (torchrun, gloo) --------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory) -> tuple[Path, dict]:
    """Run the worker once for every family; returns (output folder, {family: (A, B)})."""
    root = tmp_path_factory.mktemp("dist_sync")
    pairs = {
        f: (
            save_tiny_hf_model(root / f"{f}_actor", f, seed=0),
            save_tiny_hf_model(root / f"{f}_engine", f, seed=9),
        )
        for f in DIST_FAMILIES
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER),
        "--out", str(root / "out"),
    ]  # fmt: skip
    for f, (a, b) in pairs.items():
        cmd += ["--pair", f, str(a), str(b)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root / "out", pairs


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("family", DIST_FAMILIES)
def test_engine_logprobs_match_actor_after_sync(dist_run, family):
    out, _ = dist_run
    r = json.loads((out / family / "logprobs.json").read_text())
    assert (r["tp"], r["pp"], r["weight_version"]) == (2, 2, 1)
    for case in ("greedy", "sampled"):
        assert sum(len(x) for x in r["after"][case]) >= 30
        assert _max_diff(r["after"][case], r["actor_after"][case]) <= 1e-4, case
        # The engine started from another model: before the sync it disagreed with the actor.
        assert _max_diff(r["before"][case], r["actor_before"][case]) > 1e-2, case


@pytest.mark.slow
@pytest.mark.parametrize("family", DIST_FAMILIES)
def test_sync_exports_each_tensor_once_bitwise_in_buckets(dist_run, family):
    out, pairs = dist_run
    src = load_file(str(pairs[family][0] / "model.safetensors"))
    engine_src = load_file(str(pairs[family][1] / "model.safetensors"))
    log = json.loads((out / family / "fp32_buckets.json").read_text())
    names = [n for b in log["buckets"] for n in b["names"]]
    assert log["duplicates"] == [] and len(names) == len(set(names)) == len(src)
    assert set(names) == set(src)
    assert len(log["buckets"]) >= 10
    for b in log["buckets"]:
        assert b["nbytes"] <= BUCKET_BYTES or len(b["names"]) == 1, b
    exported = load_file(str(out / family / "fp32_exported.safetensors"))
    engine = load_file(str(out / family / "fp32_engine.safetensors"))
    for name, t in src.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
        assert torch.equal(engine[name], t), name
    assert any(not torch.equal(engine_src[n], src[n]) for n in src)


@pytest.mark.slow
@pytest.mark.parametrize("family", DIST_FAMILIES)
def test_per_stage_export_covers_the_model_once(dist_run, family):
    """TP ranks of a stage get identical tensors; the two stages split the HF tensors."""
    out, pairs = dist_run
    src = load_file(str(pairs[family][0] / "model.safetensors"))
    ranks = [load_file(str(out / family / f"stage_rank{r}.safetensors")) for r in range(4)]
    # megatron's default order: TP fastest, then DP (1), then PP -> ranks (0, 1) stage 0.
    stages = [ranks[0], ranks[2]]
    for a, b in ((ranks[0], ranks[1]), (ranks[2], ranks[3])):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not set(stages[0]) & set(stages[1])
    assert set(stages[0]) | set(stages[1]) == set(src)
    assert "model.embed_tokens.weight" in stages[0] and "model.norm.weight" in stages[1]
    for stage in stages:
        for name, t in stage.items():
            assert torch.equal(t, src[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("family", DIST_FAMILIES)
def test_fp8_sync_names_shapes_and_error_bound(dist_run, family):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    out, pairs = dist_run
    src = load_file(str(pairs[family][0] / "model.safetensors"))
    exported = load_file(str(out / family / "fp8_exported.safetensors"))
    engine = load_file(str(out / family / "fp8_engine.safetensors"))
    assert (out / family / "done").read_text() == "2"
    quantised = {n for n in src if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    assert len(quantised) == 7 * 4
    assert set(exported) == set(src) | {n + "_scale_inv" for n in quantised}
    for name, t in src.items():
        if name not in quantised:
            assert torch.equal(exported[name], t) and torch.equal(engine[name], t), name
            continue
        q, s = exported[name], exported[name + "_scale_inv"]
        rows, cols = t.shape
        assert q.dtype == torch.float8_e4m3fn and q.shape == t.shape
        assert s.dtype == torch.float32 and s.shape == (
            math.ceil(rows / 128),
            math.ceil(cols / 128),
        )
        ref = _dequantize_fp8_weight(q.clone(), s, [128, 128], torch.float32)
        assert torch.equal(engine[name], ref), name
        err = (engine[name].double() - t.double()).abs()
        assert bool((err <= _e4m3_bound(t, _expand_scales(s, t.shape))).all()), name
