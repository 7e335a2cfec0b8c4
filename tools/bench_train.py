"""Training throughput of the actor as a fraction of this machine's dense matmul throughput.

    python tools/bench_train.py --preset cpu-58m          # CPU, fp32, local spec
    python tools/bench_train.py --preset gpu-1b           # one GPU, bf16, local spec (Llama-3.2-1B shape)

One optimizer step = megatron ``forward_backward`` over ``--micro-batches`` micro-batches of
``--batch`` x ``--seq-len`` random tokens (loss: mean token NLL through our vocab-parallel
logprobs), DDP gradient reduction, Adam step: the trainer's update path. Weights are random.

Model FLOPs of a step (the usual dense-transformer count, causal attention counted in full):

    6 * N * T + 12 * L * s * (heads * head_dim) * T

N: parameters of the matmuls (attention, MLP, output layer; not the embedding lookup), T: tokens
in the step, L: layers, s: sequence length. ``fraction`` is model FLOP/s over the best FLOP/s of
a square matmul of the same dtype on the same device, measured here first: an MFU against the
measured, not the datasheet, peak. Prints one JSON line; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402

from megatron_gvpo.models.forward import MicroBatch, forward_backward  # noqa: E402
from megatron_gvpo.models.gpt import PRECISIONS, ModelConfig, build_gpt_model  # noqa: E402
from megatron_gvpo.models.hf_config import HFArch, arch_from_dict  # noqa: E402
from megatron_gvpo.models.tiny import tiny_hf_config  # noqa: E402
from megatron_gvpo.parallel.ddp import wrap_with_ddp  # noqa: E402
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, device, initialize  # noqa: E402
from megatron_gvpo.parallel.launch import run_on_ranks  # noqa: E402

# llama-shaped models: HF config fields, and the step shape that goes with them.
PRESETS = {
    "cpu-58m": dict(
        model=dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        seq_len=256,
        batch=2,
        micro_batches=2,
        precision="fp32",
        matmul_n=1024,
    ),
    # Llama-3.2-1B: 1.24B parameters, tied embeddings.
    "gpu-1b": dict(
        model=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        seq_len=2048,
        batch=2,
        micro_batches=4,
        precision="bf16",
        matmul_n=8192,
    ),
}


def matmul_params(arch: HFArch) -> int:
    """Weights that take part in a matmul per token: attention, MLP and the output layer."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size
    return arch.num_layers * per_layer + h * arch.vocab_size


def step_flops(arch: HFArch, seq_len: int, tokens: int) -> float:
    """Model FLOPs of one optimizer step over ``tokens`` tokens in sequences of ``seq_len``."""
    attn = 12 * arch.num_layers * seq_len * arch.num_attention_heads * arch.head_dim
    return float(6 * matmul_params(arch) + attn) * tokens


def matmul_peak(dtype: torch.dtype, dev: torch.device, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``dev``."""
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def worker(args) -> None:
    initialize(ParallelConfig(tp=1, pp=1, seed=0))
    dev = device()
    dtype = PRECISIONS[args.precision]
    peak = matmul_peak(dtype, dev, args.matmul_n)
    shape = {**args.model, "max_position_embeddings": max(args.seq_len, 512)}
    arch = arch_from_dict(tiny_hf_config("llama", **shape).to_dict())
    cfg = ModelConfig(precision=args.precision, transformer_impl="local")
    model = build_gpt_model(arch, cfg)
    ddp = wrap_with_ddp(model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-5,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            params_dtype=dtype,
            clip_grad=1.0,
        ),
        [ddp],
    )
    g = torch.Generator().manual_seed(0)
    mbs = [
        MicroBatch(
            tokens=torch.randint(0, arch.vocab_size, (args.batch, args.seq_len), generator=g)
        )
        for _ in range(args.micro_batches)
    ]
    tokens = args.micro_batches * args.batch * args.seq_len
    predicted = tokens - args.micro_batches * args.batch  # logprobs of tokens[:, 1:]

    def loss_fn(lp, _entropy, _mb):
        return -lp.sum() / predicted, {}

    def step() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, mbs, loss_fn)
        optimizer.step()
        _sync(dev)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    step_s = statistics.median(times)
    flops = step_flops(arch, args.seq_len, tokens)
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "spec": "local",
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_params": matmul_params(arch),
        "tokens_per_step": tokens,
        "seq_len": args.seq_len,
        "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 4),
        "matmul_peak_tflops_per_s": round(peak / 1e12, 4),
        "fraction": round(flops / step_s / peak, 4),
    }
    if dev.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    destroy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-58m")
    p.add_argument("--seq-len", type=int, help="default: the preset's")
    p.add_argument("--batch", type=int, help="sequences per micro-batch; default: the preset's")
    p.add_argument("--micro-batches", type=int, help="per optimizer step; default: the preset's")
    p.add_argument("--precision", choices=list(PRECISIONS), help="default: the preset's")
    p.add_argument("--matmul-n", type=int, help="size of the peak-measuring matmul")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--out", help="also write the JSON line here")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    run_on_ranks(worker, 1, args)


if __name__ == "__main__":
    main()
