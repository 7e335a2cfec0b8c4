"""The demo's warm-start model: a tiny llama-family model briefly trained on the toy task.

Plain torch + transformers (AdamW, fp32, CPU) for a fixed number of steps on two-digit additions,
loss on the answer and EOS only. Label smoothing 0.5 leaves half the probability spread over the
vocabulary: the greedy answer is mostly right, but answers sampled at temperature 1 earn a mean
reward of about 0.15-0.2, which RL then lifts by sharpening the policy. (Greedy accuracy is not
kept low on purpose: on this task it jumps at a seed-dependent step, so a half-trained model is
not reproducible across seeds.) ``tools/make_demo_model.py`` is the command-line front end; the
trainer calls :func:`build_demo_model` when the demo model is not cached yet.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_gvpo.demo.task import (
    build_char_tokenizer,
    generate_toy_dataset,
    save_char_tokenizer,
    toy_reward,
)

MAX_NEW_TOKENS = 4  # a two-digit sum has at most 3 digits, then EOS
EVAL_SEED_OFFSET = 1_000_003  # held-out eval prompts are drawn with seed + this


@dataclass
class WarmStartConfig:
    """Model size and the fixed supervised schedule (defaults chosen as the module doc says)."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    label_smoothing: float = 0.5
    hidden: int = 64
    layers: int = 2
    eval_prompts: int = 256
    eval_samples: int = 4  # samples per eval prompt at temperature 1


def tiny_llama_config(tokenizer, hidden: int, layers: int):
    """A small llama config valid for TP2 x PP2 (4 heads, 2 KV heads, an even layer count)."""
    from transformers import LlamaConfig

    if layers % 2 or hidden % 4:
        raise ValueError(f"need an even layer count and hidden % 4 == 0, got {layers}, {hidden}")
    return LlamaConfig(
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


def encode_examples(rows, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[BOS] prompt answer [EOS]`` ids, and labels masked to answer + EOS."""
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        ids = prompt + answer + [tokenizer.eos_token_id]
        seqs.append(ids)
        labels.append([-100] * len(prompt) + ids[len(prompt) :])
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    return ids, lab


@torch.no_grad()
def sample_answers(
    model, tokenizer, prompts, temperature: float, gen: torch.Generator
) -> list[str]:
    """Decode answers for equal-length prompts: greedy when ``temperature`` is 0, else sampled
    from the full softmax (no top-k/top-p), stopping at EOS or ``MAX_NEW_TOKENS``."""
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    out = torch.empty(len(prompts), 0, dtype=torch.long)
    for _ in range(MAX_NEW_TOKENS):
        logits = model(torch.cat([ids, out], 1)).logits[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        out = torch.cat([out, nxt[:, None]], 1)
    texts = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def evaluate(model, tokenizer, rows, seed: int, samples: int) -> dict[str, float]:
    """Greedy accuracy and reward, and mean reward and exact rate at temperature 1, on ``rows``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    greedy = sample_answers(model, tokenizer, prompts, 0.0, gen)
    sampled = [
        t for _ in range(samples) for t in sample_answers(model, tokenizer, prompts, 1.0, gen)
    ]
    g_rewards = [toy_reward(t, a) for t, a in zip(greedy, answers, strict=True)]
    s_rewards = [toy_reward(t, a) for t, a in zip(sampled, answers * samples, strict=True)]
    return {
        "greedy_accuracy": sum(r == 1.0 for r in g_rewards) / len(rows),
        "greedy_reward": sum(g_rewards) / len(rows),
        "sampled_reward": sum(s_rewards) / len(s_rewards),
        "sampled_accuracy": sum(r == 1.0 for r in s_rewards) / len(s_rewards),
    }


def lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to zero: ends the short run in a settled state."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def train(cfg: WarmStartConfig, tokenizer):
    """Build the model from ``cfg.seed`` and train it for exactly ``cfg.steps`` steps."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    config = tiny_llama_config(tokenizer, cfg.hidden, cfg.layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
    rows = generate_toy_dataset(cfg.steps * cfg.batch_size, seed=cfg.seed, split="train")
    model.train()
    for step in range(cfg.steps):
        batch = rows[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        ids, labels = encode_examples(batch, tokenizer)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=cfg.label_smoothing,
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


DEMO_MODEL = "toy_addition_v1"  # bump when the demo model's recipe changes


def demo_model_path(cache_dir: str | Path) -> Path:
    """The demo model under ``cache_dir``, built first (by rank 0) when it is missing; other
    ranks wait for it."""
    out = Path(os.path.expanduser(str(cache_dir))) / DEMO_MODEL
    if (out / "config.json").is_file():
        return out
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"building the demo model into {out} (once; cached)", flush=True)
        build_demo_model(out)
    else:
        deadline = time.monotonic() + 1800
        while not (out / "config.json").is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not build the demo model into {out}")
            time.sleep(1)
    return out
