"""Peak memory and wall time of forward+backward: vocab_parallel_logprobs vs naive log_softmax.

Each variant runs in a fresh subprocess. Peak memory is measured above a baseline taken after the
inputs (logits, targets, upstream gradient) exist and one small warm-up run has initialised the
kernels, thread pools and autograd engine, so it covers exactly what forward+backward allocate,
including the gradient of the logits (same size in every variant).

- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` after resetting the peak stats.
- CPU: resident memory; the kernel's high-water mark (VmHWM) is reset by writing 5 to
  /proc/self/clear_refs after the inputs are built, and peak = VmHWM - VmRSS at that point. glibc
  is told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors go back to the OS
  at once and RSS tracks live tensor bytes (torch's CPU allocator does not cache). If clear_refs is
  not writable, a psutil thread samples RSS every millisecond instead.

Usage: python tools/bench_logprobs.py [--tokens 8192 --vocab 32768 --chunk-sizes 4096,1024]
The naive reference computes log-probs only; the ours+entropy rows also return the entropy and
backpropagate through it, so their ratio to naive overstates our cost for the same work.
Prints one JSON line per variant, then a summary line per dtype and chunk size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

MiB = 1024 * 1024
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class _PeakMeter:
    """Peak memory above the level at ``start()``, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024
            self.method = "VmHWM after clear_refs"
        except OSError:
            import psutil

            proc = psutil.Process()
            self.base = proc.memory_info().rss
            self.peak = self.base
            self.method = "psutil RSS sampled every 1 ms"

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            return self.peak - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def _step(variant: str, logits, target, g_lp, g_ent, chunk_size: int) -> None:
    """One forward+backward; the gradient lands in logits.grad."""
    if variant == "naive":
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        lp.backward(g_lp)
        return
    from megatron_gvpo.parallel.logprobs import vocab_parallel_logprobs

    if variant == "ours":
        vocab_parallel_logprobs(logits, target, chunk_size=chunk_size).backward(g_lp)
    elif variant == "ours+entropy":
        lp, ent = vocab_parallel_logprobs(
            logits, target, chunk_size=chunk_size, return_entropy=True
        )
        torch.autograd.backward([lp, ent], [g_lp, g_ent])
    else:
        raise ValueError(variant)


def child(args: argparse.Namespace) -> None:
    """Run one variant in this (fresh) process and print one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def inputs(n: int, v: int):
        gen = torch.Generator(device=device).manual_seed(0)
        # Drawn in place in the target dtype: no transient fp32 copy of the logits.
        logits = torch.empty(n, v, dtype=dtype, device=device).normal_(generator=gen).mul_(3)
        target = torch.randint(0, v, (n,), generator=gen, device=device)
        g_lp = torch.randn(n, generator=gen, device=device)
        g_ent = torch.randn(n, generator=gen, device=device)
        return logits.requires_grad_(True), target, g_lp, g_ent

    warm = inputs(64, 1024)
    _step(args.variant, *warm, chunk_size=16)
    del warm

    logits, target, g_lp, g_ent = inputs(args.tokens, args.vocab)
    meter = _PeakMeter(device)
    meter.start()
    t0 = time.perf_counter()
    _step(args.variant, logits, target, g_lp, g_ent, args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_first = time.perf_counter() - t0
    peak = meter.stop()
    assert logits.grad is not None and logits.grad.dtype == dtype

    times = [t_first]
    for _ in range(args.repeats - 1):
        logits.grad = None
        t0 = time.perf_counter()
        _step(args.variant, logits, target, g_lp, g_ent, args.chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    grad_bytes = logits.numel() * logits.element_size()
    print(
        json.dumps(
            {
                "variant": args.variant,
                "dtype": args.dtype,
                "chunk_size": args.chunk_size if args.variant != "naive" else None,
                "tokens": args.tokens,
                "vocab": args.vocab,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "method": meter.method,
                "peak_mib": round(peak / MiB, 1),
                "peak_minus_grad_mib": round((peak - grad_bytes) / MiB, 1),
                "time_s": round(min(times), 3),
                "time_first_s": round(t_first, 3),
            }
        ),
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--chunk-sizes", default="4096,1024", help="chunk sizes to run ours with")
    p.add_argument("--no-entropy", action="store_true", help="skip the ours+entropy variant")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant; time_s is the min")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=4096, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    for dt in args.dtypes.split(","):
        runs = [("naive", chunks[0])] + [("ours", c) for c in chunks]
        if not args.no_entropy:
            runs += [("ours+entropy", c) for c in chunks]
        results = []
        for variant, chunk in runs:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                f"--variant={variant}",
                f"--dtype={dt}",
                f"--chunk-size={chunk}",
                f"--tokens={args.tokens}",
                f"--vocab={args.vocab}",
                f"--repeats={args.repeats}",
                f"--threads={args.threads}",
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{variant} {dt} failed:\n{out.stderr[-4000:]}")
            line = out.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            results.append(json.loads(line))
        naive = results[0]
        for r in results[1:]:
            summary = {
                "summary": f"{r['variant']} / naive",
                "dtype": dt,
                "chunk_size": r["chunk_size"],
                "peak_ratio": round(r["peak_mib"] / naive["peak_mib"], 3),
                "time_ratio": round(r["time_s"] / naive["time_s"], 3),
                "goal_peak_ratio_le_0.25": r["peak_mib"] <= naive["peak_mib"] / 4,
            }
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
