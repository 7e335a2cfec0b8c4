"""Compare Megatron-Core per-token logprobs (and gradients) with transformers on the same weights.

    torchrun --nproc_per_node 4 tools/logprob_parity.py --hf-dir H --tp 2 --pp 2
    python tools/logprob_parity.py --hf-dir H --tp 2          # spawns the ranks itself
    python tools/logprob_parity.py --hf-dir H --ep 2          # a MoE model, experts over 2 ranks
    python tools/logprob_parity.py --hf-dir H --ep 2 --dispatcher allgather alltoall

Prints one JSON line: max_abs_diff, tokens, layout, dtype (and grad_max_rel_err with --grad).
``--mcore-dir M`` loads the actor from a converted checkpoint instead of the HF safetensors.
``--dump F`` saves the first dispatcher's logprobs (and gradients) to a safetensors file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.bridge.loader import build_from_checkpoint, build_from_hf  # noqa: E402
from megatron_gvpo.bridge.mapping import unfuse_experts  # noqa: E402
from megatron_gvpo.bridge.weights import gather_hf_tensors  # noqa: E402
from megatron_gvpo.models.forward import MicroBatch, compute_logprobs, forward_backward  # noqa: E402
from megatron_gvpo.models.gpt import PRECISIONS, ModelConfig  # noqa: E402
from megatron_gvpo.models.hf_config import read_hf_config  # noqa: E402
from megatron_gvpo.models.moe import DISPATCHERS, MoEConfig  # noqa: E402
from megatron_gvpo.parallel.ddp import wrap_with_ddp  # noqa: E402
from megatron_gvpo.parallel.initialize import (  # noqa: E402
    ParallelConfig,
    destroy,
    initialize,
    layout_world_size,
)
from megatron_gvpo.parallel.launch import run_on_ranks  # noqa: E402

DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Group variance policy optimization keeps the optimum of KL-regularised reward maximisation.",
    "12 + 35 = 47",
]


def make_batches(args, hf_dir: Path, vocab_size: int) -> list[torch.Tensor]:
    """Token batches [batch, seq]: the folder's tokenizer on texts if it has one, else random ids."""
    g = torch.Generator().manual_seed(args.seed)
    if (hf_dir / "tokenizer.json").is_file() and not args.random_tokens:
        from megatron_gvpo.data.tokenizer import load_tokenizer

        tok = load_tokenizer(hf_dir, trust_remote_code=False)
        ids = [tok(t)["input_ids"] for t in (args.texts or DEFAULT_TEXTS)]
        seq = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        rows = torch.tensor([i + [pad] * (seq - len(i)) for i in ids])
        return [rows]
    return [
        torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=g)
        for _ in range(args.num_batches)
    ]


def hf_reference(hf_dir: Path, batches, dtype, want_grad: bool):
    """transformers logprobs of tokens[:, 1:] per batch, and grads of their sum (HF names)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    model.eval()
    out = []
    with torch.set_grad_enabled(want_grad):
        total = 0.0
        for tokens in batches:
            logits = model(input_ids=tokens).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
            out.append(lp.detach())
            total = total + lp.sum()
        if want_grad:
            total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, unfuse_experts(grads)


def _megatron_pass(args, hf_dir: Path, dispatcher: str):
    """Build the actor with ``dispatcher``; its logprobs (and HF-named gradients with --grad)."""
    cfg = ModelConfig(precision=args.precision, moe=MoEConfig(token_dispatcher=dispatcher))
    if args.mcore_dir:
        model, arch = build_from_checkpoint(args.mcore_dir, cfg)
    else:
        model, arch = build_from_hf(hf_dir, cfg)
    batches = make_batches(args, hf_dir, arch.vocab_size)
    mbs = [MicroBatch(tokens=t) for t in batches]
    model.eval()
    logprobs = compute_logprobs(model, mbs)
    grads = {}
    if args.grad:
        # The real path: megatron DDP + finalize_model_grads (TP sums of q/k-norm grads, tied
        # embedding grads across PP stages).
        ddp = wrap_with_ddp(model)
        ddp.zero_grad_buffer()
        # Every DP rank runs the same batches and DDP sums their gradients: count them once.
        dp = parallel_state.get_data_parallel_world_size()
        forward_backward(ddp, mbs, lambda lp, ent, mb: (lp.sum() / dp, {}), forward_only=False)
        grads = {n: p.main_grad for n, p in model.named_parameters()}
        grads = gather_hf_tensors(model, arch, tensors=grads)
    used = cfg.moe.dispatcher() if arch.is_moe else None
    return batches, logprobs, grads, arch, used


def _max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    pairs = zip(a, b, strict=True)
    return max((x.float().cpu() - y.float().cpu()).abs().max().item() for x, y in pairs)


def worker(args) -> None:
    initialize(_layout(args))
    hf_dir = Path(args.hf_dir)
    passes = [_megatron_pass(args, hf_dir, d) for d in args.dispatcher]
    batches, logprobs, grads, arch, _ = passes[0]
    if dist.get_rank() == 0:
        ref, ref_grads = hf_reference(hf_dir, batches, PRECISIONS[args.ref_precision], args.grad)
        result = {
            "max_abs_diff": max(_max_abs(p[1], ref) for p in passes),
            "tokens": sum(r.numel() for r in ref),
            "tp": args.tp,
            "pp": args.pp,
            "ep": args.ep,
            "precision": args.precision,
            "dispatcher": [p[4] for p in passes] if len(passes) > 1 else passes[0][4],
            "source": "mcore" if args.mcore_dir else "hf",
            "model_type": arch.model_type,
        }
        if len(passes) > 1:  # the other dispatchers against the first, bit for bit or not
            result["dispatcher_max_abs_diff"] = max(_max_abs(p[1], logprobs) for p in passes[1:])
        if args.grad:
            missing = sorted(set(ref_grads) - set(grads))
            if missing:
                raise RuntimeError(f"no Megatron gradient for {missing}")
            rel = {
                (i, n): ((p[2][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
                for i, p in enumerate(passes)
                for n, g in ref_grads.items()
            }
            worst = max(rel, key=rel.get)
            result.update(grad_max_rel_err=rel[worst], grad_worst_tensor=worst[1])
            if len(passes) > 1:  # per tensor: |g - g_first| / |g_first|
                result["dispatcher_grad_max_rel_err"] = max(
                    ((p[2][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
                    for p in passes[1:]
                    for n, g in grads.items()
                )
        if args.dump:
            from safetensors.torch import save_file

            dump = {f"logprobs.{i}": lp.contiguous() for i, lp in enumerate(logprobs)}
            dump |= {f"grad.{n}": g.contiguous() for n, g in grads.items()}
            save_file(dump, args.dump)
        print(json.dumps(result), flush=True)
    destroy()


def _layout(args) -> ParallelConfig:
    return ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, seed=args.seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--mcore-dir", help="load the actor from this converted checkpoint instead")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--etp", type=int, help="expert tensor-parallel size (default: --tp)")
    p.add_argument(
        "--dispatcher",
        nargs="+",
        choices=DISPATCHERS,
        default=["auto"],
        help="MoE token dispatcher; several: the model is built and run with each, every one is "
        "compared with transformers and the others with the first (dispatcher_max_abs_diff, "
        "dispatcher_grad_max_rel_err)",
    )
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument(
        "--ref-precision", choices=list(PRECISIONS), default=None, help="default: --precision"
    )
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--texts", nargs="*")
    p.add_argument("--random-tokens", action="store_true", help="ignore the tokenizer")
    p.add_argument("--grad", action="store_true", help="also compare d(sum logprobs)/d(weights)")
    p.add_argument(
        "--dump", help="save Megatron logprobs (and with --grad the gradients) to this .safetensors"
    )
    args = p.parse_args(argv)
    args.ref_precision = args.ref_precision or args.precision
    read_hf_config(args.hf_dir)  # fail fast on a bad folder, before ranks start
    run_on_ranks(worker, layout_world_size(_layout(args)), args)


if __name__ == "__main__":
    main()
