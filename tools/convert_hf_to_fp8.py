"""Write a blockwise-FP8 (e4m3, 128x128 ``weight_scale_inv``) copy of an HF checkpoint.

    python tools/convert_hf_to_fp8.py --src /models/Qwen3-8B --dst /models/Qwen3-8B-FP8

The output loads in transformers (``FineGrainedFP8Config``) and in SGLang; servers started from
it receive blockwise-FP8 weight updates (``rollout.fp8=true`` converts automatically).
"""

from __future__ import annotations

import argparse

from megatron_gvpo.bridge.fp8_checkpoint import convert_hf_to_fp8


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="HF model folder (safetensors)")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    a = p.parse_args(argv)
    out = convert_hf_to_fp8(a.src, a.dst, tuple(a.block))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
