"""TRL's side of ``tools/grpo_update_vs_trl.py --end-to-end``: ``GRPOTrainer`` on the demo.

    <trl python> _trl_demo_run.py MODEL DATA OUT STEPS LR SEED

Not imported by the project (TRL is not a dependency). The demo's warm-started model and prompts,
an exact-match reward, 16 prompts x 8 samples, the GRPO settings of
``_trl_grpo_peer.matched_grpo_config`` (constant lr, no KL, clip 0.2, Adam, gradient norm clipped
to 1). Saves the final model (HF
folder, safetensors) to ``OUT/final`` and the per-step mean rewards to ``OUT/rewards.json``.
"""

from __future__ import annotations

import json
import sys

import torch
from _trl_grpo_peer import exact_match, matched_grpo_config  # tools/ is sys.path[0]


def main() -> None:
    model_dir, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
    steps, lr, seed = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(1)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=data, split="train")
    prompts, k = 16, 8
    config = matched_grpo_config(out=out, steps=steps, prompts=prompts, k=k, lr=lr, seed=seed)
    trainer = GRPOTrainer(
        model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
        processing_class=tok,
    )  # fmt: skip
    trainer.train()
    trainer.save_model(f"{out}/final")
    tok.save_pretrained(f"{out}/final")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    with open(f"{out}/rewards.json", "w") as f:
        json.dump(rewards, f)


if __name__ == "__main__":
    main()
