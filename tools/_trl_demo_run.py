"""TRL's side of ``tools/grpo_update_vs_trl.py --end-to-end``: ``GRPOTrainer`` on the demo.

    <trl python> _trl_demo_run.py MODEL DATA OUT STEPS LR SEED

Not imported by the project (TRL is not a dependency). The demo's warm-started model and prompts,
an exact-match reward, 16 prompts x 8 samples, GRPO settings as in ``_trl_fixed_batch.py``
(constant lr, no KL, clip 0.2, Adam, gradient norm clipped to 1). Saves the final model (HF
folder, safetensors) to ``OUT/final`` and the per-step mean rewards to ``OUT/rewards.json``.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    model_dir, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
    steps, lr, seed = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(1)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    def exact_match(prompts, completions, answer, **kw):
        pairs = zip(completions, answer, strict=True)
        return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in pairs]

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=data, split="train")
    prompts, k = 16, 8
    config = GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=prompts * k,
        num_generations=k, steps_per_generation=1, gradient_accumulation_steps=1,
        num_iterations=1, max_completion_length=4, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.0,
        epsilon=0.2, epsilon_high=0.2, loss_type="grpo", scale_rewards="group",
        importance_sampling_level="token", mask_truncated_completions=False,
        disable_dropout=True, gradient_checkpointing=False, use_vllm=False, bf16=False,
        fp16=False, use_cpu=True, seed=seed, logging_steps=1, save_strategy="no",
        report_to="none", log_completions=False, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
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
