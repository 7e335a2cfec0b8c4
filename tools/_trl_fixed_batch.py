"""TRL's side of ``tools/grpo_update_vs_trl.py``: ``GRPOTrainer`` on a fixed batch, in TRL's venv.

    <trl python> _trl_fixed_batch.py WORK STEPS LR OUT

Not imported by the project (TRL is not a dependency). Generation is replaced by the fixed
completions of ``WORK/batch.json`` (``GRPOTrainer._generate_single_turn`` returns token ids and no
sampling logprobs, as its non-vLLM path does, trl 1.16 ``trl/trainer/grpo_trainer.py``); every
GRPOConfig field that decides the update is set explicitly. Writes ``OUT/weights.safetensors``
(the parameters after the last step) and ``OUT/grad_norms.json`` (pre-clip norm per step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    work, steps, lr, out = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    from datasets import load_dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(str(work / "model"))
    batch = json.loads((work / "batch.json").read_text())
    fixed = {
        tuple(tok(p)["input_ids"]): [
            tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * eos
            for t, eos in comps
        ]
        for p, comps in batch.items()
    }
    k = len(next(iter(batch.values())))

    def generate_fixed(self, prompt_ids, images, multimodal_fields, num_generations, **kw):
        seen, completions = {}, []
        for ids in prompt_ids:  # each prompt comes num_generations times
            j = seen.get(tuple(ids), 0)
            seen[tuple(ids)] = j + 1
            completions.append(fixed[tuple(ids)][j])
        return completions, None

    GRPOTrainer._generate_single_turn = generate_fixed

    def exact_match(prompts, completions, answer, **kw):
        pairs = zip(completions, answer, strict=True)
        return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in pairs]

    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    config = GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=len(batch) * k,
        num_generations=k, steps_per_generation=1, gradient_accumulation_steps=1,
        num_iterations=1, max_completion_length=4, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=0.0,
        epsilon=0.2, epsilon_high=0.2, loss_type="grpo", scale_rewards="group",
        importance_sampling_level="token", mask_truncated_completions=False,
        disable_dropout=True, gradient_checkpointing=False, use_vllm=False, bf16=False,
        fp16=False, use_cpu=True, seed=0, logging_steps=1, save_strategy="no", report_to="none",
        log_completions=False, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    dataset = load_dataset("json", data_files=str(work / "prompts.jsonl"), split="train")
    trainer = GRPOTrainer(
        model=model, reward_funcs=exact_match, args=config, train_dataset=dataset,
        processing_class=tok,
    )  # fmt: skip
    trainer.train()
    Path(out).mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().contiguous().clone() for n, p in trainer.model.named_parameters()}
    save_file(weights, f"{out}/weights.safetensors")
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    Path(out, "grad_norms.json").write_text(json.dumps(norms))


if __name__ == "__main__":
    main()
