"""Our GRPO update against TRL's ``GRPOTrainer`` on one fixed batch: the same steps, compared.

    python tools/grpo_update_vs_trl.py --trl-python /work/trlvenv/bin/python [--steps 3 --lr 1e-4]

Both trainers start from the same tiny Qwen2 (random weights, tied embeddings, the demo's
character tokenizer) and train ``--steps`` steps on the same 4 prompts x 4 fixed completions
(sampling is replaced by the fixed completions on both sides: TRL's ``_generate_single_turn``,
our ``LocalEngine._generate_batch``), with an exact-match reward, GRPO settings made equal:
clip 0.2, group-std advantages, no KL, Adam (0.9, 0.999, 1e-8), no weight decay, constant lr,
gradient norm clipped to 1, one optimizer step per rollout, fp32. Prints one JSON line: the
pre-clip gradient norm of every step on both sides, and ||w_TRL - w_ours|| / ||w_TRL - w_0||
after the last step, for our default advantage epsilon (1e-6) and for TRL's (1e-4).

``--end-to-end`` instead trains both from the demo's warm-started model on its prompts (exact-match
reward, 16 prompts x 8, ``--steps`` steps at ``--lr`` constant, the settings above) for each of
``--seeds`` and prints mean ± std of the held-out greedy accuracy (``compare_algorithms.py``'s
held-out pairs and evaluation) and of the last-10 reward on both sides.

TRL is not a dependency of this project: install it into its own venv, e.g.
``python3 -m venv /work/trlvenv && /work/trlvenv/bin/pip install torch==2.13.0 'trl==1.16.*'``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_SIDE = Path(__file__).with_name("_trl_fixed_batch.py")
TRL_DEMO = Path(__file__).with_name("_trl_demo_run.py")
PROMPTS = {  # prompt -> fixed completions (text, ends with EOS); rewards 1 1 0 0 / 1 0 0 1 ...
    "12+34=": [["46", True], ["47", True], ["4", True], ["46", True]],
    "7+8=": [["15", True], ["15", True], ["1555", False], ["16", True]],
    "45+45=": [["90", True], ["09", True], ["9", False], ["900", True]],
    "3+60=": [["63", True], ["6", True], ["633", True], ["63", True]],
}
REWARD_SOURCE = '''def exact_match(sample):
    return 1.0 if sample.response.strip() == str(sample.label).strip() else 0.0
'''


def build_task(work: Path) -> None:
    """The model, prompts, fixed completions and reward module under ``work``."""
    sys.path.insert(0, str(REPO))
    from megatron_gvpo.demo.task import save_char_tokenizer
    from megatron_gvpo.models.tiny import save_tiny_hf_model

    model = work / "model"
    if not (model / "model.safetensors").is_file():
        tok = save_char_tokenizer(model)
        save_tiny_hf_model(
            model, "qwen2", seed=0, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tok),
            max_position_embeddings=64, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        save_char_tokenizer(model)
    with open(work / "prompts.jsonl", "w") as f:
        for p in PROMPTS:
            a, b = p[:-1].split("+")
            f.write(json.dumps({"prompt": p, "answer": str(int(a) + int(b))}) + "\n")
    (work / "batch.json").write_text(json.dumps(PROMPTS))
    (work / "exact_reward.py").write_text(REWARD_SOURCE)


def fixed_completions(work: Path, tokenizer) -> dict[tuple[int, ...], list[list[int]]]:
    """Prompt token ids -> completion token ids (EOS appended where the batch says so)."""
    out = {}
    for p, comps in json.loads((work / "batch.json").read_text()).items():
        out[tuple(tokenizer(p)["input_ids"])] = [
            tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * eos
            for t, eos in comps
        ]
    return out


def ours_side(work: Path, steps: int, lr: float, run_dir: Path, adv_eps: float | None) -> None:
    """Our trainer in this process, the engine's sampling replaced by the fixed completions."""
    sys.path.insert(0, str(REPO))
    from megatron_gvpo.data.tokenizer import load_tokenizer
    from megatron_gvpo.rollout import local

    tok = load_tokenizer(work / "model")
    fixed = fixed_completions(work, tok)

    def generate_fixed(self, rows, sampling):
        for r in rows:
            r.tokens = list(fixed[tuple(r.prompt)][r.key[1]])
            r.logprobs = [0.0] * len(r.tokens)  # unused: the actor recomputes theta'
            r.finish = "stop" if r.tokens[-1] == tok.eos_token_id else "length"

    local.LocalEngine._generate_batch = generate_fixed
    if adv_eps is not None:
        import megatron_gvpo.trainer.objectives.grpo as objective

        objective.group_advantages = functools.partial(objective.group_advantages, eps=adv_eps)
    reward = f"[{{name:'{work / 'exact_reward.py'}:exact_match',timeout_s:null}}]"
    sys.argv = [
        sys.argv[0], "model=hf", "data=jsonl", "rollout=local", "algorithm=grpo",
        f"model.path={work / 'model'}", "model.precision=fp32", f"data.path={work / 'prompts.jsonl'}",
        "data.apply_chat_template=false", "data.shuffle=false", f"reward.rewards={reward}",
        "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=4",
        f"trainer.prompts_per_step={len(fixed)}", "trainer.updates_per_round=1",
        f"trainer.max_steps={steps}", f"trainer.lr={lr}", f"trainer.min_lr={lr}",
        "trainer.lr_decay_style=constant", "trainer.weight_decay=0.0", "trainer.clip_grad=1.0",
        f"trainer.save_interval={steps}", "trainer.export_hf=true", "trainer.plot=false",
        f"trainer.run_dir={run_dir}", "algorithm.eps_low=0.2", "algorithm.eps_high=0.2",
        "algorithm.kl_beta=0.0",
    ]  # fmt: skip
    from megatron_gvpo.train import main

    main()


def relative_difference(trl_weights: Path, ours_hf: Path, init: Path) -> float:
    """||w_TRL - w_ours|| / ||w_TRL - w_0|| over every parameter."""
    from safetensors.torch import load_file

    a = load_file(str(trl_weights))
    b = {}
    for f in ours_hf.glob("*.safetensors"):
        b.update(load_file(str(f)))
    w0 = load_file(str(init))
    num = sum((a[n].double() - b[n].double()).square().sum().item() for n in a)
    den = sum((a[n].double() - w0[n].double()).square().sum().item() for n in a)
    return (num / den) ** 0.5


def end_to_end(args, env: dict) -> dict:
    """Ours and TRL from the demo model, ``args.seeds``; greedy held-out accuracy of each."""
    import statistics

    sys.path.insert(0, str(REPO / "tools"))
    from compare_algorithms import greedy_eval, heldout_rows

    from megatron_gvpo.demo.model import demo_model_path
    from megatron_gvpo.demo.task import generate_toy_dataset, write_jsonl

    work, seeds = Path(args.work) / "end_to_end", [int(x) for x in args.seeds.split(",")]
    model = demo_model_path(os.environ.get("MEGATRON_GVPO_CACHE", "~/.cache/megatron_gvpo"))
    rows = heldout_rows(seeds)
    reward = f"[{{name:'{Path(args.work) / 'exact_reward.py'}:exact_match',timeout_s:null}}]"
    out = {"heldout_prompts": len(rows), "initial": greedy_eval(model, rows)["heldout_greedy_acc"]}
    for s in seeds:
        data = write_jsonl(generate_toy_dataset(2000, seed=s), work / f"data{s}.jsonl")
        run = {side: work / f"{side}_s{s}" for side in ("ours", "trl")}
        for d in run.values():
            subprocess.run(["rm", "-rf", str(d)], check=True)
        trl_cmd = [args.trl_python, str(TRL_DEMO), str(model), str(data), str(run["trl"]),
                   str(args.steps), str(args.lr), str(s)]  # fmt: skip
        subprocess.run(trl_cmd, env=env, check=True, capture_output=True)
        ours_cmd = [
            sys.executable, "-m", "megatron_gvpo.train", "model=hf", "data=jsonl",
            "algorithm=grpo", f"model.path={model}", "model.precision=fp32",
            "data.apply_chat_template=false", f"data.path={data}", f"data.seed={s}",
            f"reward.rewards={reward}", "rollout.n_samples_per_prompt=8",
            "rollout.max_new_tokens=4", "trainer.prompts_per_step=16",
            f"trainer.max_steps={args.steps}", f"trainer.lr={args.lr}",
            f"trainer.min_lr={args.lr}", "trainer.weight_decay=0.0", "trainer.clip_grad=1.0",
            f"trainer.seed={s}", f"trainer.save_interval={args.steps}", "trainer.export_hf=true",
            "trainer.plot=false", f"trainer.run_dir={run['ours']}", "algorithm.eps_low=0.2",
            "algorithm.eps_high=0.2", "algorithm.kl_beta=0.0",
        ]  # fmt: skip
        env_ours = {**env, "PYTHONPATH": str(REPO)}
        subprocess.run(ours_cmd, env=env_ours, check=True, capture_output=True, cwd=REPO)
        metrics = [json.loads(x) for x in (run["ours"] / "metrics.jsonl").read_text().splitlines()]
        hf = run["ours"] / "checkpoints" / f"step_{args.steps:06d}" / "hf"
        trl_rewards = json.loads((run["trl"] / "rewards.json").read_text())
        out[f"ours_s{s}"] = {
            "acc": greedy_eval(hf, rows)["heldout_greedy_acc"],
            "last10": statistics.fmean(m["reward/mean"] for m in metrics[-10:]),
        }
        out[f"trl_s{s}"] = {
            "acc": greedy_eval(run["trl"] / "final", rows)["heldout_greedy_acc"],
            "last10": statistics.fmean(trl_rewards[-10:]),
        }
    for side in ("ours", "trl"):
        for key in ("acc", "last10"):
            v = [out[f"{side}_s{s}"][key] for s in seeds]
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            out[f"{side}_{key}"] = f"{statistics.fmean(v):.3f} ± {std:.3f}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trl-python", help="python of a venv with trl installed")
    p.add_argument("--work", default="/tmp/grpo_update_vs_trl")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--end-to-end", action="store_true", help="train both from the demo model")
    p.add_argument("--seeds", default="0,1,2,3", help="--end-to-end: comma list of seeds")
    p.add_argument("--ours-side", help=argparse.SUPPRESS)  # run dir: internal, one side per process
    p.add_argument("--adv-eps", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.ours_side:
        ours_side(work, args.steps, args.lr, Path(args.ours_side), args.adv_eps)
        return
    if not args.trl_python or not Path(args.trl_python).is_file():
        p.error("--trl-python: the python of a venv with trl installed (see the docstring)")
    work.mkdir(parents=True, exist_ok=True)
    build_task(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    if args.end_to_end:
        print(json.dumps(end_to_end(args, env), ensure_ascii=False))
        return
    trl_out = work / "trl"
    cmd = [args.trl_python, str(TRL_SIDE), str(work), str(args.steps), str(args.lr), str(trl_out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    trl_norms = json.loads((trl_out / "grad_norms.json").read_text())
    result = {"steps": args.steps, "lr": args.lr, "trl_grad_norm": trl_norms}
    for eps in (None, 1e-4):
        run = work / f"ours_eps{eps or 'default'}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        cmd = [sys.executable, __file__, f"--work={work}", f"--steps={args.steps}",
               f"--lr={args.lr}", f"--ours-side={run}"] + ([f"--adv-eps={eps}"] if eps else [])  # fmt: skip
        env_ours = {**env, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, env=env_ours, check=True, capture_output=True, cwd=REPO)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        hf = run / "checkpoints" / f"step_{args.steps:06d}" / "hf"
        key = "adv_eps_1e-6" if eps is None else "adv_eps_1e-4"
        result[f"ours_grad_norm_{key}"] = [r["grad_norm"] for r in rows]
        result[f"rel_weight_diff_{key}"] = relative_difference(
            trl_out / "weights.safetensors", hf, work / "model" / "model.safetensors"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
