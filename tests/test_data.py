"""Prompt datasets, the resumable sampler, the toy task and the warm-start tool."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import last_json, run_tool

from megatron_gvpo.data.prompts import DataConfig, DataError, load_prompts, read_rows
from megatron_gvpo.data.sampler import PromptSampler
from megatron_gvpo.data.tokenizer import load_tokenizer
from megatron_gvpo.demo.task import (
    build_char_tokenizer,
    generate_toy_dataset,
    is_heldout,
    save_char_tokenizer,
    toy_reward,
    worked_answer,
    write_jsonl,
)

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    t = build_char_tokenizer()
    t.chat_template = TEMPLATE
    return t


def _jsonl(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    return path


def _lines(*rows):
    return [(r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows]


# ---------------------------------------------------------------- loading


def test_jsonl_rows_fields_and_metadata(tmp_path, tok):
    f = _jsonl(
        tmp_path / "d.jsonl",
        _lines(
            {"prompt": "1+2=", "answer": "3", "domain": "add", "id": 7},
            "",  # blank lines are not rows, and do not shift line numbers
            {"prompt": "2+2=", "label": 4},
            {"prompt": "5+5=", "answer": 10, "domain": 2},
        ),
    )
    ds = load_prompts(DataConfig(path=str(f)), tok)
    assert len(ds) == 3 and ds.stats.rows == 3 and ds.stats.kept == 3
    a, b, c = ds
    assert a.prompt_ids == tok("1+2=")["input_ids"] == [tok.bos_token_id, *tok.encode("1+2=")[1:]]
    assert (a.text, a.answer, a.domain, a.metadata) == ("1+2=", "3", "add", {"id": 7})
    assert (b.answer, b.domain, b.source) == ("4", None, f"{f}:3")
    assert (c.answer, c.domain) == ("10", "2")
    assert ds.domains() == ["2", "add"]


def test_parquet_messages_verl_style_and_nested_answer(tmp_path, tok):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
            "reward_model": {"ground_truth": "42", "style": "rule"},
            "data_source": "x",
        },
        {
            "prompt": [{"role": "user", "content": "yo"}],
            "reward_model": {"ground_truth": "7", "style": "rule"},
            "data_source": "y",
        },
    ]
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    ds = load_prompts(DataConfig(path=str(f), answer_key="reward_model.ground_truth"), tok)
    text = "[system]be brief\n[user]hi\n[assistant]"
    assert ds[0].text == text
    assert ds[0].prompt_ids == tok(text, add_special_tokens=False)["input_ids"]  # no extra BOS
    assert (ds[0].answer, ds[1].answer) == ("42", "7")
    assert ds[0].metadata["data_source"] == "x" and ds[1].source == f"{f} row 1"


def test_chat_template_for_messages_and_optionally_for_plain_prompts(tmp_path, tok):
    f = _jsonl(
        tmp_path / "d.jsonl",
        _lines({"messages": [{"role": "user", "content": "a b"}]}, {"prompt": "c d"}),
    )
    plain = load_prompts(DataConfig(path=str(f)), tok)
    assert [p.text for p in plain] == ["[user]a b\n[assistant]", "c d"]
    templated = load_prompts(DataConfig(path=str(f), apply_chat_template=True), tok)
    assert templated[1].text == "[user]c d\n[assistant]"
    no_template = build_char_tokenizer()
    with pytest.raises(DataError, match="no chat template"):
        load_prompts(DataConfig(path=str(f)), no_template)


def test_chat_template_error_is_a_row_error(tmp_path):
    t = build_char_tokenizer()
    t.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        + TEMPLATE
    )
    bad = {"messages": [{"role": "assistant", "content": "x"}]}
    f = _jsonl(tmp_path / "d.jsonl", _lines({"prompt": "a"}, bad))
    with pytest.raises(DataError, match=rf"{f}:2: chat template failed: .*user first"):
        load_prompts(DataConfig(path=str(f)), t)
    ds = load_prompts(DataConfig(path=str(f), skip_bad_rows=True), t)
    assert len(ds) == 1 and ds.stats.bad == 1


def test_overlong_prompts_dropped_and_counted(tmp_path, tok, caplog):
    # With BOS, a prompt of n characters is n + 1 tokens.
    f = _jsonl(tmp_path / "d.jsonl", _lines(*({"prompt": "x" * n} for n in (3, 4, 5, 9))))
    with caplog.at_level(logging.WARNING):
        ds = load_prompts(DataConfig(path=str(f), max_prompt_length=5), tok)
    assert [len(p.prompt_ids) for p in ds] == [4, 5]
    assert (ds.stats.rows, ds.stats.too_long, ds.stats.kept) == (4, 2, 2)
    assert "dropped 2 prompt(s)" in caplog.text
    with pytest.raises(DataError, match="no prompts left"):
        load_prompts(DataConfig(path=str(f), max_prompt_length=2), tok)


BAD_ROWS = [
    ('{"prompt": "1+1=", ', "invalid JSON"),
    ('["not", "an", "object"]', "must be a JSON object"),
    ('{"answer": "2"}', "neither 'prompt' nor 'messages'"),
    ('{"prompt": 12}', "'prompt' must be a string or a list of messages"),
    ('{"prompt": ""}', "'prompt' is empty"),
    ('{"messages": [{"role": "user"}]}', r"'messages'\[0\].content must be a string"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"prompt": "1+1=", "answer": {"a": 1}}', "'answer' must be a string or a number"),
    ('{"prompt": "1+1=", "domain": [1]}', "'domain' must be a string or a number"),
]


@pytest.mark.parametrize("line,why", BAD_ROWS)
def test_malformed_row_names_file_and_line(tmp_path, tok, line, why):
    f = _jsonl(tmp_path / "d.jsonl", [*_lines({"prompt": "ok"}), "\n", line + "\n"])
    with pytest.raises(DataError, match=why) as e:
        read_rows(DataConfig(path=str(f)))  # no tokenizer needed: fails before any model exists
    assert f"{f}:3:" in str(e.value) and "skip_bad_rows" in str(e.value)


def test_malformed_parquet_row_names_row_index(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}, {"prompt": "c"}]), f)
    with pytest.raises(DataError, match=rf"{f} row 1: has neither"):
        read_rows(DataConfig(path=str(f)))


def test_skip_bad_rows_counts(tmp_path, tok):
    lines = _lines({"prompt": "a"}, *(line for line, _ in BAD_ROWS), {"prompt": "b"})
    f = _jsonl(tmp_path / "d.jsonl", lines)
    ds = load_prompts(DataConfig(path=str(f), skip_bad_rows=True), tok)
    assert [p.text for p in ds] == ["a", "b"]
    assert (ds.stats.rows, ds.stats.bad, ds.stats.kept) == (len(BAD_ROWS) + 2, len(BAD_ROWS), 2)
    assert ds.stats.bad_examples[0].startswith(f"{f}:2: invalid JSON")


def test_missing_or_unsupported_paths(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"data.path: no such file or folder: '{missing}'"):
        load_prompts(DataConfig(path=str(missing)), tok)
    with pytest.raises(DataError, match="data.path is not set"):
        load_prompts(DataConfig(), tok)
    (tmp_path / "d.csv").write_text("prompt\n")
    with pytest.raises(DataError, match="neither .jsonl nor .parquet"):
        load_prompts(DataConfig(path=str(tmp_path / "d.csv")), tok)


def test_folder_and_list_of_files(tmp_path, tok):
    _jsonl(tmp_path / "b.jsonl", _lines({"prompt": "b"}))
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}]), tmp_path / "a.parquet")
    assert [p.text for p in load_prompts(DataConfig(path=str(tmp_path)), tok)] == ["a", "b"]
    paths = [str(tmp_path / "b.jsonl"), str(tmp_path / "a.parquet")]
    assert [p.text for p in load_prompts(DataConfig(path=paths), tok)] == ["b", "a"]


# ---------------------------------------------------------------- sampler


def _take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_deterministic_per_seed():
    assert _take(PromptSampler(10, 4, seed=3), 6) == _take(PromptSampler(10, 4, seed=3), 6)
    assert _take(PromptSampler(10, 4, seed=3), 6) != _take(PromptSampler(10, 4, seed=4), 6)
    assert _take(PromptSampler(5, 5, shuffle=False), 2) == [[0, 1, 2, 3, 4]] * 2


def test_sampler_epoch_rollover():
    s = PromptSampler(10, 4, seed=1)
    flat = [i for b in _take(s, 10) for i in b]  # 40 indices: epochs 0..3
    for e in range(4):
        assert flat[10 * e : 10 * (e + 1)] == s.epoch_order(e).tolist()
        assert sorted(flat[10 * e : 10 * (e + 1)]) == list(range(10))
    assert s.epoch_order(0).tolist() != s.epoch_order(1).tolist()
    assert (s.epoch, s.position) == (4, 0)
    big = PromptSampler(3, 7, seed=0).next_batch()  # a batch larger than the dataset
    assert sorted(big[:3]) == sorted(big[3:6]) == [0, 1, 2]


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10, 25])
@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_sampler_exact_resume(batch_size, k):
    straight = PromptSampler(10, batch_size, seed=5)
    expected = _take(straight, k + 6)[k:]
    first = PromptSampler(10, batch_size, seed=5)
    _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(10, batch_size, seed=5)
    resumed.load_state_dict(state)
    assert _take(resumed, 6) == expected


def test_sampler_refuses_a_different_order():
    state = PromptSampler(10, 2, seed=5).state_dict()
    for other in (PromptSampler(11, 2, seed=5), PromptSampler(10, 2, seed=6)):
        with pytest.raises(ValueError, match="would not continue"):
            other.load_state_dict(state)


# ---------------------------------------------------------------- toy task


@pytest.mark.parametrize("s", ["37+45=82", "  a  b ", "Hello, world!\n(x) = {y};", "~`|\\"])
def test_char_tokenizer_round_trip(tmp_path, s):
    t = build_char_tokenizer()
    ids = t(s)["input_ids"]
    assert ids[0] == t.bos_token_id and len(ids) == len(s) + 1  # one token per character
    assert t.decode(ids, skip_special_tokens=True) == s
    save_char_tokenizer(tmp_path)
    for loaded in (load_tokenizer(tmp_path), type(t).from_pretrained(str(tmp_path))):
        assert loaded(s)["input_ids"] == ids
        assert loaded.decode(ids, skip_special_tokens=True) == s


@pytest.mark.parametrize(
    "response,answer,reward",
    [
        ("82", "82", 1.0),
        (" 82\n", 82, 1.0),
        ("83", "82", 0.0),
        ("28", 82, 0.0),
        ("", "82", 0.0),
        ("820", "82", 0.0),
        ("[2+0=2,8+0+0=8]82", 82, 1.0),  # work shown, then the answer
        ("82, no: 83", "82", 0.0),  # the last integer counts
        ("the sum is 100.", "100", 1.0),
        ("-7", "-7", 1.0),
        ("7", "seven", 0.0),  # an answer that is not an integer scores nothing
    ],
)
def test_toy_reward_table(response, answer, reward):
    assert toy_reward(response, answer) == reward


def test_toy_dataset_splits_and_loading(tmp_path):
    rows = generate_toy_dataset(200, seed=0)
    assert rows == generate_toy_dataset(200, seed=0)
    for r in rows:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert len(r["prompt"]) == 6 and r["answer"] == a + b
        assert r["domain"] == ("carry" if a % 10 + b % 10 >= 10 else "nocarry")
    train = {r["prompt"] for r in generate_toy_dataset(300, seed=1, split="train")}
    held = {r["prompt"] for r in generate_toy_dataset(100, seed=1, split="heldout")}
    assert train and held and not train & held
    # One pair in five is held out, spread over every ones digit of both operands.
    pairs = [(a, b) for a in range(100) for b in range(100) if is_heldout(a, b)]
    assert 1800 < len(pairs) < 2200
    assert {b % 10 for _, b in pairs} == set(range(10)) == {a % 10 for a, _ in pairs}
    f = write_jsonl(rows, tmp_path / "toy.jsonl")
    ds = load_prompts(DataConfig(path=str(f), max_prompt_length=7), build_char_tokenizer())
    assert len(ds) == 200 and ds.domains() == ["carry", "nocarry"]
    assert all(p.answer == str(r["answer"]) for p, r in zip(ds, rows, strict=True))


def test_worked_answers_are_right_column_by_column():
    """Each column's sum is right, the carry is the ones column's tens digit, and the demo
    reward reads the final sum."""
    for a in range(100):
        for b in range(100):
            w = worked_answer(a, b)
            ones, tens = w[1 : w.index("]")].split(",")
            terms, total = ones.split("=")
            assert [int(t) for t in terms.split("+")] == [a % 10, b % 10]
            assert int(total) == a % 10 + b % 10
            terms, tens_total = tens.split("=")
            assert [int(t) for t in terms.split("+")] == [a // 10, b // 10, int(total) // 10]
            assert int(tens_total) == a // 10 + b // 10 + int(total) // 10
            assert w.endswith(f"]{a + b}") and toy_reward(w, a + b) == 1.0


# ---------------------------------------------------------------- warm-start tool


def test_make_demo_model_writes_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = tmp_path / "hf"
    args = ("--steps", "4", "--eval-prompts", "8", "--eval-samples", "1")
    _, stdout, _ = run_tool("make_demo_model.py", "--out-dir", str(out), *args, timeout=120)
    result = last_json(stdout)
    assert result["steps"] == 4 and 0 <= result["sampled_reward"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # staging folder renamed away
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    cfg = model.config
    assert cfg.vocab_size == len(tok) and cfg.num_hidden_layers % 2 == 0
    assert cfg.num_attention_heads % 2 == 0 and cfg.num_key_value_heads % 2 == 0
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    assert model(ids).logits.shape == (1, 7, len(tok))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_make_demo_model_builds_the_moe_families(tmp_path, family):
    from megatron_gvpo.models.hf_config import read_hf_config

    out = tmp_path / "hf"
    args = ("--steps", "2", "--eval-prompts", "4", "--eval-samples", "1", "--family", family)
    _, stdout, _ = run_tool("make_demo_model.py", "--out-dir", str(out), *args, timeout=120)
    assert last_json(stdout)["steps"] == 2
    arch = read_hf_config(out)
    assert arch.model_type == family and arch.num_experts == 4 and arch.moe_router_topk == 2
    assert arch.shared_expert_ffn_hidden_size == (128 if family == "qwen2_moe" else 0)


def test_make_demo_model_is_deterministic():
    from megatron_gvpo.demo.model import WarmStartConfig, train

    cfg = WarmStartConfig(seed=3, steps=3, batch_size=8)
    a = train(cfg, build_char_tokenizer()).state_dict()
    b = train(cfg, build_char_tokenizer()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_jobs_starting_together_build_the_demo_model_once(tmp_path):
    """Jobs sharing a cache: the second waits on the first's build instead of racing it (a
    shared ``.tmp`` folder once made one of them fail)."""
    import subprocess
    import sys

    script = (
        "import sys, time, pathlib\n"
        "import megatron_gvpo.demo.model as m\n"
        "def build(out, seed=0):\n"
        "    with open(sys.argv[2], 'a') as f: f.write('built\\n')\n"
        "    time.sleep(1.0)\n"
        "    out = pathlib.Path(out); out.mkdir(parents=True)\n"
        "    (out / 'config.json').write_text('{}')\n"
        "m.build_demo_model = build\n"
        "print(m.demo_model_path(sys.argv[1]))\n"
    )
    log = tmp_path / "builds.log"
    env = {"RANK": "0", "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache"), str(log)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert log.read_text().splitlines() == ["built"]
    assert all(o.strip().endswith("toy_addition_v2") for o, _ in outs)
