"""Build the tool-use demo (``megatron_gvpo.demo.calculator``): a warm-started tiny model and
three-digit addition prompts, into one folder.

    python tools/make_tool_demo.py --out-dir runs/tool_demo --seed 0

Writes ``model/`` (safetensors, config, char tokenizer), ``train.jsonl``, ``heldout.jsonl`` and
``tool_demo.json`` (the settings); prints the settings and seconds as one JSON line. Train on it
with the calculator environment (the command is in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.demo.calculator import ToolDemoConfig, build_tool_demo  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out-dir", type=Path, required=True)
    for name, value in asdict(ToolDemoConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    out_dir = args.pop("out_dir")
    result = build_tool_demo(out_dir, ToolDemoConfig(**args))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
