"""Build the demo's warm-start model (``megatron_gvpo.demo.model``) into a folder.

    python tools/make_demo_model.py --out-dir runs/toy/hf --seed 0

The recipe (a teacher that shows its work in ``--worked-share`` of the answers, and why the
result is a moderate, coherent starting policy) is in that module's docstring. One torch thread
by default. Writes safetensors, config, tokenizer and generation config into a temporary folder,
then renames it to ``--out-dir``. Prints one JSON line: held-out greedy accuracy, and at
temperature 1 the mean reward, the mean response-token entropy (nats) and the share of answers
that show their work; seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.demo.model import WarmStartConfig, make_demo_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out-dir", type=Path, required=True)
    for name, value in asdict(WarmStartConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's choice)")
    args = vars(p.parse_args(argv))
    out_dir, threads = args.pop("out_dir"), args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    result = make_demo_model(WarmStartConfig(**args), out_dir)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
