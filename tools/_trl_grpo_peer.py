"""TRL's side of ``tools/bench_vs_trl.py``: ``GRPOTrainer`` on the bench task, run in TRL's venv.

Not imported by the project (TRL is not a dependency). Every GRPOConfig field that decides the
update is set explicitly to match our ``algorithm=grpo`` run; the field names and meanings are
those of trl 1.16.0 (``trl/trainer/grpo_config.py``):

- ``beta=0.0``: no KL term, so no reference model is loaded (ours: ``algorithm.kl_beta=0``).
- ``epsilon=epsilon_high=0.2``: the clip range (ours: ``eps_low=eps_high=0.2``).
- ``loss_type="grpo"``: token mean per sequence, then mean over sequences (DeepSeekMath GRPO,
  ours); TRL's default is "dapo".
- ``scale_rewards="group"``: advantages (R - group mean) / group std.
- ``num_iterations=1``, ``steps_per_generation=1``, ``gradient_accumulation_steps=1``: one
  optimizer step per generation batch, so old logprobs = the current policy's (TRL then skips the
  old-logprob pass, ``grpo_trainer.py`` ``_generate_and_score_completions``).
- ``importance_sampling_level="token"``, ``mask_truncated_completions=False``, ``top_k=0`` (off),
  ``top_p=1.0``, ``temperature`` as ours; plain ``generate`` (``use_vllm=False``).
- Optimizer: TrainingArguments' default AdamW (``adamw_torch_fused`` for torch >= 2.8), lr constant,
  betas (0.9, 0.999), eps 1e-8, ``weight_decay=0`` (= Adam), ``max_grad_norm=1.0``.
- ``bf16=False`` (GRPOConfig's default is True): fp32, as ours; ``disable_dropout=True``.
- ``gradient_checkpointing=False`` (TRL's ``base_config.py`` defaults it to True): we keep
  activations too (``model.recompute_granularity=None``), so neither side recomputes.
"""

from __future__ import annotations

import argparse

import torch


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer, strict=True)]


def matched_grpo_config(
    *, out: str, steps: int, prompts: int, k: int, lr: float, seed: int, max_new_tokens: int = 4,
    temperature: float = 1.0, epsilon: float = 0.2, max_grad_norm: float = 1.0,
):
    """The ``GRPOConfig`` matched to our ``algorithm=grpo`` run (the fields listed above); also
    used by ``_trl_fixed_batch.py`` and ``_trl_demo_run.py``."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=prompts * k,
        num_generations=k,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_completion_length=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=max_grad_norm,
        beta=0.0,
        epsilon=epsilon,
        epsilon_high=epsilon,
        loss_type="grpo",
        scale_rewards="group",
        importance_sampling_level="token",
        mask_truncated_completions=False,
        disable_dropout=True,
        gradient_checkpointing=False,
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=seed,
        logging_steps=1,  # one printed line per step: bench_vs_trl times the lines
        save_strategy="no",
        report_to="none",
        log_completions=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("model", "data", "out"):
        p.add_argument(f"--{name}", required=True)
    for name in ("prompts", "k", "steps", "max-new-tokens", "seed"):
        p.add_argument(f"--{name}", type=int, required=True)
    for name in ("lr", "epsilon", "max-grad-norm"):
        p.add_argument(f"--{name}", type=float, required=True)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--reward-file", help="a Python file with trl_toy_sum (bench_vs_trl's reward); default: "
        "exact_match above"
    )
    args = p.parse_args()
    torch.set_num_threads(1)

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = matched_grpo_config(
        out=args.out, steps=args.steps, prompts=args.prompts, k=args.k, lr=args.lr,
        seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        epsilon=args.epsilon, max_grad_norm=args.max_grad_norm,
    )
    reward = exact_match
    if args.reward_file:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_reward", args.reward_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        reward = module.trl_toy_sum
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()


if __name__ == "__main__":
    main()
