"""The demo's warm-start model: a tiny llama-family model briefly trained on the toy task.

Plain torch + transformers (AdamW, fp32, CPU) for a fixed number of steps on two-digit additions,
loss on the answer and EOS only. The training answers come from a teacher that shows its work
(``task.worked_answer``: ``[7+8=15,5+6+1=12]125``) in ``worked_share`` of the rows and writes the
bare sum in the others. After ``steps`` steps the model has learned both habits unevenly: worked
answers are mostly right, bare sums often wrong, and it starts a worked answer with probability
about ``worked_share``. So its greedy answer is a bare sum (held-out accuracy about 0.4), its
temperature-1 samples are coherent (mean response-token entropy about 0.3 nats) and right about
half the time. RL from the exact reward then raises held-out accuracy by shifting the policy to
the answers that earn it (showing the work) and sharpening them. ``tools/make_demo_model.py`` is
the command-line front end; the trainer calls :func:`build_demo_model` when the demo model is not
cached yet.
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_gvpo.demo.task import (
    build_char_tokenizer,
    generate_toy_dataset,
    is_heldout,
    save_char_tokenizer,
    toy_prompt,
    toy_reward,
    worked_answer,
)

MAX_NEW_TOKENS = 24  # the longest worked answer ("[9+9=18,9+9+1=19]198") is 20 tokens, then EOS
EVAL_SEED_OFFSET = 1_000_003  # held-out eval prompts are drawn with seed + this


@dataclass
class WarmStartConfig:
    """Model size and the fixed supervised schedule (defaults chosen as the module doc says)."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    worked_share: float = 0.3
    """Share of training answers that show their work (the rest are bare sums)."""
    hidden: int = 64
    layers: int = 2
    eval_prompts: int = 256
    eval_samples: int = 4  # samples per eval prompt at temperature 1
    family: str = "llama"
    """llama, or qwen3_moe: the same size with every MLP a mixture of 4 experts, top-2 (a
    model to measure routing replay on), or qwen2_moe: those experts plus a shared expert behind
    its sigmoid gate."""


def _tiny_shape(tokenizer, hidden: int, layers: int) -> dict:
    """What the demo model's dense and MoE configs share: valid for TP2 x PP2 (4 heads, 2 KV
    heads, an even layer count), the character tokenizer's ids."""
    if layers % 2 or hidden % 4:
        raise ValueError(f"need an even layer count and hidden % 4 == 0, got {layers}, {hidden}")
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_llama_config(tokenizer, hidden: int, layers: int):
    """A small llama config valid for TP2 x PP2 (4 heads, 2 KV heads, an even layer count)."""
    from transformers import LlamaConfig

    return LlamaConfig(**_tiny_shape(tokenizer, hidden, layers))


def tiny_moe_config(tokenizer, hidden: int, layers: int):
    """The demo model's shape as a qwen3_moe: every layer routes each token to 2 of 4 experts,
    each expert as wide as the dense model's MLP divided by 2 (the same active parameters)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_tiny_shape(tokenizer, hidden, layers),
        moe_intermediate_size=2 * hidden,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=hidden // 4,
    )


def tiny_qwen2_moe_config(tokenizer, hidden: int, layers: int):
    """The demo model's shape as a qwen2_moe: every layer routes each token to 2 of 4 experts of
    width 2 x hidden and adds a shared expert of the same width scaled by its sigmoid gate
    (q/k/v biases, top-k probabilities not renormalised: transformers' defaults)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_tiny_shape(tokenizer, hidden, layers),
        moe_intermediate_size=2 * hidden,
        shared_expert_intermediate_size=2 * hidden,
        num_experts=4,
        num_experts_per_tok=2,
    )


CONFIG_BUILDERS = {
    "llama": tiny_llama_config,
    "qwen3_moe": tiny_moe_config,
    "qwen2_moe": tiny_qwen2_moe_config,
}


def teacher_rows(n: int, seed: int, worked_share: float) -> list[dict[str, str]]:
    """``n`` warm-start rows ``{prompt, response}`` on training-split pairs: a worked answer with
    probability ``worked_share``, else the bare sum."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if is_heldout(a, b):
            continue
        response = worked_answer(a, b) if rng.random() < worked_share else str(a + b)
        rows.append({"prompt": toy_prompt(a, b), "response": response})
    return rows


def encode_examples(rows, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[BOS] prompt response [EOS]`` ids, and labels masked to response + EOS.

    A row may give ``segments`` instead of ``response``: ``(text, trained)`` pairs, each
    tokenised alone (a tool's result is not trained on: its labels are masked)."""
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        ids, lab = list(prompt), [-100] * len(prompt)
        for text, trained in row.get("segments") or [(row["response"], True)]:
            part = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += part
            lab += part if trained else [-100] * len(part)
        ids.append(tokenizer.eos_token_id)
        lab.append(tokenizer.eos_token_id)
        seqs.append(ids)
        labels.append(lab)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    return ids, lab


@torch.no_grad()
def sample_answers(
    model, tokenizer, prompts, temperature: float, gen: torch.Generator
) -> tuple[list[str], float]:
    """Decode answers for equal-length prompts: greedy when ``temperature`` is 0, else sampled
    from the full softmax (no top-k/top-p), stopping at EOS or ``MAX_NEW_TOKENS``. Also returns
    the mean entropy (nats) of the temperature-scaled distribution over the response tokens."""
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    out = torch.empty(len(prompts), 0, dtype=torch.long)
    alive = torch.ones(len(prompts), dtype=torch.bool)
    entropy, tokens = 0.0, 0
    for _ in range(MAX_NEW_TOKENS):
        logits = model(torch.cat([ids, out], 1)).logits[:, -1].float()
        logp = torch.log_softmax(logits / (temperature or 1.0), -1)
        entropy += float(-(logp.exp() * logp).sum(-1)[alive].sum())
        tokens += int(alive.sum())
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        out = torch.cat([out, nxt[:, None]], 1)
        alive &= nxt != tokenizer.eos_token_id
        if not alive.any():
            break
    texts = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, entropy / max(tokens, 1)


def evaluate(model, tokenizer, rows, seed: int, samples: int) -> dict[str, float]:
    """Greedy accuracy, and at temperature 1 the mean reward, the mean response-token entropy and
    the share of answers that show their work, on ``rows``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    greedy, _ = sample_answers(model, tokenizer, prompts, 0.0, gen)
    sampled, entropy = [], 0.0
    for _ in range(samples):
        texts, ent = sample_answers(model, tokenizer, prompts, 1.0, gen)
        sampled += texts
        entropy += ent / samples
    g_rewards = [toy_reward(t, a) for t, a in zip(greedy, answers, strict=True)]
    s_rewards = [toy_reward(t, a) for t, a in zip(sampled, answers * samples, strict=True)]
    return {
        "greedy_accuracy": sum(g_rewards) / len(rows),
        "sampled_reward": sum(s_rewards) / len(s_rewards),
        "sampled_entropy": entropy,
        "sampled_worked_share": sum(t.startswith("[") for t in sampled) / len(sampled),
    }


def lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to zero: ends the short run in a settled state."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def train(cfg: WarmStartConfig, tokenizer, rows: list[dict] | None = None):
    """Build the model from ``cfg.seed`` and train it for exactly ``cfg.steps`` steps on
    ``rows`` (default: the teacher's two-digit rows)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.family not in CONFIG_BUILDERS:
        raise ValueError(f"family {cfg.family!r}: use {', '.join(CONFIG_BUILDERS)}")
    config = CONFIG_BUILDERS[cfg.family](tokenizer, cfg.hidden, cfg.layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
    if rows is None:
        rows = teacher_rows(cfg.steps * cfg.batch_size, cfg.seed, cfg.worked_share)
    model.train()
    for step in range(cfg.steps):
        batch = rows[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        ids, labels = encode_examples(batch, tokenizer)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def save(model, tokenizer, out_dir: Path) -> None:
    """Write weights, config, tokenizer and generation config; publish the folder atomically."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_char_tokenizer(tmp)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=MAX_NEW_TOKENS,
    ).save_pretrained(tmp)
    if out_dir.exists():  # a finished folder is replaced whole, never half-written
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def make_demo_model(cfg: WarmStartConfig, out_dir: str | Path) -> dict:
    """Train, evaluate on held-out pairs, save to ``out_dir``; return the metrics."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    tokenizer = build_char_tokenizer()
    model = train(cfg, tokenizer)
    heldout = generate_toy_dataset(
        cfg.eval_prompts, seed=cfg.seed + EVAL_SEED_OFFSET, split="heldout"
    )
    metrics = evaluate(model, tokenizer, heldout, cfg.seed, cfg.eval_samples)
    save(model, tokenizer, Path(out_dir))
    return {
        "out_dir": str(out_dir),
        **asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        **{k: round(v, 4) for k, v in metrics.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }


def build_demo_model(out_dir: str | Path, seed: int = 0) -> dict:
    """The default warm-start model, built with one torch thread (reproducible, and faster than
    several on a busy 2-core box); returns its metrics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_demo_model(WarmStartConfig(seed=seed), out_dir)
    finally:
        torch.set_num_threads(threads)


DEMO_MODEL = "toy_addition_v2"  # bump when the demo model's recipe changes


def demo_model_path(cache_dir: str | Path) -> Path:
    """The demo model under ``cache_dir``, built first (by rank 0) when it is missing; other
    ranks wait for it."""
    out = Path(os.path.expanduser(str(cache_dir))) / DEMO_MODEL
    if (out / "config.json").is_file():
        return out
    if int(os.environ.get("RANK", "0")) == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Jobs started together share the cache: one builds, the others wait on the lock and
        # find the model there (the kernel drops the lock of a killed builder).
        with open(out.with_name(out.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").is_file():
                print(f"building the demo model into {out} (once; cached)", flush=True)
                build_demo_model(out)
    else:
        deadline = time.monotonic() + 1800
        while not (out / "config.json").is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not build the demo model into {out}")
            time.sleep(1)
    return out
