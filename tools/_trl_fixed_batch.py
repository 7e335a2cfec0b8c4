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
from _trl_grpo_peer import exact_match, matched_grpo_config  # tools/ is sys.path[0]


def main() -> None:
    work, steps, lr, out = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    from datasets import load_dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOTrainer

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

    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    config = matched_grpo_config(out=out, steps=steps, prompts=len(batch), k=k, lr=lr, seed=0)
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
