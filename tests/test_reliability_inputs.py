"""Hostile or wrong inputs are refused early and never run code: tokenizers (auto_map,
transformers 5's ``TokenizersBackend``, converted checkpoints), config values, rewards that do
not fit in float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from megatron_gvpo.data.tokenizer import hf_dir, load_tokenizer
from megatron_gvpo.demo.task import build_char_tokenizer
from megatron_gvpo.models.tiny import save_tiny_hf_model
from megatron_gvpo.rewards import RewardInput, RewardManager, register_reward
from megatron_gvpo.trainer.config import run_config_from_dict


@pytest.fixture(scope="module")
def qwen2_char_folder(tmp_path_factory) -> Path:
    """A qwen2-typed tiny model whose char tokenizer was saved by transformers 5 itself."""
    d = tmp_path_factory.mktemp("tb") / "m"
    tok = build_char_tokenizer()
    save_tiny_hf_model(d, "qwen2", vocab_size=len(tok))
    tok.save_pretrained(d)
    return d


def _reference_ids(folder: Path, text: str) -> list[int]:
    """The ``tokenizers`` library on the saved tokenizer.json: no transformers class involved."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def test_transformers5_saved_tokenizer_loads_as_saved(qwen2_char_folder):
    cfg = json.loads((qwen2_char_folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "TokenizersBackend"  # what transformers 5 writes
    tok = load_tokenizer(qwen2_char_folder)
    assert tok(" 1 2 ")["input_ids"] == _reference_ids(qwen2_char_folder, " 1 2 ")
    assert tok.decode(tok(" 1 2 ")["input_ids"], skip_special_tokens=True) == " 1 2 "


def test_engine_and_data_share_the_loader(qwen2_char_folder):
    from megatron_gvpo.rollout.local import LocalEngine

    engine = LocalEngine(qwen2_char_folder)
    ids = _reference_ids(qwen2_char_folder, "7 + 8 =")
    assert engine.tokenizer("7 + 8 =")["input_ids"] == ids
    assert engine.tokenizer.decode(ids, skip_special_tokens=True) == "7 + 8 ="


def _converted_layout(src: Path, out: Path) -> Path:
    """The files tools/convert_hf_to_mcore.py puts next to the weights (bridge/checkpoint.py)."""
    import shutil

    (out / "model").mkdir(parents=True)
    shutil.copytree(src, out / "hf", ignore=shutil.ignore_patterns("*.safetensors"))
    meta = {"padded_vocab_size": 128, "precision": "fp32", "source": str(src), "format_version": 1}
    (out / "megatron_gvpo.json").write_text(json.dumps(meta))
    return out


def test_converted_checkpoint_tokenizer_and_engine_use_hf_folder(qwen2_char_folder, tmp_path):
    from megatron_gvpo.rollout.local import LocalEngine
    from megatron_gvpo.trainer.config import DataSection
    from megatron_gvpo.trainer.data import PromptSource

    ckpt = _converted_layout(qwen2_char_folder, tmp_path / "ckpt")
    assert hf_dir(ckpt) == ckpt / "hf"
    text = " 12 + 30 ="
    assert load_tokenizer(ckpt)(text)["input_ids"] == _reference_ids(qwen2_char_folder, text)
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": text, "answer": "42"}) + "\n")
    src = PromptSource(DataSection(path=str(rows)), str(ckpt), tmp_path, 1)
    assert src.next_batch()[0].prompt_ids == _reference_ids(qwen2_char_folder, text)
    engine = LocalEngine(ckpt)  # architecture from hf/config.json; weights come with the sync
    assert engine.vocab_size == json.loads((ckpt / "hf" / "config.json").read_text())["vocab_size"]


_EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast as EvilTokenizer
"""


def _evil_folder(root: Path, tokenizer_class: str) -> tuple[Path, Path]:
    d = root / f"evil_{tokenizer_class}"
    build_char_tokenizer().save_pretrained(d)
    marker = root / f"marker_{tokenizer_class}"
    (d / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(
        tokenizer_class=tokenizer_class, auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}
    )
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d, marker


@pytest.mark.parametrize("tokenizer_class", ["EvilTokenizer", "TokenizersBackend"])
def test_auto_map_never_prompts_or_runs_without_trust(tmp_path, tokenizer_class):
    folder, marker = _evil_folder(tmp_path, tokenizer_class)
    code = (
        "from megatron_gvpo.data.tokenizer import load_tokenizer\n"
        f"try:\n    load_tokenizer({str(folder)!r}, trust_remote_code=False)\n"
        "    print('LOADED')\n"
        "except ValueError as e:\n    print('REFUSED', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,  # a prompt would read EOF here and crash the process
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists(), "the folder's code ran"
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    if tokenizer_class == "TokenizersBackend":  # the saved tokenizer.json is usable as is
        assert "LOADED" in proc.stdout
    else:
        assert "REFUSED" in proc.stdout and "model.trust_remote_code" in proc.stdout


def _raw(**sections) -> dict:
    raw = {"trainer": {"run_dir": "/tmp/unused"}, "data": {"builtin": "toy_addition"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return raw


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"rollout": {"n_samples_per_prompt": 1}}, "rollout.n_samples_per_prompt=1"),
        ({"trainer": {"max_steps": 2.5}}, "trainer.max_steps must be int, got 2.5"),
        ({"trainer": {"clip_grad": -1.0}}, "trainer.clip_grad must be >= 0"),
        ({"trainer": {"seed": "abc"}}, "trainer.seed must be int, got 'abc'"),
        ({"rollout": {"top_p": "abc"}}, "rollout.top_p must be float, got 'abc'"),
        ({"rollout": {"top_p": 1.5}}, "rollout.top_p must be in (0, 1]"),
        ({"rollout": {"top_k": 0}}, "rollout.top_k must be -1 (off) or >= 1"),
        ({"reward": {"on_error": "skip"}}, "reward.on_error='skip'"),
        ({"reward": {"round_timeout_s": 0}}, "reward.round_timeout_s must be a finite number > 0"),
        ({"reward": {"round_timeout_s": float("inf")}}, "reward.round_timeout_s must be a finite"),
        ({"trainer": {"max_consecutive_skips": 0}}, "trainer.max_consecutive_skips"),
        ({"trainer": {"lr": float("inf")}}, "trainer.lr must be a finite number, got inf"),
        ({"trainer": {"clip_grad": float("nan")}}, "trainer.clip_grad must be a finite number"),
        ({"trainer": {"weight_decay": float("nan")}}, "trainer.weight_decay must be a finite"),
        (
            {"trainer": {"max_tokens_per_microbatch": 1}},
            "trainer.max_tokens_per_microbatch=1 cannot hold one sample",
        ),
    ],
)
def test_bad_values_fail_in_config_validation_naming_the_key(sections, message):
    with pytest.raises(ValueError) as e:
        run_config_from_dict(_raw(**sections))
    assert message in str(e.value)


# Each case: a section's own field, refused by the section itself when it is built (no other
# section is read), naming the full key.
_SECTION_CASES = [
    ("trainer", {"max_steps": 0}, "trainer.max_steps must be > 0"),
    ("trainer", {"prompts_per_step": 0}, "trainer.prompts_per_step must be > 0"),
    ("trainer", {"updates_per_round": 0}, "trainer.updates_per_round must be > 0"),
    ("trainer", {"lr": 0.0}, "trainer.lr must be > 0"),
    ("trainer", {"max_tokens_per_microbatch": 0}, "trainer.max_tokens_per_microbatch must be > 0"),
    ("trainer", {"save_interval": 0}, "trainer.save_interval must be > 0"),
    ("trainer", {"keep_last": 0}, "trainer.keep_last must be > 0"),
    ("trainer", {"replay_capacity": 0}, "trainer.replay_capacity must be > 0"),
    ("trainer", {"min_lr": float("nan")}, "trainer.min_lr must be a finite number"),
    ("trainer", {"adam_beta1": float("inf")}, "trainer.adam_beta1 must be a finite number"),
    ("trainer", {"adam_beta2": float("nan")}, "trainer.adam_beta2 must be a finite number"),
    ("trainer", {"replay_ratio": float("inf")}, "trainer.replay_ratio must be a finite number"),
    ("trainer", {"clip_grad": -1.0}, "trainer.clip_grad must be >= 0"),
    ("trainer", {"lr": 1e-4, "min_lr": 1e-3}, "trainer.min_lr=0.001 must lie in [0, trainer.lr"),
    ("trainer", {"min_lr": -1e-5}, "trainer.min_lr=-1e-05 must lie in [0"),
    ("trainer", {"lr_decay_style": "step"}, "trainer.lr_decay_style='step'"),
    ("trainer", {"lr_warmup_steps": -1}, "trainer.lr_warmup_steps must be >= 0"),
    ("trainer", {"replay_ratio": -0.5}, "trainer.replay_ratio must be >= 0"),
    ("trainer", {"max_consecutive_skips": 0}, "trainer.max_consecutive_skips must be >= 1"),
    ("trainer", {"stop_grace_s": -1.0}, "trainer.stop_grace_s must be >= 0"),
    ("trainer", {"eval_interval": -1}, "trainer.eval_interval must be >= 0"),
    ("trainer", {"save_best_mode": "best"}, "trainer.save_best_mode='best'"),
    ("trainer", {"save_best": "loss"}, "trainer.save_best='loss': name an eval metric"),
    ("reward", {"on_error": "skip"}, "reward.on_error='skip'"),
    ("reward", {"round_timeout_s": 0}, "reward.round_timeout_s must be a finite number > 0"),
    ("reward", {"round_timeout_s": float("nan")}, "reward.round_timeout_s must be a finite"),
    ("rollout", {"backend": "vllm"}, "rollout.backend='vllm': local or sglang"),
    ("rollout", {"n_samples_per_prompt": 0}, "rollout.n_samples_per_prompt must be > 0"),
    ("rollout", {"max_new_tokens": 0}, "rollout.max_new_tokens must be > 0"),
    ("rollout", {"bucket_mb": 0}, "rollout.bucket_mb must be > 0"),
    ("rollout", {"temperature": -1.0}, "rollout.temperature must be >= 0"),
    ("rollout", {"top_p": 0.0}, "rollout.top_p must be in (0, 1]"),
    ("rollout", {"top_k": -2}, "rollout.top_k must be -1 (off) or >= 1"),
    ("rollout", {"max_turns": 3}, "rollout.max_turns=3 sets multi-turn rollouts"),
    ("rollout", {"turn_stop": ["</x>"]}, "rollout.turn_stop=['</x>'] sets multi-turn"),
    ("rollout", {"env": "m:E", "max_total_tokens": -1}, "rollout.max_total_tokens must be >= 0"),
    ("rollout", {"backend": "sglang", "local": {"device": "cuda"}}, "rollout.local.* set the"),
    ("rollout", {"local": {"device": "gpu"}}, "rollout.local.device='gpu': cpu, cuda or cuda:N"),
    ("rollout", {"local": {"max_batch_size": 0}}, "rollout.local.max_batch_size must be >= 1"),
    ("model", {"precision": "fp64"}, "model.precision='fp64'"),
    ("model", {"transformer_impl": "apex"}, "model.transformer_impl='apex'"),
    ("model", {"moe": {"token_dispatcher": "x"}}, "model.moe.token_dispatcher='x'"),
    ("model", {"moe": {"routing_replay": "old"}}, "model.moe.routing_replay='old' needs a mixture"),
    ("data", {"sampling": "stratified"}, "data.sampling='stratified' is not one of"),
    ("data", {"sampling": "group"}, "data.sampling=group was renamed data.sampling=proportional"),
    ("data", {"group_key": "g"}, "data.group_key='g' was renamed data.domain_key"),
    ("data", {"builtin": "x"}, "data.builtin='x' is not one of"),
    ("data", {"builtin_eval_size": -1}, "data.builtin_eval_size must be >= 0"),
    ("data", {"seed": -1}, "data.seed must be >= 0"),
    ("data", {"eval_sets": {"a/b": "x.jsonl"}}, "data.eval_sets: 'a/b' is not a valid set name"),
]


@pytest.mark.parametrize(("section", "fields", "message"), _SECTION_CASES)
def test_each_section_refuses_its_own_bad_values_when_built(section, fields, message):
    """The section's own check, not a later pass over the whole config: building the one section
    from its dict raises, naming the key (the same line the CLI prints)."""
    from megatron_gvpo.trainer.config import _SECTION_TYPES, _section

    with pytest.raises(ValueError) as e:
        _section(_SECTION_TYPES[section], fields, section)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as whole:  # and so does the whole config
        run_config_from_dict(_raw(**{section: fields}))
    assert message in str(whole.value)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"algorithm": {"name": "grpo", "kl_beta": 0.0}, "trainer": {"replay_ratio": 0.5}},
            "trainer.replay_ratio=0.5 reuses old groups",
        ),
        (
            {"trainer": {"prompts_per_step": 3, "updates_per_round": 2}},
            "trainer.prompts_per_step=3 must be a multiple of trainer.updates_per_round=2",
        ),
        (
            {"algorithm": {"name": "dpo"}},
            "algorithm.name=dpo trains on preference pairs, not prompts",
        ),
        (
            {"data": {"builtin": "preference_demo"}},
            "data.builtin=preference_demo holds preference pairs: algorithm.name=gvpo needs "
            "prompts (use algorithm=dpo, ipo, gr_dpo or gr_ipo)",
        ),
        (
            {"data": {"chosen_key": "better"}},
            "data.chosen_key and data.rejected_key are preference pairs' keys (data=preference): "
            "algorithm.name=gvpo trains on prompts",
        ),
        (
            {"algorithm": {"name": "gr_gvpo"}, "data": {"domain_key": ""}},
            "algorithm.name=gr_gvpo needs a domain label per prompt",
        ),
        (
            {"rollout": {"backend": "sglang"}, "trainer": {"async_training": {"max_staleness": 1}}},
            "rollout.sglang.weight_sync=tensor is the colocated mode",
        ),
    ],
)
def test_checks_that_span_sections_name_both_sides(sections, message):
    """Each section alone is valid here; only the combination is refused (by ``validate``)."""
    from megatron_gvpo.trainer.config import sections_from_dict, validate

    cfg = sections_from_dict(_raw(**sections))  # every section builds
    with pytest.raises(ValueError) as e:
        validate(cfg, world_size=1)
    assert message in str(e.value)


def test_the_data_schema_follows_the_objective():
    """RL data has no preference pairs' keys; preference objectives get them (defaults)."""
    from megatron_gvpo.trainer.config import sections_from_dict
    from megatron_gvpo.trainer.data import PreferenceDataSection

    rl = sections_from_dict(_raw()).data
    assert not isinstance(rl, PreferenceDataSection) and not hasattr(rl, "chosen_key")
    pairs = sections_from_dict(_raw(algorithm={"name": "dpo"}, data={"builtin": None})).data
    assert isinstance(pairs, PreferenceDataSection)
    assert (pairs.chosen_key, pairs.rejected_key) == ("chosen", "rejected")


def test_gpt2_is_named_unsupported_before_any_model(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: llama, mistral"):
        run_config_from_dict(_raw(model={"path": str(d)}))


@register_reward("test_huge_rewards", override=True)
def _huge(sample: RewardInput) -> float:
    return float(sample.response)


def test_rewards_checked_in_float32_and_marked_failed():
    manager = RewardManager([{"name": "test_huge_rewards"}])
    out = manager([RewardInput("p", r) for r in ("1e39", "1e300", "0.5", "3e38", "nan")])
    assert out.failed == [True, True, False, False, True]
    assert out.scores == [0.0, 0.0, 0.5, 3e38, 0.0]
    assert out.stats["test_huge_rewards"].errors == 3
    # each fits in float32, their weighted sum (6e38) does not: the sample fails too
    twice = RewardManager(
        [{"name": "test_huge_rewards"}, {"name": "test_huge_rewards", "tag": "b"}]
    )
    assert twice([RewardInput("p", "3e38")]).failed == [True]


def test_run_dir_lock_is_per_rank_and_excludes_the_same_rank_of_another_process(tmp_path):
    from megatron_gvpo.trainer.runlock import hold_run_dir

    held = hold_run_dir(tmp_path, rank=1)  # this process is rank 1 of a running job
    assert held == tmp_path / ".lock.rank1"
    assert f"pid {os.getpid()} rank 1" in held.read_text()
    code = (
        "import fcntl, os, sys\n"
        "for name in sys.argv[2:]:\n"
        "    fd = os.open(os.path.join(sys.argv[1], name), os.O_RDWR | os.O_CREAT)\n"
        "    try:\n        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print(name, 'free')\n"
        "    except BlockingIOError:\n        print(name, 'held')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), ".lock.rank1", ".lock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.split() == [".lock.rank1", "held", ".lock", "free"], proc.stderr


def test_rounds_without_a_trainable_group_are_counted_then_stop_naming_the_key():
    from megatron_gvpo.trainer.groups import PromptGroup, reward_metrics
    from megatron_gvpo.trainer.guards import NoTrainableRoundsError, StepGuard

    # two domains, one of which lost every response: its means are left out, nothing divides by 0
    groups = [PromptGroup([1], [[2], [3]], [1.0, 0.0], "a"), PromptGroup([1], [], [], "b")]
    assert reward_metrics(groups)["reward/mean/a"] == 0.5
    assert "reward/mean/b" not in reward_metrics(groups)
    guard = StepGuard(max_consecutive_skips=2)
    assert guard.round_trainable(False, "16 failed rewards") is False
    assert guard.round_trainable(True, "") is True  # a trained round resets the count
    assert guard.round_trainable(False, "16 failed rewards") is False
    with pytest.raises(NoTrainableRoundsError, match=r"2 rounds in a row .*16 failed rewards"):
        guard.round_trainable(False, "16 failed rewards")
    with pytest.raises(NoTrainableRoundsError, match=r"trainer\.max_consecutive_skips=2"):
        guard.round_trainable(False, "")


def test_max_new_tokens_past_the_models_context_is_refused_before_any_model(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": 16})
    )
    raw = _raw(model={"path": str(d)}, rollout={"max_new_tokens": 16})
    with pytest.raises(ValueError, match=r"rollout\.max_new_tokens=16 leaves no room .*=16"):
        run_config_from_dict(raw)
    run_config_from_dict(_raw(model={"path": str(d)}, rollout={"max_new_tokens": 15}))


def test_prompts_that_leave_no_room_for_a_response_are_dropped_and_counted(tmp_path, caplog):
    from megatron_gvpo.data.prompts import DataConfig, load_prompts
    from megatron_gvpo.trainer.data import prompt_room

    tok = build_char_tokenizer()
    texts = ["1 + 2 =", "11 + 22 =", "111 + 222 =", "1"]
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": t, "answer": "0"}) + "\n" for t in texts))
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 14}))
    room = prompt_room(tmp_path, max_new_tokens=4, max_tokens_per_microbatch=4096)
    assert room[0] == 10 and "max_position_embeddings=14" in room[1]
    assert prompt_room(tmp_path, 4, 12)[0] == 8  # the micro-batch budget binds first
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    with caplog.at_level("WARNING"):
        data = load_prompts(DataConfig(path=str(rows)), tok, room=room)
    assert [p.text for p in data] == [t for t, n in zip(texts, lengths, strict=True) if n + 4 <= 14]
    assert data.stats.no_room == sum(n + 4 > 14 for n in lengths) > 0
    assert f"dropped {data.stats.no_room} prompt(s) longer than 10 tokens" in caplog.text


def test_pairs_whose_chosen_equals_rejected_are_named_in_a_warning(tmp_path, caplog):
    from megatron_gvpo.data.preference import PreferenceDataConfig, load_pairs

    rows = tmp_path / "pairs.jsonl"
    pairs = [("1 + 1 =", " 2", " 3"), ("2 + 2 =", " 4", " 4"), ("3 + 3 =", " 6", " 6")]
    rows.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs)
    )
    with caplog.at_level("WARNING"):
        data = load_pairs(PreferenceDataConfig(path=str(rows)), build_char_tokenizer())
    assert len(data) == 3  # kept: a warning, not an error
    assert "2 pair(s) whose 'chosen' and 'rejected' are the same tokens" in caplog.text
    assert f"{rows}:2" in caplog.text


def test_invalid_utf8_in_jsonl_names_the_line_and_can_be_skipped(tmp_path):
    from megatron_gvpo.data.prompts import DataConfig, DataError, load_prompts

    rows = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "1 + 1 =", "answer": "2"}).encode() + b"\n"
    rows.write_bytes(good + b'{"prompt": "caf\xe9 =", "answer": "1"}\n' + good)
    with pytest.raises(DataError, match=rf"{rows}:2: invalid UTF-8 .*data\.skip_bad_rows"):
        load_prompts(DataConfig(path=str(rows)), build_char_tokenizer())
    data = load_prompts(DataConfig(path=str(rows), skip_bad_rows=True), build_char_tokenizer())
    assert len(data) == 2 and data.stats.bad == 1


def test_a_model_path_symlink_loop_and_an_unwritable_run_dir_are_named(tmp_path):
    from megatron_gvpo.trainer.runlock import RunDirError, hold_run_dir

    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(FileNotFoundError, match=rf"model\.path={a}: a symlink loop"):
        run_config_from_dict(_raw(model={"path": str(a)}))
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match=r"trainer\.run_dir=.*/file/run cannot be written"):
        hold_run_dir(tmp_path / "file" / "run")


def test_resuming_with_another_reward_is_refused_and_redacted_secrets_are_not_a_change(tmp_path):
    from megatron_gvpo.trainer.guards import check_resume_config
    from megatron_gvpo.trainer.secrets import redact

    def config(name: str, key: str) -> dict:
        return {"reward": {"rewards": [{"name": name, "kwargs": {"api_key": key}}]}}

    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"step": 1, "config": redact(config("math", "sk-1"))})
    )
    assert "sk-1" not in (tmp_path / "trainer_state.json").read_text()
    check_resume_config(tmp_path, config("math", "sk-1"), allow=False)  # the same reward
    with pytest.raises(ValueError, match=r"reward\.rewards: .*'math'.* -> .*'format'"):
        check_resume_config(tmp_path, config("format", "sk-1"), allow=False)


def test_a_short_write_on_a_full_filesystem_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from megatron_gvpo.trainer import checkpoint

    usage = namedtuple("usage", "total used free")
    # what torch's zip writer raises when the disk fills mid-write (no errno)
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 4096))
    assert checkpoint._disk_full(err, tmp_path / "step_000002.tmp")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 40))
    assert not checkpoint._disk_full(err, tmp_path / "step_000002.tmp")  # some other failure


def test_started_servers_keep_off_the_trainers_gpus_outside_the_colocated_mode(monkeypatch):
    from megatron_gvpo.rollout.sglang.client import Endpoint
    from megatron_gvpo.rollout.sglang.config import SGLangConfig
    from megatron_gvpo.rollout.sglang.server import launch_command

    def first_gpus(cfg: SGLangConfig) -> list[str]:
        cmds = [launch_command(cfg, "m", Endpoint(k, "http://x", port=1)) for k in range(2)]
        return [c[c.index("--base-gpu-id") + 1] for c in cmds]

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the trainer holds GPUs 0 and 1 of this node
    sglang = {"model_path": "m", "weight_sync": "distributed", "base_gpu_id": 0}
    with pytest.raises(ValueError, match=r"rollout\.sglang: sglang\.base_gpu_id=0: .*GPUs 0-1"):
        run_config_from_dict(_raw(rollout={"backend": "sglang", "sglang": sglang}))
    for mode in ("distributed", "disk"):
        cfg = SGLangConfig(
            model_path="m", weight_sync=mode, sync_dir="/s", tp_size=2, num_servers=2
        )
        assert first_gpus(cfg) == ["2", "4"]  # GPUs 2-3 and 4-5
    assert first_gpus(SGLangConfig(model_path="m", weight_sync="tensor")) == ["0", "1"]
    assert first_gpus(
        SGLangConfig(model_path="m", weight_sync="disk", sync_dir="/s", base_gpu_id=3)
    ) == ["3", "4"]


def test_redaction_patterns_by_key_name_and_url_part():
    """What counts as a credential (and what must not: data.answer_key, max_new_tokens)."""
    from megatron_gvpo.trainer.secrets import REDACTED, redact, redact_text

    got = redact({
        "access_key": "a", "auth": "b", "openai_key": "c", "x-auth": "d", "private_key": "e",
        "answer_key": "answer", "prompt_key": "prompt", "max_new_tokens": 5, "author": "me",
        "url": "https://user:pw@host.example:8/p?token=t1&v=2&api_key=k2#frag",
    })  # fmt: skip
    assert [got[k] for k in ("access_key", "auth", "openai_key", "x-auth", "private_key")] == [
        REDACTED
    ] * 5
    assert got["answer_key"] == "answer" and got["prompt_key"] == "prompt"
    assert got["max_new_tokens"] == 5 and got["author"] == "me"
    assert got["url"] == f"https://{REDACTED}@host.example:8/p?token={REDACTED}&v=2&api_key={REDACTED}#frag"
    assert redact_text("see http://h/x?sig=abc and ssh://git@github.com/r") == (
        f"see http://h/x?sig={REDACTED} and ssh://{REDACTED}@github.com/r"
    )
