"""SGLang rollout backend: server processes, a concurrent HTTP client, and weight sync.

Everything goes through SGLang's HTTP API (``/generate``, ``/update_weights_from_*``, ...), so
nothing from ``sglang`` is imported except, lazily, its tensor serializer for the colocated path.
The tests run this client against a protocol fake (``tests/sglang_fake_server.py``), not SGLang.

Sampling: each response is its own ``/generate`` request (``n = 1``) carrying
``sampling_seed = response_seed(seed, j)``; with SGLang's ``n > 1`` the responses of a group would
share one request and the server would pick their seeds. Bit-identical reruns additionally need
SGLang's deterministic mode (``--enable-deterministic-inference`` in ``extra_args``).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import requests
import torch
import torch.distributed as dist

from megatron_gvpo.bridge.hf_io import (
    copy_side_files,
    publish_dir,
    staging_dir,
    write_bucket_shards,
)
from megatron_gvpo.parallel.store import listening_store
from megatron_gvpo.rollout.base import (
    GenerateRequest,
    NamedTensors,
    RolloutEngine,
    Sample,
    SamplingParams,
    response_seed,
)

log = logging.getLogger(__name__)

WeightSync = Literal["tensor", "distributed", "disk"]
FINISH_TYPES = ("stop", "length", "abort")


class SGLangError(RuntimeError):
    """A server could not be reached, answered against the protocol, or kept failing."""


class _Transient(Exception):
    """A failure worth retrying: connection error, time-out or 5xx."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class SGLangConfig:
    """Where the SGLang servers are and how to use them.

    Three ways in: ``urls`` (attach to running servers), ``router_url`` (generate through an
    sglang-router; ``urls`` then lists the workers behind it, which receive weight updates), or
    neither (start ``num_servers`` servers from ``model_path``, a local HF folder).
    """

    model_path: str | None = None
    num_servers: int = 1
    tp_size: int = 1
    host: str = "127.0.0.1"  # servers we start listen only here
    base_port: int = 0  # 0: free ports; else server k listens on base_port + k
    base_gpu_id: int = 0  # server k uses GPUs base_gpu_id + k * tp_size ...
    mem_fraction_static: float = 0.8
    quantization: str | None = None  # e.g. "fp8"
    extra_args: list[str] = field(default_factory=list)
    launch_command: list[str] = field(
        default_factory=lambda: [sys.executable, "-m", "sglang.launch_server"]
    )
    log_dir: str | None = None
    urls: list[str] = field(default_factory=list)
    router_url: str | None = None
    # weight sync: "tensor" (colocated, CUDA IPC), "distributed" (process group), "disk"
    weight_sync: WeightSync = "tensor"
    sync_dir: str | None = None  # disk mode: a folder every server can read
    dist_master_address: str = "127.0.0.1"  # this host, as the servers reach it
    dist_master_port: int = 0  # 0: any free port
    dist_backend: str | None = None  # None: nccl with CUDA, gloo without
    group_name: str = "megatron_gvpo_weights"
    no_stop_trim: bool = True  # text keeps the stop string, like response_ids
    skip_special_tokens: bool = True
    startup_timeout_s: float = 900.0
    health_timeout_s: float = 30.0  # one /health_generate probe (SGLang's takes >= 1 s)
    health_poll_s: float = 2.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 1800.0  # one /generate
    control_timeout_s: float = 120.0  # pause, flush, version, memory, server info
    sync_timeout_s: float = 1800.0
    max_retries: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_restarts: int = 3  # per started server
    max_concurrency: int = 256
    shutdown_grace_s: float = 15.0

    def __post_init__(self) -> None:
        if self.weight_sync not in ("tensor", "distributed", "disk"):
            raise ValueError(
                f"sglang.weight_sync must be tensor|distributed|disk, got {self.weight_sync!r}"
            )
        if self.weight_sync == "disk" and not self.sync_dir:
            raise ValueError("sglang.weight_sync='disk' needs sync_dir (readable by every server)")
        if self.router_url and not self.urls:
            raise ValueError("sglang.router_url needs urls: the workers that get weight updates")
        if not self.urls and not self.model_path:
            raise ValueError("sglang: give model_path (start servers), urls (attach) or router_url")
        if self.num_servers < 1 or self.tp_size < 1:
            raise ValueError(
                f"sglang: num_servers and tp_size must be >= 1, got {self.num_servers}, "
                f"{self.tp_size}"
            )
        if self.max_retries < 0 or self.max_concurrency < 1:
            raise ValueError("sglang: max_retries must be >= 0 and max_concurrency >= 1")

    @property
    def launches(self) -> bool:
        """True when this engine starts (and owns) its servers."""
        return not self.urls


# ---------------------------------------------------------------------------------------------
# Flattened buckets (colocated sync)


@dataclass(frozen=True)
class FlatTensorMeta:
    """Where one tensor lives in a flat bucket: ``flat[start:end].view(shape)``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


def flatten_bucket(tensors: NamedTensors) -> list[tuple[torch.Tensor, list[FlatTensorMeta]]]:
    """One flat 1-D tensor per dtype (in first-seen order) plus each tensor's slice of it."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors:
        groups.setdefault(t.dtype, []).append((name, t))
    out = []
    for dtype, items in groups.items():
        metas, offset = [], 0
        for name, t in items:
            metas.append(FlatTensorMeta(name, tuple(t.shape), dtype, offset, offset + t.numel()))
            offset += t.numel()
        flat = torch.cat([t.detach().reshape(-1) for _, t in items])
        out.append((flat, metas))
    return out


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[FlatTensorMeta]) -> NamedTensors:
    """Inverse of :func:`flatten_bucket` for one dtype group (views into ``flat``)."""
    return [(m.name, flat[m.start : m.end].view(m.shape)) for m in metas]


Serializer = Callable[[torch.Tensor, list[FlatTensorMeta], int], list[str]]


def sglang_flattened_bucket_serializer(
    flat: torch.Tensor, metas: list[FlatTensorMeta], tp_size: int
) -> list[str]:
    """``serialized_named_tensors`` for ``load_format="flattened_bucket"``: one CUDA-IPC payload
    per engine TP rank, built with SGLang's own classes (each rank loads full tensors and shards
    them itself, so every rank gets the same payload)."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except Exception as e:  # not installed, or no sgl_kernel / CUDA
        raise RuntimeError(
            "weight_sync='tensor' needs SGLang's serializer (the 'gpu' extra, on a CUDA machine): "
            f"importing sglang failed: {e!r}. Use weight_sync='distributed' or 'disk' without it."
        ) from e
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError:  # older SGLang kept it beside the model runner
        from sglang.srt.model_executor.model_runner import FlattenedTensorMetadata
    try:  # makes CUDA IPC handles name devices by UUID, as SGLang's own senders do
        from sglang.srt.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
    except ImportError:
        pass
    meta = [
        FlattenedTensorMetadata(
            name=m.name, shape=torch.Size(m.shape), dtype=m.dtype,
            start_idx=m.start, end_idx=m.end, numel=m.end - m.start,
        )
        for m in metas
    ]
    payload = MultiprocessingSerializer.serialize(
        {"flattened_tensor": flat, "metadata": meta}, output_str=True
    )
    return [payload] * tp_size


# ---------------------------------------------------------------------------------------------
# Trainer side of the distributed-sync process group


class _UpdateGroup:
    """Rank 0 of the group the servers join on ``/init_weights_update_group``.

    Built from a TCPStore and one backend object (not the default group), with the store prefixes
    torch's group helper uses on SGLang's side: ``<name>`` then ``<name>/`` then ``cpu/`` (gloo,
    one backend for all devices) or ``cuda/`` (nccl).
    """

    def __init__(self, address: str, port: int, world_size: int, name: str, backend: str,
                 timeout: timedelta):
        self.name, self.backend, self.world_size = name, backend, world_size
        self._timeout = timeout
        self.store = listening_store(address, port, world_size, timeout)  # on `address` only
        self.port = self.store.port
        self.pg: Any = None
        self.device = torch.device("cpu")

    def join(self) -> None:
        """Create the backend; for gloo this blocks until every server rank has joined."""
        prefix = dist.PrefixStore(f"{self.name}/", dist.PrefixStore(self.name, self.store))
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(
                dist.PrefixStore("cpu/", prefix), 0, self.world_size, self._timeout
            )
        elif self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timeout
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(
                dist.PrefixStore("cuda/", prefix), 0, self.world_size, opts
            )
        else:
            raise ValueError(f"sglang.dist_backend must be gloo or nccl, got {self.backend!r}")
        self.pg._set_sequence_number_for_group()  # as torch's helper does; no peer traffic

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send one tensor from rank 0 to every server rank."""
        t = tensor.detach().to(self.device).contiguous()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()


def _distributed_payload(bucket: NamedTensors, group_name: str, version: int) -> dict:
    """The ``/update_weights_from_distributed`` body for one bucket."""
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group_name,
        "flush_cache": False,
        "weight_version": str(version),
    }


def _broadcast_buckets(group, buckets: Iterable[NamedTensors], version: int,
                       submit: Callable[[dict], list[Future]]) -> int:
    """Per non-empty bucket: ``submit`` the update POSTs, broadcast its tensors; returns the
    tensor count. The same for rank 0's engine and every stage's sender."""
    count = 0
    for bucket in buckets:
        if not bucket:
            continue
        count += len(bucket)
        _broadcast_bucket(group, bucket, submit(_distributed_payload(bucket, group.name, version)))
    return count


def _broadcast_bucket(group: _UpdateGroup, bucket: NamedTensors, futures: list[Future]) -> None:
    """Broadcast a bucket's tensors while the servers' POSTs (``futures``) receive them."""
    try:
        for _, t in bucket:
            group.broadcast(t)
    except Exception as e:
        for f in futures:  # a server that refused the request explains the hang best
            if f.done() and f.exception() is not None:
                raise f.exception() from e
        raise
    for f in futures:
        f.result()


@dataclass(frozen=True)
class StageSyncSpec:
    """What a pipeline stage's source rank needs to feed the servers itself (picklable).

    Built by :meth:`SGLangEngine.stage_sync_spec` on rank 0 and broadcast to the other ranks.
    ``group_name`` changes when a server was restarted, so stage groups are then rebuilt.
    """

    urls: tuple[str, ...]
    tp_sizes: tuple[int, ...]
    master_address: str
    master_port: int  # 0: a free port per stage; else stage k uses master_port + 1 + k
    backend: str
    group_name: str
    connect_timeout_s: float
    sync_timeout_s: float

    @property
    def world_size(self) -> int:
        return 1 + sum(self.tp_sizes)


class StageWeightSender:
    """Feeds one PP stage's buckets to every server over the stage's own update group.

    Usable on any trainer rank (no engine needed): the group is ``<group_name>_pp<stage>``, with
    this rank as its rank 0 and the servers' ranks after it, built on the first :meth:`send`.
    The engine on rank 0 pauses generation before and flushes, checks and continues after.
    """

    def __init__(self, spec: StageSyncSpec, stage: int, master_address: str | None = None):
        self.spec, self.stage = spec, stage
        self.master_address = master_address or spec.master_address
        self.group_name = f"{spec.group_name}_pp{stage}"
        self._group: _UpdateGroup | None = None
        self._pool = ThreadPoolExecutor(max(1, len(spec.urls)), thread_name_prefix="stage_sync")

    def _post(self, url: str, path: str, payload: dict) -> Any:
        try:
            r = requests.post(f"{url}{path}", json=payload,
                              timeout=(self.spec.connect_timeout_s, self.spec.sync_timeout_s))
        except requests.exceptions.RequestException as e:
            raise SGLangError(f"POST {url}{path}: {e}") from e
        if r.status_code >= 400:
            raise SGLangError(f"POST {url}{path} -> {r.status_code}: {r.text[:2000]}")
        return r.json()

    def _ensure_group(self) -> _UpdateGroup:
        if self._group is not None:
            return self._group
        spec = self.spec
        port = spec.master_port + 1 + self.stage if spec.master_port else 0
        group = _UpdateGroup(self.master_address, port, spec.world_size, self.group_name,
                             spec.backend, timedelta(seconds=spec.sync_timeout_s))
        offsets = [1 + sum(spec.tp_sizes[:k]) for k in range(len(spec.urls))]
        futures = [
            self._pool.submit(self._post, url, "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": group.port,
                "rank_offset": off, "world_size": spec.world_size,
                "group_name": self.group_name, "backend": spec.backend,
            })
            for url, off in zip(spec.urls, offsets, strict=True)
        ]
        group.join()
        for f in futures:
            f.result()
        self._group = group
        return group

    def send(self, buckets: Iterable[NamedTensors], version: int) -> int:
        """Broadcast every bucket (one POST per server per bucket); returns the tensor count."""
        group = self._ensure_group()
        try:
            return _broadcast_buckets(group, buckets, version, lambda payload: [
                self._pool.submit(self._post, url, "/update_weights_from_distributed", payload)
                for url in self.spec.urls
            ])
        except Exception:
            self._group = None  # a broken group is rebuilt on the next send
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._group = None


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class _Server:
    """One HTTP endpoint (a server we started, an attached one, or a router)."""

    index: int
    url: str
    tp_size: int | None = None
    port: int | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    inflight: int = 0
    epoch: int = 0  # bumped on every restart
    restarts: int = 0
    restarting: bool = False
    failed: bool = False  # gave up on it
    stale: bool = False  # restarted and lost the synced weights
    down_until: float = 0.0  # attached server that failed a health probe
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def owned(self) -> bool:
        return self.proc is not None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


def _terminate(servers: list[_Server], grace_s: float) -> None:
    """SIGTERM each started server's process group, then SIGKILL what is left."""
    procs = [s.proc for s in servers if s.proc is not None and s.proc.poll() is None]
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


# ---------------------------------------------------------------------------------------------
# Parsing /generate


def parse_generate_output(out: Any, prompt_ids: list[int], fallback_version: int) -> Sample:
    """One ``/generate`` answer (``text``, ``output_ids``, ``meta_info``) as a :class:`Sample`."""
    if isinstance(out, list) and len(out) == 1:
        out = out[0]
    if not isinstance(out, dict) or not isinstance(out.get("meta_info"), dict):
        raise SGLangError(f"/generate answer has no meta_info: {str(out)[:300]}")
    meta = out["meta_info"]
    pairs = meta.get("output_token_logprobs")
    if not isinstance(pairs, list):
        raise SGLangError("/generate answer lacks meta_info.output_token_logprobs")
    ids = out.get("output_ids", [p[1] for p in pairs])
    if len(ids) != len(pairs) or any(int(p[1]) != int(t) for p, t in zip(pairs, ids, strict=True)):
        raise SGLangError(
            f"/generate: output_ids ({len(ids)}) and output_token_logprobs ({len(pairs)}) disagree"
        )
    if any(p[0] is None for p in pairs):
        raise SGLangError("/generate: a response token has no logprob")
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind not in FINISH_TYPES:
        raise SGLangError(f"/generate: unexpected finish_reason {finish!r}")
    return Sample(
        prompt_ids=list(prompt_ids),
        response_ids=[int(t) for t in ids],
        text=out.get("text") or "",
        logprobs=[float(p[0]) for p in pairs],
        finish_reason=kind,
        weight_version=_as_version(meta.get("weight_version"), fallback_version),
    )


def _as_version(value: Any, fallback: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):  # SGLang's initial version is the string "default"
        return fallback


@dataclass
class _Job:
    slot: tuple[int, int]
    prompt_ids: list[int]
    payload: dict


# ---------------------------------------------------------------------------------------------
# The engine


class SGLangEngine(RolloutEngine):
    """Rollout on SGLang servers: started here, attached to, or behind an sglang-router.

    ``serializer`` turns one flat dtype group into ``serialized_named_tensors`` for the colocated
    sync (default: SGLang's CUDA-IPC serializer, imported lazily). ``stats`` counts requests,
    retries, time-outs, connection and server errors, restarts and syncs for the trainer's logs.
    """

    def __init__(self, config: SGLangConfig, serializer: Serializer | None = None):
        self.cfg = config
        self._serializer = serializer or sglang_flattened_bucket_serializer
        self._version = -1
        self._closed = False
        self._lock = threading.Lock()
        self._rr = 0
        self._run_id = uuid.uuid4().hex[:8]
        self._group: _UpdateGroup | None = None
        self._group_epochs: dict[int, int] = {}
        self._group_count = 0
        self._stage_epochs: dict[int, int] | None = None
        self._stage_group = ""
        self._last_disk_dir: str | None = None
        self._stats = dict.fromkeys(
            ("generate_requests", "retries", "timeouts", "connection_errors", "server_errors",
             "restarts", "weight_syncs"), 0,
        )
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="sglang")
        self._servers: list[_Server] = []
        self._finalizer = weakref.finalize(self, _terminate, self._servers, config.shutdown_grace_s)
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # -- start-up -------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.cfg
        if cfg.launches:
            self._check_model_path()
            self._log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="sglang_logs_"))
            self._log_dir.mkdir(parents=True, exist_ok=True)
            for k in range(cfg.num_servers):
                port = cfg.base_port + k if cfg.base_port else _free_port(cfg.host)
                s = _Server(k, f"http://{cfg.host}:{port}", tp_size=cfg.tp_size, port=port,
                            log_path=self._log_dir / f"server_{k}.log")
                self._servers.append(s)
                self._launch(s)
            self._wait_healthy(self._servers)
            self._gen = list(self._servers)
        else:
            self._servers.extend(_Server(k, u.rstrip("/")) for k, u in enumerate(cfg.urls))
            self._gen = list(self._servers)
            if cfg.router_url:
                self._gen = [_Server(len(self._servers), cfg.router_url.rstrip("/"))]
            for s in {id(s): s for s in self._gen + self._servers}.values():
                self._check_reachable(s)
            self._wait_healthy(self._gen + self._servers)
        log.info("SGLang ready: generate via %s", [s.url for s in self._gen])

    def _check_model_path(self) -> None:
        path = Path(self.cfg.model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"SGLang model path {str(path)!r} does not exist or has no config.json "
                "(servers are started from a local HF folder)"
            )

    def _launch(self, s: _Server) -> None:
        cfg = self.cfg
        cmd = [
            *cfg.launch_command,
            "--model-path", str(cfg.model_path),
            "--tp-size", str(cfg.tp_size),
            "--port", str(s.port),
            "--host", cfg.host,
            "--mem-fraction-static", str(cfg.mem_fraction_static),
            "--base-gpu-id", str(cfg.base_gpu_id + s.index * cfg.tp_size),
        ]
        if cfg.quantization:
            cmd += ["--quantization", cfg.quantization]
        cmd += list(cfg.extra_args)
        log.info("starting SGLang server %d: %s", s.index, " ".join(cmd))
        with open(s.log_path, "ab") as logf:  # the child keeps its own descriptor
            s.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def _check_reachable(self, s: _Server) -> None:
        """Fail at once, naming the URL, when nothing listens there."""
        try:
            self._session().get(f"{s.url}/health_generate",
                                timeout=(self.cfg.connect_timeout_s, self.cfg.health_timeout_s))
        except requests.exceptions.ConnectionError as e:
            raise SGLangError(f"cannot reach SGLang server at {s.url}: {e}") from e
        except requests.exceptions.Timeout:
            pass  # listening but slow: _wait_healthy decides

    def _wait_healthy(self, servers: list[_Server]) -> None:
        """Poll ``/health_generate`` until every server answers 200 (or exits, or times out)."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        pending = list(servers)
        while pending:
            for s in list(pending):
                if s.exited():
                    raise SGLangError(
                        f"SGLang server {s.url} exited with code {s.proc.returncode} while "
                        f"starting; log {s.log_path}:\n{_log_tail(s.log_path)}"
                    )
                if self._probe(s):
                    pending.remove(s)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise SGLangError(
                    f"SGLang servers not healthy after {self.cfg.startup_timeout_s:.0f}s: "
                    f"{[s.url for s in pending]}"
                )
            time.sleep(self.cfg.health_poll_s)

    def _probe(self, s: _Server) -> bool:
        try:
            r = self._session().get(f"{s.url}/health_generate",
                                    timeout=(self.cfg.connect_timeout_s, self.cfg.health_timeout_s))
            return r.status_code == 200
        except requests.exceptions.RequestException:
            return False

    # -- HTTP -----------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _backoff(self, attempt: int) -> float:
        return min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2**attempt)

    def _send(self, s: _Server, method: str, path: str, payload: Any, timeout: float) -> Any:
        """One request; raises _Transient for what a retry may fix, SGLangError for the rest."""
        url = f"{s.url}{path}"
        try:
            r = self._session().request(method, url, json=payload,
                                        timeout=(self.cfg.connect_timeout_s, timeout))
        except requests.exceptions.Timeout as e:
            raise _Transient("timeouts", f"{method} {url} timed out after {timeout}s") from e
        except (requests.exceptions.ConnectionError,
                requests.exceptions.ChunkedEncodingError) as e:
            raise _Transient("connection_errors", f"{method} {url}: {e}") from e
        if r.status_code >= 500:
            raise _Transient("server_errors", f"{method} {url} -> {r.status_code}: {r.text[:500]}")
        if r.status_code >= 400:
            raise SGLangError(f"{method} {url} -> {r.status_code}: {r.text[:2000]}")
        try:
            return r.json()
        except ValueError:
            return r.text

    def _call(self, s: _Server, method: str, path: str, payload: Any = None, *,
              timeout: float | None = None, retry: bool = True) -> Any:
        """A control request, retried with exponential backoff when ``retry`` (idempotent ones)."""
        timeout = timeout or self.cfg.control_timeout_s
        attempts = self.cfg.max_retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return self._send(s, method, path, payload, timeout)
            except _Transient as e:
                self._bump(e.kind)
                if attempt + 1 == attempts:
                    raise SGLangError(f"{e} (after {attempts} attempt(s))") from e
                self._bump("retries")
                time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _each(self, servers: Sequence[_Server], fn: Callable[[_Server], Any]) -> list[Any]:
        """Run ``fn`` on every server concurrently; re-raise the first failure."""
        futures = [self._pool.submit(fn, s) for s in servers]
        return [f.result() for f in futures]

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """All responses, request order then response order; each response is one request."""
        self._check_open()
        jobs = [
            _Job((i, j), list(req.prompt_ids), self._payload(req, j, sampling))
            for i, req in enumerate(requests)
            for j in range(req.n)
        ]
        cancel = threading.Event()
        futures: list[Future] = [self._pool.submit(self._run_job, job, cancel) for job in jobs]
        results: dict[tuple[int, int], Sample] = {}
        try:
            for job, fut in zip(jobs, futures, strict=True):
                results[job.slot] = fut.result()
        except BaseException:
            cancel.set()
            for f in futures:
                f.cancel()
            raise
        return [[results[(i, j)] for j in range(req.n)] for i, req in enumerate(requests)]

    def _payload(self, req: GenerateRequest, j: int, sp: SamplingParams) -> dict:
        params = {
            "max_new_tokens": sp.max_new_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "top_k": sp.top_k,
            "stop": list(sp.stop),
            "stop_token_ids": list(sp.stop_token_ids),
            "n": 1,
            "no_stop_trim": self.cfg.no_stop_trim,
            "skip_special_tokens": self.cfg.skip_special_tokens,
        }
        seed = response_seed(req.seed, j)
        if seed is not None:
            params["sampling_seed"] = seed
        return {
            "input_ids": list(req.prompt_ids),
            "sampling_params": params,
            "return_logprob": True,
            "logprob_start_len": -1,  # logprobs of output tokens only
        }

    def _run_job(self, job: _Job, cancel: threading.Event) -> Sample:
        """Generate one response, retrying on other or restarted servers; never twice."""
        for attempt in itertools.count():
            if cancel.is_set():
                raise SGLangError("generation cancelled after another request failed")
            s, epoch = self._pick_server()
            rid = f"{self._run_id}-{job.slot[0]}-{job.slot[1]}-{attempt}-{uuid.uuid4().hex[:6]}"
            try:
                out = self._generate_on(s, {**job.payload, "rid": rid})
            except _Transient as e:
                self._bump(e.kind)
                if e.kind == "timeouts":
                    self._abort(s, rid)
                self._recover(s, epoch)
                if attempt >= self.cfg.max_retries:
                    raise SGLangError(
                        f"/generate for request {job.slot[0]} response {job.slot[1]} failed "
                        f"{attempt + 1} times; last: {e}"
                    ) from e
                self._bump("retries")
                time.sleep(self._backoff(attempt))
                continue
            return parse_generate_output(out, job.prompt_ids, self._version)
        raise AssertionError("unreachable")

    def _generate_on(self, s: _Server, payload: dict) -> Any:
        self._bump("generate_requests")
        try:
            return self._send(s, "POST", "/generate", payload, self.cfg.request_timeout_s)
        finally:
            with self._lock:
                s.inflight -= 1

    def _pick_server(self) -> tuple[_Server, int]:
        """The least-loaded usable server (ties go round-robin); waits out a restart."""
        with self._lock:
            alive = [s for s in self._gen if not s.failed]
            if not alive:
                raise SGLangError("no SGLang server left: all failed or exhausted their restarts")
            fresh = [s for s in alive if not s.stale]
            if not fresh:
                raise SGLangError(
                    f"every SGLang server was restarted and lost weight version {self._version}; "
                    "call update_weights again (weight_sync='disk' reloads them automatically)"
                )
            now = time.monotonic()
            ready = [s for s in fresh if not s.restarting and s.down_until <= now] or fresh
            n = len(self._gen)
            s = min(ready, key=lambda s: (s.inflight, (s.index - self._rr) % n))
            self._rr = (s.index + 1) % n
            s.inflight += 1
            epoch = s.epoch
        if s.restarting:
            with s.lock:  # wait for the restart to finish
                epoch = s.epoch
        return s, epoch

    def _abort(self, s: _Server, rid: str) -> None:
        """Ask the server to drop a request we stopped waiting for (best effort)."""
        try:
            self._send(s, "POST", "/abort_request", {"rid": rid}, self.cfg.health_timeout_s)
        except (_Transient, SGLangError) as e:
            log.warning("abort of %s on %s failed: %s", rid, s.url, e)

    def _recover(self, s: _Server, epoch: int) -> None:
        """After a failure: restart a dead server we own; park an unhealthy attached one."""
        if not s.owned:
            if not self._probe(s):
                s.down_until = time.monotonic() + self._backoff(1)
            return
        with s.lock:
            if s.epoch != epoch or s.failed:
                return  # another thread already dealt with it
            if not s.exited() and self._probe(s):
                return  # alive and healthy: the failure was transient
            s.restarting = True
            try:
                self._restart(s)
            finally:
                s.restarting = False

    def _restart(self, s: _Server) -> None:
        if s.restarts >= self.cfg.max_restarts:
            log.error("SGLang server %s died again; giving up after %d restarts", s.url, s.restarts)
            s.failed = True
            _terminate([s], self.cfg.shutdown_grace_s)
            return
        log.warning("SGLang server %s is dead (exit code %s); restarting. Log tail:\n%s",
                    s.url, s.proc.poll(), _log_tail(s.log_path, 1500))
        _terminate([s], self.cfg.shutdown_grace_s)
        s.restarts += 1
        self._bump("restarts")
        try:
            self._launch(s)
            self._wait_healthy([s])
        except SGLangError as e:
            log.error("restart of %s failed: %s", s.url, e)
            s.failed = True
            return
        s.epoch += 1
        if self._version >= 0:
            self._restore_weights(s)

    def _restore_weights(self, s: _Server) -> None:
        """A restarted server holds base weights: reload the last disk sync, or mark it stale."""
        if self.cfg.weight_sync == "disk" and self._last_disk_dir:
            self._call(s, "POST", "/update_weights_from_disk",
                       {"model_path": self._last_disk_dir, "weight_version": str(self._version)},
                       timeout=self.cfg.sync_timeout_s)
            self._check_version(s, self._version)
        else:
            log.warning("%s restarted with base weights; idle until the next update_weights", s.url)
            s.stale = True

    # -- weight sync ----------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Pause, load every bucket (tensor/distributed/disk), flush, continue, check version."""
        servers = self._update_targets()
        sync = {"tensor": self._sync_tensor, "distributed": self._sync_distributed,
                "disk": self._sync_disk}[self.cfg.weight_sync]
        self.begin_update(version)
        try:
            sync(servers, buckets, version)
        except BaseException:
            self.abort_update()
            raise
        self.finish_update(version)

    def begin_update(self, version: int) -> None:
        """First step of a sync driven from outside (per-stage senders): pause generation."""
        self._update_targets()
        self.pause_generation()

    def finish_update(self, version: int) -> None:
        """Last step of a sync: flush, continue generation, check every server's version."""
        servers = self._update_targets()
        done = False
        try:
            self._each(servers, lambda s: self._call(s, "GET", "/flush_cache"))
            done = True
        finally:
            try:
                self.continue_generation()
            except SGLangError:
                if done:
                    raise
                log.exception("continue_generation failed after a failed weight sync")
        for s in servers:
            self._check_version(s, version)
            s.stale = False
        self._version = version
        self._bump("weight_syncs")

    def abort_update(self) -> None:
        """After a failed sync: let generation continue (best effort); the version stays."""
        try:
            self.continue_generation()
        except SGLangError:
            log.exception("continue_generation failed after a failed weight sync")

    def stage_sync_spec(self) -> StageSyncSpec:
        """What per-stage senders need; a new ``group_name`` after a server was restarted."""
        servers = self._update_targets()
        epochs = {s.index: s.epoch for s in servers}
        if epochs != self._stage_epochs:
            self._group_count += 1
            self._stage_group = f"{self.cfg.group_name}_{self._group_count}"
            self._stage_epochs = epochs
        cfg = self.cfg
        return StageSyncSpec(
            urls=tuple(s.url for s in servers),
            tp_sizes=tuple(self._tp_size(s) for s in servers),
            master_address=cfg.dist_master_address, master_port=cfg.dist_master_port,
            backend=self._backend(), group_name=self._stage_group,
            connect_timeout_s=cfg.connect_timeout_s, sync_timeout_s=cfg.sync_timeout_s,
        )

    def _update_targets(self) -> list[_Server]:
        servers = self._live()
        if not servers:
            raise SGLangError("no SGLang server left to update")
        return servers

    def _backend(self) -> str:
        return self.cfg.dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")

    def _check_version(self, s: _Server, version: int) -> None:
        got = self._call(s, "GET", "/get_weight_version")
        reported = got.get("weight_version") if isinstance(got, dict) else got
        if str(reported) != str(version):
            raise SGLangError(
                f"{s.url} reports weight version {reported!r} after a sync to version {version}"
            )

    def _tp_size(self, s: _Server) -> int:
        if s.tp_size is None:
            info = self._call(s, "GET", "/get_server_info")
            s.tp_size = int(info.get("tp_size", self.cfg.tp_size))
        return s.tp_size

    def _sync_tensor(self, servers: list[_Server], buckets: Iterable[NamedTensors],
                     version: int) -> None:
        """Colocated: POST each dtype group of each bucket as a flattened CUDA-IPC bucket."""
        count = 0
        for bucket in buckets:
            for flat, metas in flatten_bucket(bucket):
                count += len(metas)
                payloads: dict[int, list[str]] = {}
                for s in servers:
                    tp = self._tp_size(s)
                    if tp not in payloads:
                        payloads[tp] = self._serializer(flat, metas, tp)
                self._each(servers, lambda s, p=payloads: self._call(
                    s, "POST", "/update_weights_from_tensor",
                    {"serialized_named_tensors": p[self._tp_size(s)],
                     "load_format": "flattened_bucket", "flush_cache": False,
                     "weight_version": str(version)},
                    timeout=self.cfg.sync_timeout_s,
                ))
        _require_tensors(count)

    def _sync_distributed(self, servers: list[_Server], buckets: Iterable[NamedTensors],
                          version: int) -> None:
        """Disaggregated: per bucket, POST the names while rank 0 broadcasts the tensors."""
        group = self._ensure_group(servers)
        try:
            count = _broadcast_buckets(group, buckets, version, lambda payload: [
                self._pool.submit(self._call, s, "POST", "/update_weights_from_distributed",
                                  payload, timeout=self.cfg.sync_timeout_s, retry=False)
                for s in servers
            ])
        except Exception:
            self._group = None  # a broken group is rebuilt on the next sync
            raise
        _require_tensors(count)

    def _ensure_group(self, servers: list[_Server]) -> _UpdateGroup:
        """Create the update group once; again (new name) after a server was restarted."""
        epochs = {s.index: s.epoch for s in servers}
        if self._group is not None and epochs == self._group_epochs:
            return self._group
        cfg = self.cfg
        backend = self._backend()
        tps = [self._tp_size(s) for s in servers]
        world = 1 + sum(tps)
        self._group_count += 1
        name = f"{cfg.group_name}_{self._group_count}"
        timeout = timedelta(seconds=cfg.sync_timeout_s)
        group = _UpdateGroup(cfg.dist_master_address, cfg.dist_master_port, world, name, backend,
                             timeout)
        offsets = [1 + sum(tps[:k]) for k in range(len(servers))]
        futures = [
            self._pool.submit(self._call, s, "POST", "/init_weights_update_group", {
                "master_address": cfg.dist_master_address, "master_port": group.port,
                "rank_offset": off, "world_size": world, "group_name": name, "backend": backend,
            }, timeout=cfg.sync_timeout_s, retry=False)
            for s, off in zip(servers, offsets, strict=True)
        ]
        group.join()
        for f in futures:
            f.result()
        self._group, self._group_epochs = group, epochs
        return group

    def _sync_disk(self, servers: list[_Server], buckets: Iterable[NamedTensors],
                   version: int) -> None:
        """Write the buckets as an HF safetensors folder, then ``/update_weights_from_disk``."""
        final = Path(self.cfg.sync_dir) / "weights"
        stage = staging_dir(final)
        shutil.rmtree(stage, ignore_errors=True)
        _require_tensors(write_bucket_shards(buckets, stage))
        if self.cfg.model_path and Path(self.cfg.model_path).is_dir():
            copy_side_files(self.cfg.model_path, stage)
        publish_dir(final)
        self._last_disk_dir = str(final)
        self._each(servers, lambda s: self._call(
            s, "POST", "/update_weights_from_disk",
            {"model_path": str(final), "weight_version": str(version)},
            timeout=self.cfg.sync_timeout_s,
        ))

    # -- control --------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start (a copy): requests, retries, time-outs, errors, restarts, syncs."""
        with self._lock:
            return dict(self._stats)

    @property
    def urls(self) -> list[str]:
        """Where weight updates go (the servers themselves, never the router)."""
        return [s.url for s in self._servers]

    def pause_generation(self) -> None:
        self._each(self._live(), lambda s: self._call(s, "POST", "/pause_generation", {}))

    def continue_generation(self) -> None:
        self._each(self._live(), lambda s: self._call(s, "POST", "/continue_generation", {}))

    def flush_cache(self) -> None:
        """Drop the prefix cache of every server (fails on a server that is still busy)."""
        self._each(self._live(), lambda s: self._call(s, "GET", "/flush_cache"))

    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        self._each(self._live(), lambda s: self._call(
            s, "POST", "/release_memory_occupation", {"tags": list(tags)}))

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        self._each(self._live(), lambda s: self._call(
            s, "POST", "/resume_memory_occupation", {"tags": list(tags)}))

    def health(self) -> bool:
        if self._closed:
            return False
        gen = [s for s in self._gen if not s.failed and not s.stale]
        return bool(gen) and all(not s.exited() and self._probe(s) for s in gen)

    def shutdown(self) -> None:
        """Stop every server this engine started (whole process groups); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._group = None
        self._finalizer()

    def _live(self) -> list[_Server]:
        self._check_open()
        return [s for s in self._servers if not s.failed]

    def _check_open(self) -> None:
        if self._closed:
            raise SGLangError("SGLangEngine is shut down")

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _require_tensors(count: int) -> None:
    if count == 0:
        raise ValueError("update_weights got no tensors")
