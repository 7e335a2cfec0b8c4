"""Rollout wall time of one round: chunked (the old loop) vs streaming (``generate_round``).

    python tools/bench_rollout.py                      # 2 fake servers, 32 prompts x 8 samples
    python tools/bench_rollout.py --servers 4 --prompts 64 --decode-ms 2

Against the SGLang PROTOCOL FAKE (``tests/sglang_fake_server.py``, in-process, not SGLang):
response lengths are log-normal (``--mu``/``--sigma`` of log length: a long tail, capped at
``--max-new-tokens``) and a response takes ``--decode-ms`` per token, as a server that batches
continuously decodes every running request at once. The engine keeps ``--concurrency`` requests
in flight per server in both modes.

- ``chunked``: the round cut into chunks of ``--max-batch-size`` responses, each chunk awaited
  before the next is sent (``trainer/loop.py`` ``_generate_with_progress`` before this change);
- ``streaming``: every response of the round in flight at once, samples taken as they complete.

Prints one JSON line: median and min wall seconds over ``--repeats`` rounds (same seeds, so the
same lengths) and the ideal time (the longest response's decode time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sglang_fake_server import FakeSGLangServer  # noqa: E402

from megatron_gvpo.rollout.base import GenerateRequest, SamplingParams  # noqa: E402
from megatron_gvpo.rollout.round import generate_round  # noqa: E402
from megatron_gvpo.rollout.sglang import SGLangConfig, SGLangEngine  # noqa: E402


def chunked(engine, requests, sampling, max_batch_size: int):
    """The pre-streaming rollout: chunks of about ``max_batch_size`` responses, one at a time."""
    per = max(1, max_batch_size // max(1, requests[0].n))
    groups = []
    for k in range(0, len(requests), per):
        groups += engine.generate(requests[k : k + per], sampling)
    return groups


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--mu", type=float, default=4.0, help="mean of log(length)")
    p.add_argument("--sigma", type=float, default=1.0, help="std of log(length)")
    p.add_argument("--decode-ms", type=float, default=1.0, help="decode time per token")
    p.add_argument("--max-batch-size", type=int, default=64, help="chunk size of the old loop")
    p.add_argument("--concurrency", type=int, default=128, help="in flight per server")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    sampling = SamplingParams(max_new_tokens=a.max_new_tokens)
    requests = [GenerateRequest([i + 1, 7], n=a.samples, seed=1000 + i) for i in range(a.prompts)]
    times: dict[str, list[float]] = {"chunked": [], "streaming": []}
    with ExitStack() as stack:
        fakes = [stack.enter_context(FakeSGLangServer(
            decode_s_per_token=a.decode_ms / 1000, length_tail=(a.mu, a.sigma)))
            for _ in range(a.servers)]
        engine = stack.enter_context(SGLangEngine(SGLangConfig(
            urls=[f.url for f in fakes], max_concurrency=a.concurrency, health_poll_s=0.05)))
        lengths = []
        for r in range(a.repeats + 1):  # first round warms up connections
            for mode in ("chunked", "streaming"):
                t0 = time.perf_counter()
                if mode == "chunked":
                    groups = chunked(engine, requests, sampling, a.max_batch_size)
                else:
                    groups = generate_round(engine, requests, sampling, progress=False)
                if r:
                    times[mode].append(time.perf_counter() - t0)
                lengths = [len(s.response_ids) for g in groups for s in g]
    lengths.sort()
    print(json.dumps({
        "servers": a.servers, "responses": len(lengths), "decode_ms": a.decode_ms,
        "max_batch_size": a.max_batch_size, "concurrency_per_server": a.concurrency,
        "length_median": lengths[len(lengths) // 2], "length_p99": lengths[int(0.99 * len(lengths))],
        "length_max": lengths[-1], "ideal_s": round(lengths[-1] * a.decode_ms / 1000, 3),
        **{f"{m}_median_s": round(statistics.median(t), 3) for m, t in times.items()},
        **{f"{m}_min_s": round(min(t), 3) for m, t in times.items()},
    }))


if __name__ == "__main__":
    main()
