"""The embedded rollout engine: a transformers causal LM and our own batched sampling loop.

Runs anywhere transformers does (CPU by default). Prompts are left-padded into a batch with an
attention mask and explicit position ids, then decoded one token per step with the model's KV
cache. Every response row draws from its own ``torch.Generator`` seeded with
``response_seed(seed, j)``, one uniform per generated token, so a seeded response does not depend
on which other rows share its batch (up to float rounding of the padded forward).

Logprobs follow SGLang: ``log_softmax(logits / temperature)`` of the chosen token, before top-k /
top-p truncation. Greedy decoding (temperature 0) reports ``log_softmax(logits)`` (temperature 1).

Mixture-of-experts routes (``return_routes``): forward hooks on transformers' router modules (the
class its ``router_logits`` output recorder names, ``Qwen3MoeTopKRouter`` for qwen3_moe) take
the top-k expert indices the router returned for every token the model processed, prefill and
decode, so ``Sample.routes`` holds exactly the experts that produced the sampled logits; the
last response token is never fed back, so it has none (as SGLang reports them).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_gvpo.bridge.fp8 import DEFAULT_BLOCK, FP8_DTYPE, SCALE_SUFFIX, dequantize_blockwise
from megatron_gvpo.bridge.mapping import unfuse_experts
from megatron_gvpo.data.tokenizer import CHECKPOINT_META, hf_dir, load_tokenizer
from megatron_gvpo.parallel.cpu_compat import native_torch
from megatron_gvpo.rollout.base import (
    GenerateRequest,
    NamedTensors,
    RolloutEngine,
    Sample,
    SamplingParams,
    response_seed,
)


@dataclass
class _Row:
    """One response being generated."""

    key: tuple[int, int]  # (request index, response index)
    prompt: list[int]
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    cut: int | None = None  # where the matched stop string starts in the decoded text
    routes: list[torch.Tensor] = field(default_factory=list)  # [MoE layers, n, k] per forward


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


class _Uniforms:
    """The uniforms of a batch's rows, each from its own generator, drawn ``chunk`` per row at a
    time: a row's stream is read in the same order as one draw per generated token, so the values
    are the same (every live row takes one per decode step; rows only ever leave the batch)."""

    def __init__(self, rows: list[_Row], chunk: int):
        self.rows, self.chunk = rows, max(1, chunk)
        self.buf = torch.empty(len(rows), self.chunk, dtype=torch.float64)
        self.col = self.chunk  # the column of the next uniform; a full chunk draws first

    def next(self, live: list[int]) -> torch.Tensor:
        """One uniform for each row in ``live``, in that order."""
        if self.col == self.chunk:
            for b in live:
                self.buf[b] = torch.rand(
                    self.chunk, generator=self.rows[b].gen, dtype=torch.float64
                )
            self.col = 0
        u = self.buf[live, self.col]
        self.col += 1
        return u


# Uniforms drawn per row at a time: one call covers a short response, and a long max_new_tokens
# does not draw (or hold) uniforms that a response ending early never uses.
_UNIFORM_CHUNK = 64


def check_model_dir(path: str | Path) -> Path:
    """The HF folder, after checking it exists and holds config.json and safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"rollout model path {path} does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"rollout model path {path}: no config.json")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"rollout model path {path}: no *.safetensors files (pickled .bin checkpoints are "
            "not loaded)"
        )
    return path


def truncate_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero all but the top-k tokens, then all but the smallest set holding top_p of the rest."""
    if top_k == -1 and top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    if top_k > 0:
        sorted_p[..., top_k:] = 0
    if top_p < 1.0:
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each token
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)


def draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """Inverse-CDF draw of one token from unnormalised ``probs`` [V], one uniform from ``gen``."""
    u = torch.rand((), generator=gen, dtype=torch.float64).item()
    cdf = probs.double().cumsum(0)
    x = (cdf[-1] * u).reshape(1)
    return int(torch.searchsorted(cdf, x, right=True).clamp_(max=probs.numel() - 1))


class LocalEngine(RolloutEngine):
    """transformers ``AutoModelForCausalLM`` from an HF folder (safetensors), sampled in-process.

    ``tokenizer`` (anything with ``decode(ids, skip_special_tokens=True)``) is used for
    ``Sample.text`` and stop strings; by default the folder's ``tokenizer.json`` if present, else
    none (text is then empty and stop strings are refused). ``eos_token_ids`` defaults to the
    model's generation config and config.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "auto",
        trust_remote_code: bool = False,
        tokenizer=None,
        max_batch_size: int = 64,
        eos_token_ids: Sequence[int] | None = None,
        fp8_block: tuple[int, int] = DEFAULT_BLOCK,
        return_routes: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.trust_remote_code = trust_remote_code
        if (Path(model_path) / CHECKPOINT_META).is_file():
            # A converted Megatron checkpoint: architecture from its hf/ folder; the weights
            # arrive with the trainer's first update_weights, before any rollout.
            from transformers import AutoConfig

            self.path = hf_dir(model_path)
            config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=config.dtype, trust_remote_code=trust_remote_code
            )
        else:
            self.path = check_model_dir(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(self.path),
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
        self.model.to(self.device).eval()
        if dtype != "auto":  # also for a converted checkpoint, built in its config's dtype
            self.model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        self.tokenizer = tokenizer if tokenizer is not None else self._folder_tokenizer()
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else self._eos_ids())
        self.max_batch_size = max_batch_size
        self.fp8_block = tuple(fp8_block)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # Per-expert names (as checkpoints and the trainer's export have them) are views into
        # transformers' fused 3-D expert parameters, so a sync writes straight into them.
        self._params = unfuse_experts(dict(self.model.named_parameters(remove_duplicate=False)))
        self._version = -1
        # transformers >= 5.24 names the KV-cache argument ``cache`` (``past_key_values`` warns).
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._captured: list[torch.Tensor] | None = None  # one forward's routes, per MoE layer
        self.return_routes = return_routes
        if return_routes:
            self._hook_routers()

    def _hook_routers(self) -> None:
        """Forward hooks on the model's routers that keep each forward's top-k expert indices."""
        recorder = getattr(self.model, "_can_record_outputs", {}).get("router_logits")
        router_cls = getattr(recorder, "target_class", None)
        routers = [m for m in self.model.modules() if router_cls and isinstance(m, router_cls)]
        if not routers:
            raise ValueError(
                f"model.moe.routing_replay=rollout: {type(self.model).__name__} has no "
                "mixture-of-experts routers to report routes from"
            )
        top_k = self.model.config.num_experts_per_tok

        def keep(module, args, output) -> None:
            if self._captured is None:
                return
            if isinstance(output, tuple) and len(output) >= 3:  # (logits, scores, indices)
                indices = output[2]
            else:  # logits only: transformers' choice, top-k of the softmax
                logits = output[0] if isinstance(output, tuple) else output
                indices = torch.softmax(logits.float(), -1).topk(top_k, dim=-1).indices
            self._captured.append(indices.detach().to("cpu", torch.int32))

        for router in routers:
            router.register_forward_hook(keep)

    def _folder_tokenizer(self):
        """The folder's tokenizer through the one loader (``data.tokenizer``), or None."""
        if not (self.path / "tokenizer.json").is_file():
            return None
        return load_tokenizer(self.path, self.trust_remote_code)

    def _eos_ids(self) -> list[int]:
        """EOS ids of the generation config and the model config (either may hold a list)."""
        ids: list[int] = []
        for cfg in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(cfg, "eos_token_id", None)
            ids += [eos] if isinstance(eos, int) else list(eos or [])
        return ids

    # ---- generation -------------------------------------------------------------------------

    @native_torch()  # the decode loop makes no CUDA assumption: no CPU compat mode around it
    def generate(
        self, requests: Sequence[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """Responses per request, in order; rows are batched by prompt length."""
        self._check_alive()
        if sampling.stop and self.tokenizer is None:
            raise ValueError(
                "sampling.stop needs a tokenizer: the model folder has no tokenizer.json"
            )
        rows = []
        for i, req in enumerate(requests):
            self._check_prompt(i, req.prompt_ids)
            for j in range(req.n):
                rows.append(
                    _Row((i, j), list(req.prompt_ids), _generator(response_seed(req.seed, j)))
                )
        rows.sort(key=lambda r: len(r.prompt))
        for start in range(0, len(rows), self.max_batch_size):
            self._generate_batch(rows[start : start + self.max_batch_size], sampling)
        by_key = {r.key: self._to_sample(r) for r in rows}
        return [[by_key[i, j] for j in range(req.n)] for i, req in enumerate(requests)]

    def _check_prompt(self, i: int, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"request {i}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})"
            )

    @torch.no_grad()
    def _generate_batch(self, rows: list[_Row], sampling: SamplingParams) -> None:
        """Decode ``rows`` together with one KV cache until each stops or hits max_new_tokens.

        Each distinct prompt is prefilled once (a request's samples are adjacent rows) and its
        cache rows, logits and routes are then repeated for each of its samples."""
        from transformers import DynamicCache

        first = [b for b, r in enumerate(rows) if b == 0 or r.prompt != rows[b - 1].prompt]
        counts = torch.tensor(first + [len(rows)]).diff()  # samples per distinct prompt
        expand = torch.arange(len(first)).repeat_interleave(counts)  # each row's prefilled row
        ids, mask = self._left_pad([rows[b].prompt for b in first])
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        # The model fills this cache in place; only its keyword changed across transformers.
        cache = {self._cache_kwarg: DynamicCache(config=self.model.config)}
        uniforms = _Uniforms(rows, min(sampling.max_new_tokens, _UNIFORM_CHUNK))
        fed = [len(r.prompt) for r in rows]  # real (unpadded) tokens each row feeds this forward
        for step in range(sampling.max_new_tokens):
            if self.return_routes:
                self._captured = []
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **cache,
            )
            logits = out.logits[:, -1].float()
            prefill = step == 0 and len(first) < len(rows)
            if prefill:  # one cache row per sample from here on
                cache[self._cache_kwarg].reorder_cache(expand.to(self.device))
                logits, mask, pos = logits[expand], mask[expand], pos[expand]
            if self.return_routes:
                self._keep_routes(rows, fed, ids.shape[1], expand if prefill else None)
            live = [r.finish is None for r in rows]
            tokens = self._step(logits, rows, sampling, uniforms)
            if all(r.finish is not None for r in rows):
                return
            fed = [int(x) for x in live]  # a row's next token is real if it was drawn now
            ids = tokens.unsqueeze(-1).to(self.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            pos = pos[:, -1:] + 1

    def _keep_routes(
        self, rows: list[_Row], fed: list[int], width: int, expand: torch.Tensor | None = None
    ) -> None:
        """Append each row's routes of this forward's real tokens (the last ``fed[b]`` of its
        ``width`` positions: prompts are left-padded); ``expand``: the forward's row of each
        sample (a prefill of distinct prompts)."""
        captured, self._captured = self._captured, None
        per_layer = torch.stack(captured).view(len(captured), -1, width, captured[0].shape[-1])
        if expand is not None:
            per_layer = per_layer[:, expand]
        for b, (r, n) in enumerate(zip(rows, fed, strict=True)):
            if n:
                r.routes.append(per_layer[:, b, width - n :])

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long
        )
        return ids.to(self.device), mask.to(self.device)

    def _step(
        self, logits: torch.Tensor, rows: list[_Row], sampling: SamplingParams,
        uniforms: _Uniforms,
    ) -> torch.Tensor:
        """Choose each unfinished row's next token, record it and its logprob; return the tokens."""
        temp = sampling.temperature
        logp = torch.log_softmax(logits / (temp if temp > 0 else 1.0), dim=-1)
        if temp > 0:
            probs = truncate_probs(logp.exp(), sampling.top_k, sampling.top_p)
        live = [b for b, r in enumerate(rows) if r.finish is None]
        tokens = torch.zeros(len(rows), dtype=torch.long)
        if not live:
            return tokens
        if temp == 0:
            chosen = logits.argmax(-1)
        else:  # draw() for every live row at once: its own uniform, the same inverse-CDF lookup
            cdf = probs[live].double().cumsum(-1)
            x = cdf[:, -1:] * uniforms.next(live).unsqueeze(-1)
            chosen = torch.zeros(len(rows), dtype=torch.long)
            chosen[live] = (
                torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
            )
        tokens[live] = chosen[live]
        picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
        for b, tok in zip(live, tokens[live].tolist(), strict=True):
            r = rows[b]
            r.tokens.append(tok)
            r.logprobs.append(picked[b])
            self._check_stop(r, sampling)
        return tokens

    def _check_stop(self, r: _Row, sampling: SamplingParams) -> None:
        tok = r.tokens[-1]
        if tok in self.eos_token_ids or tok in sampling.stop_token_ids:
            r.finish = "stop"
            return
        if sampling.stop:
            text = self._decode(r.tokens)
            hits = [i for i in (text.find(s) for s in sampling.stop if s) if i >= 0]
            if hits:
                r.finish, r.cut = "stop", min(hits)
                return
        if len(r.tokens) >= sampling.max_new_tokens:
            r.finish = "length"

    def _decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _to_sample(self, r: _Row) -> Sample:
        text = self._decode(r.tokens)
        return Sample(
            prompt_ids=r.prompt,
            response_ids=r.tokens,
            text=text if r.cut is None else text[: r.cut],
            logprobs=r.logprobs,
            finish_reason=r.finish or "length",
            weight_version=self._version,
            routes=self._routes_of(r) if self.return_routes else None,
        )

    @staticmethod
    def _routes_of(r: _Row) -> torch.Tensor:
        """[MoE layers, tokens, k]: the prompt and every response token but the last (a row
        that finished before others is fed once more in the batch; that route is dropped)."""
        routes = torch.cat(r.routes, dim=1)
        return routes[:, : len(r.prompt) + len(r.tokens) - 1].contiguous()

    # ---- weights ----------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Copy HF-named tensors into the model, bucket by bucket; FP8 pairs are dequantised.

        Each bucket is checked (names, shapes) before any of it is copied; a failure leaves the
        earlier buckets loaded and the weight version unchanged.
        """
        self._check_alive()
        pending: dict[str, dict[str, torch.Tensor]] = {}  # FP8 name -> {"q": ..., "s": ...}
        for bucket in buckets:
            ready = self._pair_fp8(bucket, pending)
            self._check_shapes(ready)
            for name, tensor in ready:
                self._params[name].copy_(tensor)
        if pending:
            missing = sorted(n + SCALE_SUFFIX if "q" in v else n for n, v in pending.items())
            raise ValueError(
                f"update_weights: FP8 tensors arrived without {', '.join(missing[:8])}"
            )
        self._version = version

    def _pair_fp8(
        self, bucket: NamedTensors, pending: dict[str, dict[str, torch.Tensor]]
    ) -> NamedTensors:
        """Plain tensors as they are; an FP8 weight once its ``_scale_inv`` has also arrived."""
        ready: NamedTensors = []
        for sent, t in bucket:
            if sent.endswith(SCALE_SUFFIX) and sent not in self._params:
                name, part = sent[: -len(SCALE_SUFFIX)], "s"
            elif t.dtype == FP8_DTYPE:
                name, part = sent, "q"
            else:
                ready.append((sent, t))
                continue
            self._param(name, sent)
            slot = pending.setdefault(name, {})
            slot[part] = t
            if len(slot) == 2:
                del pending[name]
                ready.append((name, self._dequantize(name, slot["q"], slot["s"])))
        return ready

    def _dequantize(self, name: str, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        param = self._param(name)
        if q.shape != param.shape:
            raise ValueError(
                f"update_weights: tensor {name!r} has shape {tuple(q.shape)}, the model's is "
                f"{tuple(param.shape)}"
            )
        try:
            return dequantize_blockwise(q, s, self.fp8_block, dtype=param.dtype)
        except ValueError as e:
            raise ValueError(f"update_weights: {name}{SCALE_SUFFIX}: {e}") from e

    def _param(self, name: str, sent: str | None = None) -> torch.nn.Parameter:
        """The parameter ``name``; KeyError naming the tensor as sent when the model lacks it."""
        if name not in self._params:
            arch = type(self.model).__name__
            whose = f" (for tensor {sent!r})" if sent and sent != name else ""
            raise KeyError(f"update_weights: tensor {name!r}{whose} is not a parameter of {arch}")
        return self._params[name]

    def _check_shapes(self, named: NamedTensors) -> None:
        for name, t in named:
            param = self._param(name)
            if t.shape != param.shape:
                raise ValueError(
                    f"update_weights: tensor {name!r} has shape {tuple(t.shape)}, the model's is "
                    f"{tuple(param.shape)}"
                )

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    def health(self) -> bool:
        return self.model is not None

    def shutdown(self) -> None:
        """Drop the model (nothing else to stop: no processes are started)."""
        self.model = None
        self._params = {}

    def _check_alive(self) -> None:
        if self.model is None:
            raise RuntimeError("LocalEngine was shut down")
