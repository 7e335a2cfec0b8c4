"""Per-GPU memory plan of a training run, from the same Hydra config the trainer composes.

Usage::

    python tools/plan_memory.py --arch llama3-70b --world-size 64 model=hf trainer=default \\
        parallel.tp=8 parallel.pp=4 model.recompute_granularity=full
    python tools/plan_memory.py --hf-config /models/Qwen3-8B/config.json model=hf trainer=default
    python tools/plan_memory.py model=hf model.path=/models/Qwen3-8B trainer=default  # reads it

Positional arguments are Hydra overrides, exactly as for ``python -m megatron_gvpo.train``. Prints a
table and one JSON line; exit code 0 when every pipeline stage (and each rollout engine) fits in
``--gpu-memory-gb``, 1 with a message naming what does not fit, 2 for a bad config.
Sizes are GiB (2**30 bytes); an "80 GB" H100 shows torch 79.2 GiB.

Derivation (per training GPU, P = parameters of this GPU's pipeline stage on one TP rank, exact
from the architecture; D = data-parallel size):

- Parameters. Per layer and TP rank: attention ``h (a + 2 g) d / t`` (QKV, with GQA: g KV heads
  of size d) + ``a d h / t`` (output) [+ ``(a + 2 g) d / t`` QKV bias for qwen2], SwiGLU MLP
  ``3 h f / t`` (gate, up, down), two RMSNorm weights ``2 h`` (not split) [+ ``2 d`` q/k norms for
  qwen3]. The first stage adds the vocab-parallel embedding ``V h / t`` (V padded as the trainer
  pads it), the last stage the final norm ``h`` and the output layer ``V h / t``; with tied
  embeddings that is a second copy when PP > 1 (megatron keeps it on the last stage) and none at
  PP = 1.
- Mixture of experts (qwen3_moe, qwen2_moe). A routed layer replaces the MLP by ``E / EP``
  experts on this rank (``parallel.ep``), each ``3 h f_e / ETP`` (gate, up, down of width f_e =
  ``moe_intermediate_size``, split over ``parallel.etp``, default TP), plus the router ``E h``
  (replicated over TP, as megatron-core's ``TopKRouter`` holds it); qwen2_moe adds its shared
  expert, a dense MLP ``3 h f_s / t`` over TP and DP, and its gate ``h``. Dense layers
  (``mlp_only_layers``, ``decoder_sparse_step``) keep ``3 h f / t``. Active parameters per token
  count ``num_experts_per_tok`` experts per routed layer instead of E.
- Which group shards which state (megatron-core 0.16 ``parallel_state.initialize_model_parallel``,
  ``parallel_state.py:787-806``): dense parameters are replicated over the data-parallel group of
  size ``D = world / (TP PP)``; expert parameters over the expert-data-parallel group of size
  ``D_e = world / (ETP EP PP)`` (``expert_data_parallel_size = world_size //
  expert_tensor_model_pipeline_parallel_size``). DDP reduces expert gradients over the
  expert-data-parallel group (``distributed/distributed_data_parallel.py:563-566``: parameters
  with ``allreduce=False``), and the distributed optimizer shards their state over it
  (``optimizer/__init__.py:665-675``, ``intra_expt_dp_group``), so the optimizer term below is
  ``12 P_dense / D + 12 P_expert / D_e``.
- Weights, gradients, optimizer (megatron-core DDP with fp32 main grads, as
  ``parallel/ddp.py`` sets ``grad_reduce_in_fp32``; Adam). bf16 or fp16 params: 2 bytes of
  weights + 4 of fp32 gradients on every rank, plus the optimizer's fp32 master weights, Adam m and
  v = 12 bytes: 18 P without the distributed optimizer, ``6 P + 12 P / D`` with it (each DP rank
  keeps 1/D of the optimizer state). fp32 params: 4 + 4 bytes, and Adam m, v = 8 bytes (the fp32
  weights are their own master copy): ``8 P + 8 P / D`` (16 P without). A frozen reference model
  (``algorithm.kl_beta > 0``) adds its weights only.
- Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", 16-bit activations, s b = T tokens of one packed micro-batch,
  ``trainer.max_tokens_per_microbatch``): per layer ``T h (34 + 5 a s / h)`` bytes without tensor
  parallelism, ``T h (10 + 24 / t + 5 a s / (h t))`` with TP and no sequence parallelism (the trainer
  does not enable it; the 10 T h of norms and dropout are then not split). Flash/fused attention
  (TE's, the default here) and selective recompute both drop the ``5 a s`` softmax term; s is the
  longest sequence (prompt + response, capped at T) since packed sequences attend only within
  themselves. Full recompute (uniform, 1 layer) keeps only each layer's input, ``2 T h``
  bytes, plus one layer's full activations while it is recomputed. fp32 runs double all of it.
  Without dropout and with SwiGLU (f = 3.5 h) the same accounting gives about 35 T h, so 34 stands.
- 1F1B pipelining (non-interleaved): stage i holds the activations of ``min(PP - i, M)``
  micro-batches (M = micro-batches per optimizer step on a DP rank, bounded by prompts, samples,
  ``data.max_prompt_length + rollout.max_new_tokens``), so the first stage holds PP of them.
- MoE token dispatch (``model.moe.token_dispatcher``; auto is alltoall on GPUs): per micro-batch
  and routed layer, the T_l = T / TP tokens entering the layer (sequence parallel under TP) are
  copied R = T_l k times (k = ``num_experts_per_tok``). What megatron-core 0.16 allocates
  (``transformer/moe/token_dispatcher.py`` ``MoEAlltoAllTokenDispatcher``, balanced routing):
  permutation 1 ``permute`` (``moe_utils.py:375``, ``index_select``) R h; the dispatch
  ``all_to_all`` output (``token_dispatcher.py:666``) R h; with ETP > 1 the all-gather over the
  expert-TP group (``:696``) R ETP h; permutation 2 ``sort_chunks_by_idxs`` when a rank holds more
  than one expert (``:732``, ``moe_utils.py:506`` ``torch.cat``) R ETP h; on the way back the
  unsort (``:767``) R ETP h, the reduce-scatter with ETP > 1 (``:779``) R h, the combine
  ``all_to_all`` (``:810``) R h, all in the model dtype; ``unpermute`` (``:833``,
  ``moe_utils.py:447-451``) multiplies by the fp32 router probabilities (``moe_router_dtype=fp32``
  promotes: R h fp32) and scatter-adds into fp32 zeros (T_l h). The allgather dispatcher instead
  gathers every token of the TP x EP group (``token_dispatcher.py:274``, T_l ETP EP h), permutes the
  ones routed here (about R ETP h), and reduce-scatters back (``:338``). The plan counts the sum of
  one routed layer's buffers once per stage (``moe_dispatch``): they live within the layer, so
  this bounds what is live at once; an unbalanced router sends more than R h to a hot expert's
  rank. The expert MLPs' saved activations are counted by the dense formula below.
- Logprob buffers (last stage, ``parallel/logprobs.py``): the logits ``[T, V / t]`` in the model
  dtype, their gradient of the same size, and one fp32 ``[chunk, V / t]`` buffer (chunk 1024).
- FP8 (``model.fp8.enabled``): an estimate of 2 bytes per GEMM weight for the FP8 copies TE keeps
  (row- and column-wise); not from a published formula.
- ``--reserve-gb`` (default 3) covers the CUDA context, NCCL buffers and allocator fragmentation.
- Rollout (``rollout=sglang``): each server of ``rollout.sglang.tp_size`` GPUs holds its weights
  / TP (bf16, or blockwise FP8 with ``rollout.fp8``: 1 byte + a 4-byte scale per 128 x 128 block
  for decoder linears) inside ``mem_fraction_static`` x GPU memory; the rest of that fraction is
  KV cache (bf16, ``2 L ceil(g / t) d`` elements per token), which must hold at least one
  full request. With ``weight_sync: tensor`` (CUDA IPC) the servers share the training GPUs.
  The loop asks them to release weights and KV cache after each rollout
  (``trainer/sync.py``), which frees memory only on servers started with
  ``--enable-memory-saver``; the plan assumes training gets only ``1 - mem_fraction_static`` of
  each GPU unless ``--engine-offload`` says the servers do release it.

Not measured: these figures have not been compared with ``torch.cuda.max_memory_allocated`` on a
GPU; DDP bucket padding, pipeline send/receive buffers and CUDA graphs are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_gvpo.models.hf_config import (  # noqa: E402
    HFArch,
    arch_from_dict,
    check_parallel_layout,
    padded_vocab_size,
    read_hf_config,
)

# megatron-core warns at import time that TE and apex are missing; the plan needs neither.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

CONFIG_DIR = REPO / "configs"
GiB = 1 << 30
LOGPROB_CHUNK = 1024  # vocab_parallel_logprobs' default chunk_size
FP8_BLOCK = 128 * 128


def _llama(hidden, ffn, layers, heads, kv, *, rope_scaling=False, max_pos=8192) -> dict:
    cfg = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if rope_scaling:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return cfg


def _qwen(model_type, hidden, ffn, layers, heads, kv, vocab, *, tied=False, head_dim=None) -> dict:
    cfg = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
    }
    if head_dim:
        cfg["head_dim"] = head_dim
    return cfg


def _qwen3_moe(hidden, ffn, layers, heads, kv, experts, topk, expert_ffn) -> dict:
    cfg = _qwen("qwen3_moe", hidden, ffn, layers, heads, kv, 151936, head_dim=128)
    cfg.update(
        num_experts=experts,
        num_experts_per_tok=topk,
        moe_intermediate_size=expert_ffn,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=40960,
    )
    return cfg


# Published config.json fields of well-known checkpoints (only what the plan needs).
# Qwen3 MoE shapes: the model cards of Qwen/Qwen3-30B-A3B (48 layers, 32 query / 4 KV heads,
# 128 experts, 8 per token, 30.5 B total, 3.3 B activated) and Qwen/Qwen3-235B-A22B (94 layers,
# 64 / 4 heads, 128 experts, 8 per token, 235 B / 22 B); hidden size, head_dim 128, expert width
# and vocabulary from transformers' Qwen3MoeConfig defaults (``configuration_qwen3_moe.py``,
# documented against Qwen/Qwen3-30B-A3B-Base: hidden 2048, intermediate 6144, expert width
# 768, vocab 151936) and, for the 235B, the Megatron configs of MindSpeed-RL
# (``configs/model/qwen3_235b_a22b.yaml``: hidden 4096, ffn 12288, moe_ffn 1536, kv_channels
# 128) and MaxText (``configs/models/qwen3-235b-a22b.yml``). Every layer is routed.
ARCHS: dict[str, dict] = {
    "llama3-8b": _llama(4096, 14336, 32, 32, 8),
    "llama3-70b": _llama(8192, 28672, 80, 64, 8),
    "llama3.1-8b": _llama(4096, 14336, 32, 32, 8, rope_scaling=True, max_pos=131072),
    "llama3.1-70b": _llama(8192, 28672, 80, 64, 8, rope_scaling=True, max_pos=131072),
    "llama3.1-405b": _llama(16384, 53248, 126, 128, 8, rope_scaling=True, max_pos=131072),
    "qwen3-0.6b": _qwen("qwen3", 1024, 3072, 28, 16, 8, 151936, tied=True, head_dim=128),
    "qwen3-8b": _qwen("qwen3", 4096, 12288, 36, 32, 8, 151936, head_dim=128),
    "qwen3-32b": _qwen("qwen3", 5120, 25600, 64, 64, 8, 151936, head_dim=128),
    "qwen2.5-7b": _qwen("qwen2", 3584, 18944, 28, 28, 4, 152064),
    "qwen2.5-72b": _qwen("qwen2", 8192, 29568, 80, 64, 8, 152064),
    "qwen3-30b-a3b": _qwen3_moe(2048, 6144, 48, 32, 4, 128, 8, 768),
    "qwen3-235b-a22b": _qwen3_moe(4096, 12288, 94, 64, 4, 128, 8, 1536),
    "mistral-7b": {
        **_llama(4096, 14336, 32, 32, 8),
        "model_type": "mistral",
        "vocab_size": 32000,
        "rope_theta": 10000.0,
    },
}


# ------------------------------------------------------------------------------ parameters


@dataclass
class StageParams:
    """Parameters of one pipeline stage on one TP rank, split by where they live."""

    layers: int
    layer: int  # one decoder layer (the largest of the stage's)
    gemm: int  # GEMM weights of one layer (what FP8 quantises)
    embedding: int = 0
    output: int = 0
    final_norm: int = 0
    layer_sum: int | None = None  # the stage's layers together, when they differ (MoE)
    expert: int = 0  # of the total: expert weights (sharded over the expert-data-parallel group)
    routed_layers: int = 0  # layers with routed experts

    @property
    def total(self) -> int:
        layers = self.layers * self.layer if self.layer_sum is None else self.layer_sum
        return layers + self.embedding + self.output + self.final_norm


def layer_params(
    arch: HFArch,
    tp: int = 1,
    index: int | None = None,
    ep: int = 1,
    etp: int | None = None,
    experts: int | None = None,
) -> tuple[int, int]:
    """(all parameters, GEMM weights) of one decoder layer on one rank; for a mixture of
    experts, of layer ``index`` (default: the first routed one) with ``num_experts / ep`` experts
    (or ``experts`` of them, e.g. the active top-k), each split over ``etp`` ranks (default
    ``tp``)."""
    h, d, a, g = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    qkv = h * (a + 2 * g) * d // tp
    proj = a * d * h // tp
    if index is None and arch.is_moe:
        index = arch.moe_layers.index(1) if 1 in arch.moe_layers else 0
    routed = index is not None and arch.is_moe_layer(index)
    if routed:
        mlp = expert_params(arch, index, tp, ep, etp, experts)
        mlp += 3 * h * arch.shared_expert_ffn_hidden_size // tp  # qwen2_moe's shared expert
    else:
        mlp = 3 * h * arch.ffn_hidden_size // tp
    gemm = qkv + proj + mlp
    extra = 2 * h  # input and pre-MLP RMSNorm weights, replicated over TP
    if routed:
        extra += arch.num_experts * h  # the router, replicated
        if arch.shared_expert_ffn_hidden_size:
            extra += h  # the shared expert's sigmoid gate, replicated
    if arch.add_qkv_bias:
        extra += (a + 2 * g) * d // tp
    if arch.qk_layernorm:
        extra += 2 * d
    return gemm + extra, gemm


def expert_params(
    arch: HFArch,
    index: int | None,
    tp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    experts: int | None = None,
) -> int:
    """Expert weights of layer ``index`` on one rank (0 for a dense layer): ``num_experts / ep``
    experts (or ``experts``), each gate, up and down of width ``moe_intermediate_size / etp``."""
    if not arch.is_moe or index is None or not arch.is_moe_layer(index):
        return 0
    etp = tp if etp is None else etp
    n = arch.num_experts // ep if experts is None else experts
    return n * 3 * arch.hidden_size * (arch.moe_ffn_hidden_size // etp)


def total_params(arch: HFArch) -> int:
    """Exact parameter count of the HF model (unpadded vocabulary, one copy if tied)."""
    layers = sum(layer_params(arch, 1, i)[0] for i in range(arch.num_layers))
    emb = arch.vocab_size * arch.hidden_size
    return layers + emb * (1 if arch.tie_word_embeddings else 2) + arch.hidden_size


def active_params(arch: HFArch) -> int:
    """Parameters one token passes through: :func:`total_params` with ``num_experts_per_tok``
    experts per routed layer (the router and every dense part counted; equal to the total for
    a dense model)."""
    if not arch.is_moe:
        return total_params(arch)
    topk = arch.moe_router_topk
    layers = sum(layer_params(arch, 1, i, experts=topk)[0] for i in range(arch.num_layers))
    emb = arch.vocab_size * arch.hidden_size
    return layers + emb * (1 if arch.tie_word_embeddings else 2) + arch.hidden_size


def stage_params(
    arch: HFArch, tp: int, pp: int, vocab: int, ep: int = 1, etp: int | None = None
) -> list[StageParams]:
    """Per-stage parameters on one rank, as megatron-core builds them (``vocab`` padded; a mixture
    of experts holds ``num_experts / ep`` experts per routed layer, split over ``etp``)."""
    layer, gemm = layer_params(arch, tp, ep=ep, etp=etp)
    per_stage = arch.num_layers // pp
    emb = vocab // tp * arch.hidden_size
    stages = []
    for i in range(pp):
        s = StageParams(layers=per_stage, layer=layer, gemm=gemm)
        if arch.is_moe:
            span = range(i * per_stage, (i + 1) * per_stage)
            counts = [layer_params(arch, tp, j, ep, etp) for j in span]
            s.layer, s.gemm = max(c[0] for c in counts), max(c[1] for c in counts)
            s.layer_sum = sum(c[0] for c in counts)
            s.expert = sum(expert_params(arch, j, tp, ep, etp) for j in span)
            s.routed_layers = sum(arch.is_moe_layer(j) for j in span)
        if i == 0:
            s.embedding = emb
        if i == pp - 1:
            s.final_norm = arch.hidden_size
            s.output = 0 if (arch.tie_word_embeddings and pp == 1) else emb
        stages.append(s)
    return stages


# ------------------------------------------------------------------------------ memory model


@dataclass
class Settings:
    """Everything the plan depends on, taken from the Hydra config and the flags."""

    tp: int
    pp: int
    dp: int
    ep: int = 1
    etp: int | None = None  # None: tp
    precision: str = "bf16"
    distributed_optimizer: bool = True
    recompute: str | None = None  # None | selective | full
    flash_attention: bool = True
    tokens_per_microbatch: int = 16384
    max_seq_len: int = 2048  # longest sequence: prompt + response
    microbatches: int = 1  # per optimizer step on one DP rank
    reference_model: bool = False
    fp8: bool = False
    gpu_memory_gb: float = 80.0
    reserve_gb: float = 3.0
    vocab: int | None = None  # padded; None: as the trainer pads it
    local_engine_bytes: float = 0.0  # rollout=local on a GPU: rank 0 (stage 0) holds the model
    dispatcher: str = "alltoall"  # megatron-core's MoE token dispatcher (alltoall | allgather)

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size (``parallel.etp``, default TP)."""
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel size, world / (ETP EP PP) as megatron-core's parallel_state
        computes it."""
        return self.tp * self.pp * self.dp // (self.expert_tp * self.ep * self.pp)


def arch_precision(arch: HFArch) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[arch.torch_dtype]


def param_bytes(precision: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[precision]


def state_bytes_per_param(precision: str, dp: int, distributed_optimizer: bool) -> dict:
    """Bytes per parameter of weights, fp32 main grads and Adam state (see the module doc)."""
    shard = dp if distributed_optimizer else 1
    if precision == "fp32":
        return {"weights": 4.0, "gradients": 4.0, "optimizer": 8.0 / shard}
    return {"weights": 2.0, "gradients": 4.0, "optimizer": 12.0 / shard}


def activation_bytes_per_layer(arch: HFArch, s: Settings, recompute: str | None = None) -> float:
    """Korthikanti et al. (2022) bytes of one layer for one micro-batch, TP without SP."""
    t, h, a = s.tp, arch.hidden_size, arch.num_attention_heads
    tokens = s.tokens_per_microbatch
    seq = min(s.max_seq_len, tokens)
    scale = param_bytes(s.precision) / 2  # the formula counts 16-bit activations
    if recompute == "full":
        return 2 * tokens * h * scale
    per = tokens * h * (10 + 24 / t)
    if recompute is None and not s.flash_attention:
        per += 5 * a * tokens * seq / t
    return per * scale


def moe_dispatch_bytes(arch: HFArch, s: Settings) -> float:
    """Buffers of one routed layer's token dispatch and combine for one micro-batch (module doc:
    what megatron-core's dispatcher allocates, balanced routing)."""
    if not arch.is_moe:
        return 0.0
    h, k, b = arch.hidden_size, arch.moe_router_topk, param_bytes(s.precision)
    etp, ep = s.expert_tp, s.ep
    local = s.tokens_per_microbatch / s.tp  # sequence parallel under TP
    routed = local * k
    if s.dispatcher == "allgather":
        gathered = local * etp * ep if etp * ep > 1 else local
        elems = gathered + routed * etp + routed * etp  # gather, permute, expert-output copy
        if etp * ep > 1:
            elems += local  # reduce-scatter output
        fp32 = routed * etp + gathered  # unpermute: prob-weighted copy and fp32 output
        return elems * h * b + fp32 * h * 4
    elems = routed + routed  # permutation 1, dispatch all-to-all
    if etp > 1:
        elems += routed * etp + routed  # expert-TP all-gather, reduce-scatter back
    if arch.num_experts // ep > 1:
        elems += 2 * routed * etp  # permutation 2 and its inverse
    elems += routed  # combine all-to-all
    fp32 = routed + local  # unpermute: prob-weighted copy and fp32 output
    return elems * h * b + fp32 * h * 4


def plan_stage(arch: HFArch, sp: StageParams, index: int, s: Settings) -> dict:
    """Bytes per component on one GPU of pipeline stage ``index``."""
    vocab = s.vocab or padded_vocab_size(arch.vocab_size, s.tp)
    p = sp.total
    dense = p - sp.expert
    per = state_bytes_per_param(s.precision, s.dp, s.distributed_optimizer)
    per_expert = state_bytes_per_param(s.precision, s.expert_dp, s.distributed_optimizer)
    out = {k: v * dense + per_expert[k] * sp.expert for k, v in per.items()}
    out["reference_weights"] = param_bytes(s.precision) * p if s.reference_model else 0.0
    in_flight = min(s.pp - index, max(s.microbatches, 1))
    layer = activation_bytes_per_layer(arch, s, s.recompute)
    acts = in_flight * sp.layers * layer
    if s.recompute == "full":  # the layer being recomputed holds its full activations
        acts += activation_bytes_per_layer(arch, s, "selective")
    out["activations"] = acts
    out["moe_dispatch"] = moe_dispatch_bytes(arch, s) if sp.routed_layers else 0.0
    logprob = 0.0
    if index == s.pp - 1:
        v_local = vocab // s.tp
        logits = s.tokens_per_microbatch * v_local * param_bytes(s.precision)
        logprob = 2 * logits + 4 * min(LOGPROB_CHUNK, s.tokens_per_microbatch) * v_local
    out["logprob_buffers"] = logprob
    out["fp8_weight_copies"] = 2.0 * sp.layers * sp.gemm if s.fp8 else 0.0
    out["local_engine"] = s.local_engine_bytes if index == 0 else 0.0
    out["reserve"] = s.reserve_gb * GiB
    out["total"] = sum(out.values())
    out["params"] = p
    out["expert_params"] = sp.expert
    out["in_flight_microbatches"] = in_flight
    return out


def kv_bytes_per_token(arch: HFArch, tp: int) -> int:
    """bf16 KV cache bytes per token on one GPU of an engine at TP ``tp`` (KV heads replicated
    when there are fewer than ``tp``)."""
    return 2 * arch.num_layers * math.ceil(arch.num_query_groups / tp) * arch.head_dim * 2


def engine_weight_bytes(arch: HFArch, fp8: bool) -> float:
    """Bytes of the whole model as an engine holds it: bf16, or blockwise FP8 decoder linears."""
    n = total_params(arch)
    if not fp8:
        return 2.0 * n
    _, gemm = layer_params(arch)
    linear = arch.num_layers * gemm
    return linear * (1 + 4 / FP8_BLOCK) + 2.0 * (n - linear)


def plan_engine(arch: HFArch, tp: int, mem_fraction: float, fp8: bool, gpu_gb: float, need: int):
    """One SGLang server's per-GPU weights, KV cache and KV capacity in tokens."""
    weights = engine_weight_bytes(arch, fp8) / tp
    static = mem_fraction * gpu_gb * GiB
    kv = static - weights
    per_token = kv_bytes_per_token(arch, tp)
    tokens = int(kv // per_token) if kv > 0 else 0
    return {
        "tp": tp,
        "weights": weights,
        "kv_cache": max(kv, 0.0),
        "static": static,
        "kv_bytes_per_token": per_token,
        "kv_tokens": tokens,
        "tokens_needed": need,
        "fits": tokens >= need,
    }


# ------------------------------------------------------------------------------ config


def compose(overrides: list[str]) -> dict:
    """The trainer's Hydra config with ``overrides`` (missing ``???`` values become None)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from megatron_gvpo.trainer.config import register_configs

    register_configs()  # the schemas the YAML groups start from
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:  # a bad override: name it
        raise ValueError(str(e)) from None
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return None if x == "???" else x

    return clean(raw)


def resolve_arch(args: argparse.Namespace, model: dict) -> tuple[HFArch, int | None, str]:
    """(architecture, padded vocab of a converted checkpoint or None, where it came from)."""
    if args.arch:
        return arch_from_dict(ARCHS[args.arch], source=f"--arch {args.arch}"), None, args.arch
    if args.hf_config:
        return read_hf_config(args.hf_config), None, str(args.hf_config)
    path = model.get("path")
    if path is None:
        from megatron_gvpo.demo.model import DEMO_MODEL

        path = Path(model["demo_cache_dir"]).expanduser() / DEMO_MODEL
        if not (path / "config.json").is_file():
            raise ValueError(
                "no architecture: give --arch NAME, --hf-config PATH or model.path=... "
                f"(the demo model is not built yet at {path})"
            )
    path = Path(path)
    try:
        meta = path / "megatron_gvpo.json"
        if meta.is_file():  # a converted checkpoint: its HF config and padded vocabulary
            padded = json.loads(meta.read_text()).get("padded_vocab_size")
            return read_hf_config(path / "hf" / "config.json"), padded, str(path)
        return read_hf_config(path), None, str(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"model.path={path}: {e}") from None


def settings_from_config(cfg, args: argparse.Namespace, world_size: int) -> Settings:
    """Settings from the composed run config (``trainer.config.RunConfig``) and the flags."""
    from megatron_gvpo.parallel.initialize import expert_tp

    t, r, m, d = cfg.trainer, cfg.rollout, cfg.model, cfg.data
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world_size // (tp * pp)
    seq = d.max_prompt_length + r.max_new_tokens
    groups = t.prompts_per_step * (1 + t.replay_ratio) / t.updates_per_round
    tokens = groups * r.n_samples_per_prompt * seq / dp
    return Settings(
        tp=tp,
        pp=pp,
        dp=dp,
        ep=cfg.parallel.ep,
        etp=expert_tp(cfg.parallel),
        dispatcher="allgather" if m.moe.token_dispatcher == "allgather" else "alltoall",
        precision=m.precision,
        distributed_optimizer=t.use_distributed_optimizer,
        recompute=m.recompute_granularity,
        flash_attention=args.attention == "flash",
        tokens_per_microbatch=t.max_tokens_per_microbatch,
        max_seq_len=seq,
        microbatches=max(1, math.ceil(tokens / t.max_tokens_per_microbatch)),
        reference_model=cfg.algorithm.needs_reference,
        fp8=m.fp8.enabled,
        gpu_memory_gb=args.gpu_memory_gb,
        reserve_gb=args.reserve_gb,
    )


# ------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """The whole plan: per-stage bytes, the rollout engine, and what does not fit."""

    arch: str
    params_total: int
    world_size: int
    tp: int
    pp: int
    dp: int
    budget: float
    stages: dict[int, dict]
    params_active: int = 0
    ep: int = 1
    etp: int = 1
    expert_dp: int = 1
    settings: dict = field(default_factory=dict)
    engine: dict | None = None
    engine_placement: str = "none"
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


def make_plan(
    arch: HFArch,
    s: Settings,
    source: str = "",
    engine: dict | None = None,
    placement: str = "none",
    colocated_fraction: float = 0.0,
) -> Plan:
    """Plan every distinct stage (first, middle, last) and check each against the budget."""
    check_parallel_layout(arch, s.tp, s.pp, source=source or "config.json", ep=s.ep, etp=s.etp)
    vocab = s.vocab or padded_vocab_size(arch.vocab_size, s.tp)
    stages = stage_params(arch, s.tp, s.pp, vocab, s.ep, s.etp)
    shown = sorted({0, min(1, s.pp - 1), s.pp - 1})  # stage 1 stands for every middle stage
    planned = {i: plan_stage(arch, stages[i], i, s) for i in shown}
    budget = s.gpu_memory_gb * GiB * (1 - colocated_fraction)
    plan = Plan(
        arch=source,
        params_total=total_params(arch),
        world_size=s.tp * s.pp * s.dp,
        tp=s.tp,
        pp=s.pp,
        dp=s.dp,
        budget=budget,
        params_active=active_params(arch),
        ep=s.ep,
        etp=s.expert_tp,
        expert_dp=s.expert_dp,
        stages=planned,
        settings=asdict(s),
        engine=engine,
        engine_placement=placement,
    )
    for i, st in planned.items():
        if st["total"] > budget:
            plan.problems.append(_why(i, st, s, budget, colocated_fraction))
    if engine is not None and not engine["fits"]:
        plan.problems.append(
            f"rollout engine (rollout.sglang.tp_size={engine['tp']}): weights "
            f"{engine['weights'] / GiB:.1f} GiB leave KV cache for {engine['kv_tokens']} tokens "
            f"of the {engine['tokens_needed']} one request needs within "
            f"rollout.sglang.mem_fraction_static x {s.gpu_memory_gb:g} GiB; raise "
            "rollout.sglang.tp_size or mem_fraction_static"
        )
    return plan


# The memory a training GPU holds, one row each in the table (plus "reserve" and "total").
COMPONENTS = (
    "weights",
    "gradients",
    "optimizer",
    "reference_weights",
    "activations",
    "moe_dispatch",
    "logprob_buffers",
    "fp8_weight_copies",
    "local_engine",
)


def _why(i: int, st: dict, s: Settings, budget: float, colocated: float) -> str:
    parts = {k: st[k] for k in COMPONENTS}
    worst = max(parts, key=parts.get)
    hints = {
        "activations": "model.recompute_granularity=full, a smaller "
        "trainer.max_tokens_per_microbatch, or a larger parallel.tp",
        "optimizer": "trainer.use_distributed_optimizer=true and more data-parallel GPUs",
        "weights": "a larger parallel.ep (experts) or parallel.tp / parallel.pp",
        "gradients": "a larger parallel.ep (experts) or parallel.tp / parallel.pp",
        "moe_dispatch": "a smaller trainer.max_tokens_per_microbatch",
        "logprob_buffers": "a smaller trainer.max_tokens_per_microbatch or a larger parallel.tp",
    }
    if worst == "optimizer" and st["expert_params"] > st["params"] / 2:  # mostly experts
        hints["optimizer"] = (
            f"more expert-data-parallel GPUs (world / (parallel.etp x parallel.ep x parallel.pp)"
            f" = {s.expert_dp} now shards the experts' optimizer state)"
        )
    where = f" (after {colocated:.0%} for the colocated rollout engine)" if colocated else ""
    return (
        f"pipeline stage {i} needs {st['total'] / GiB:.1f} GiB of {budget / GiB:.1f} GiB{where}; "
        f"largest part: {worst} {parts[worst] / GiB:.1f} GiB"
        + (
            f" ({_n_microbatches(st['in_flight_microbatches'])} in flight)"
            if worst == "activations"
            else ""
        )
        + f"; try {hints.get(worst, 'a larger parallel.tp or parallel.pp')}"
        + (
            "; or give the engine its own GPUs (rollout.sglang.weight_sync=distributed)"
            if colocated
            else ""
        )
    )


def _n_microbatches(n: int) -> str:
    return f"{n} micro-batch" + ("" if n == 1 else "es")


def format_table(plan: Plan) -> str:
    """The human-readable table: one column per distinct pipeline stage."""
    cols = [f"stage {i}" for i in plan.stages]
    rows = [
        ("parameters (M)", lambda st: f"{st['params'] / 1e6:,.1f}"),
        *(
            [("  of which experts (M)", lambda st: f"{st['expert_params'] / 1e6:,.1f}")]
            if plan.ep > 1 or any(st["expert_params"] for st in plan.stages.values())
            else []
        ),
        *[(k, lambda st, k=k: f"{st[k] / GiB:.2f}") for k in (*COMPONENTS, "reserve", "total")],
        ("micro-batches in flight", lambda st: str(st["in_flight_microbatches"])),
    ]
    width = max(len(r[0]) for r in rows) + 2
    moe = plan.params_active != plan.params_total
    lines = [
        f"{plan.arch}: {plan.params_total / 1e9:.3f} B parameters"
        + (f" ({plan.params_active / 1e9:.3f} B active per token)" if moe else "")
        + f"; world {plan.world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}"
        + (f"; experts: EP {plan.ep} x ETP {plan.etp} x expert-DP {plan.expert_dp}" if moe else "")
        + f"; GiB per GPU, budget {plan.budget / GiB:.1f}",
        _settings_line(plan.settings),
        "".ljust(width) + "".join(c.rjust(14) for c in cols),
    ]
    for name, fn in rows:
        lines.append(name.ljust(width) + "".join(fn(st).rjust(14) for st in plan.stages.values()))
    e = plan.engine
    if e is not None:
        lines.append(
            f"rollout engine ({plan.engine_placement}, TP {e['tp']}): weights "
            f"{e['weights'] / GiB:.2f} GiB, KV cache {e['kv_cache'] / GiB:.2f} GiB = "
            f"{e['kv_tokens']:,} tokens (one request: {e['tokens_needed']:,})"
        )
    lines.append("fits" if plan.fits else "DOES NOT FIT: " + "; ".join(plan.problems))
    return "\n".join(lines)


def _settings_line(s: dict) -> str:
    return (
        f"{s['precision']}, distributed optimizer {'on' if s['distributed_optimizer'] else 'off'}, "
        f"recompute {s['recompute'] or 'none'}, {s['tokens_per_microbatch']:,} tokens per "
        f"micro-batch, {s['microbatches']} micro-batches per step, attention "
        f"{'flash' if s['flash_attention'] else 'unfused'}, reference model "
        f"{'yes' if s['reference_model'] else 'no'}, FP8 {'on' if s['fp8'] else 'off'}"
    )


def plan_json(plan: Plan) -> str:
    d = asdict(plan)
    d["fits"] = plan.fits
    d["stages"] = {str(k): v for k, v in plan.stages.items()}
    return json.dumps(d, sort_keys=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for megatron_gvpo.train")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", choices=sorted(ARCHS), help="a built-in published architecture")
    src.add_argument("--hf-config", type=Path, help="an HF config.json (or its folder)")
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="training GPUs (default: one node if TP x PP divides --gpus-per-node, else TP x PP)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--reserve-gb", type=float, default=3.0, help="CUDA context, NCCL, fragments")
    p.add_argument("--attention", choices=("flash", "unfused"), default="flash")
    p.add_argument(
        "--engine-offload",
        action="store_true",
        help="a colocated engine releases its memory while the actor trains",
    )
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> tuple[int, Plan | None, str]:
    """(exit code, plan, printed text) for a command line; used by ``main`` and the tests."""
    from megatron_gvpo.parallel.initialize import validate_layout
    from megatron_gvpo.trainer.config import sections_from_dict

    args = parse_args(argv)
    try:
        cfg = sections_from_dict(compose(args.overrides))
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        world = args.world_size
        if world is None:
            world = args.gpus_per_node if args.gpus_per_node % (tp * pp) == 0 else tp * pp
        validate_layout(cfg.parallel, world)
        arch, padded, source = resolve_arch(args, asdict(cfg.model))
        s = settings_from_config(cfg, args, world)
        s.vocab = padded
        engine, placement, colocated = None, "none", 0.0
        r = cfg.rollout
        if r.backend == "sglang":
            sg = {"tp_size": 1, "mem_fraction_static": 0.8, "weight_sync": "tensor", **r.sglang}
            attached = bool(sg.get("urls") or sg.get("router_url"))
            placement = (
                "colocated" if sg["weight_sync"] == "tensor" and not attached else "own GPUs"
            )
            engine = plan_engine(
                arch,
                int(sg["tp_size"]),
                float(sg["mem_fraction_static"]),
                r.fp8,
                args.gpu_memory_gb,
                cfg.data.max_prompt_length + r.max_new_tokens,
            )
            if placement == "colocated" and not args.engine_offload:
                colocated = float(sg["mem_fraction_static"])
        elif r.backend == "local" and str(r.local.device).startswith("cuda"):
            s.local_engine_bytes = param_bytes(arch_precision(arch)) * total_params(arch)
            placement = "local engine on the GPU"
        plan = make_plan(arch, s, source, engine, placement, colocated)
    except (ValueError, FileNotFoundError, KeyError) as e:
        return 2, None, f"plan_memory: {e}"
    notes = []
    if tp > args.gpus_per_node:
        notes.append(f"note: parallel.tp={tp} spans nodes (--gpus-per-node {args.gpus_per_node})")
    text = "\n".join([format_table(plan), *notes, plan_json(plan)])
    return (0 if plan.fits else 1), plan, text


def main() -> None:
    code, _, text = run()
    print(text, file=sys.stderr if code == 2 else sys.stdout)
    sys.exit(code)


if __name__ == "__main__":
    main()
