"""``SGLangEngine``: rollout on SGLang servers (started here, attached to, or behind a router).

Generation streams every response of a round as its own ``/generate`` request, bounded per
server by ``max_concurrency``, and ``submit`` adds one request's responses to what is in flight
(the multi-turn loop sends each trajectory's next turn this way); weights arrive in one of three modes (``tensor.py``,
``distributed.py``, ``disk.py``) wrapped in the same begin/finish steps: pause (which aborts
in-flight requests), open weight-update sessions where the server has them, load, close them,
flush the prefix cache, continue, and check every server's live weight version.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from megatron_gvpo.rollout.base import (
    GenerateRequest,
    NamedTensors,
    RolloutEngine,
    Sample,
    SamplingParams,
)
from megatron_gvpo.rollout.sglang.client import Endpoint, HTTPClient, SGLangError, Transient
from megatron_gvpo.rollout.sglang.config import SGLangConfig
from megatron_gvpo.rollout.sglang.disk import load_from_disk, write_sync_folder
from megatron_gvpo.rollout.sglang.distributed import sync_distributed
from megatron_gvpo.rollout.sglang.generate import (
    Job,
    RouteLayout,
    gather_jobs,
    make_jobs,
    parse_generate_output,
    stream_jobs,
)
from megatron_gvpo.rollout.sglang.group import UpdateGroup, new_group_name
from megatron_gvpo.rollout.sglang.pool import ServerPool
from megatron_gvpo.rollout.sglang.stages import StageSyncSpec
from megatron_gvpo.rollout.sglang.tensor import (
    Serializer,
    sglang_flattened_bucket_serializer,
    sync_tensor,
)

log = logging.getLogger(__name__)


def router_worker_key(url: str) -> str:
    """A worker URL as sglang-router lists it, reduced for comparison: ``http://`` added where
    the scheme is missing (as the router adds it, ``core/steps/worker/local/create_worker.rs``
    ``normalize_url``), the ``@<dp rank>`` suffix of DP-aware workers and a trailing ``/``
    dropped."""
    if "://" not in url:
        url = "http://" + url
    base, at, rank = url.rpartition("@")
    if at and rank.isdigit():
        url = base
    return url.rstrip("/")


class SGLangEngine(RolloutEngine):
    """Rollout on SGLang servers: started here, attached to, or behind an sglang-router.

    ``serializer`` turns one flat dtype group into ``serialized_named_tensors`` for the colocated
    sync (default: SGLang's CUDA-IPC serializer, imported lazily). ``stats`` counts requests,
    retries, time-outs, connection and server errors, aborted samples, restarts and syncs.
    """

    def __init__(self, config: SGLangConfig, serializer: Serializer | None = None,
                 routes: RouteLayout | None = None):
        if routes is not None and not config.return_routed_experts:
            config = dataclasses.replace(config, return_routed_experts=True)
        self.cfg = config
        self._routes = routes  # every Sample carries its routed experts (MoE routing replay)
        self._serializer = serializer or sglang_flattened_bucket_serializer
        self._version = -1
        self._closed = False
        self._run_id = uuid.uuid4().hex[:8]
        self._group: UpdateGroup | None = None
        self._group_epochs: dict[int, int] = {}
        self._stage_epochs: dict[int, int] | None = None
        self._stage_group = ""
        self._in_session: list[Endpoint] = []
        self._session_lock = threading.Lock()
        self._last_disk_dir: str | None = None
        n_gen = 1 if config.router_url else max(config.num_servers, len(config.urls), 1)
        self._client = HTTPClient(config, workers=16 + 2 * max(n_gen, len(config.urls)))
        self._gen_pool = ThreadPoolExecutor(config.max_concurrency * n_gen,
                                            thread_name_prefix="sglang_gen")
        self._pool = ServerPool(config, self._client, owner=self)
        try:
            self._pool.start()
        except BaseException:
            self.shutdown()
            raise

    @property
    def _servers(self) -> list[Endpoint]:
        return self._pool.servers

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerateRequest], sampling: SamplingParams
    ) -> list[list[Sample]]:
        """All responses, request order then response order; each response is one request."""
        out: list[list[Sample | None]] = [[None] * req.n for req in requests]
        for i, j, sample in self.generate_stream(requests, sampling):
            out[i][j] = sample
        return out  # type: ignore[return-value]

    def generate_stream(
        self, requests: Sequence[GenerateRequest], sampling: SamplingParams
    ) -> Iterator[tuple[int, int, Sample]]:
        """Every response of the round in flight at once (at most ``max_concurrency`` per
        server); yields ``(request index, response index, sample)`` in completion order."""
        self._check_open()
        jobs = make_jobs(requests, sampling, no_stop_trim=self.cfg.no_stop_trim,
                         skip_special_tokens=self.cfg.skip_special_tokens,
                         routed_experts=self._routes is not None)
        for job, sample in stream_jobs(self._gen_pool, jobs, self._run_job):
            yield job.slot[0], job.slot[1], sample

    continuous_batching = True

    def submit(self, request: GenerateRequest, sampling: SamplingParams) -> Future[list[Sample]]:
        """Send ``request``'s responses now (each its own ``/generate`` on the generation pool,
        retried as in a round), alongside whatever else is in flight; the future holds them in
        response order. A failed response, or cancelling the future, stops the others."""
        self._check_open()
        jobs = make_jobs([request], sampling, no_stop_trim=self.cfg.no_stop_trim,
                         skip_special_tokens=self.cfg.skip_special_tokens,
                         routed_experts=self._routes is not None)
        return gather_jobs(self._gen_pool, jobs, self._run_job)

    def _run_job(self, job: Job, cancel: threading.Event) -> Sample:
        """Generate one response, retrying on other or restarted servers. A response cut off by
        a pause (finish ``abort``) is truncated: it is drawn again, never returned."""
        cfg = self.cfg
        for attempt in itertools.count():
            if cancel.is_set():
                raise SGLangError("generation cancelled after another request failed")
            s, epoch = self._pool.pick(self._version)
            rid = f"{self._run_id}-{job.slot[0]}-{job.slot[1]}-{attempt}-{uuid.uuid4().hex[:6]}"
            try:
                out = self._generate_on(s, {**job.payload, "rid": rid})
            except Transient as e:
                self._client.bump(e.kind)
                if e.kind == "timeouts":
                    self._pool.abort(s, rid)
                self._pool.recover(s, epoch, self._restore_weights)
                failure: Exception = e
            else:
                sample = parse_generate_output(out, job.prompt_ids, self._version, self._routes)
                if sample.finish_reason != "abort":
                    return sample
                self._client.bump("aborted_samples")
                failure = SGLangError(f"response aborted by {s.url} (paused or aborted)")
            if attempt >= cfg.max_retries:
                raise SGLangError(
                    f"/generate for request {job.slot[0]} response {job.slot[1]} failed "
                    f"{attempt + 1} times; last: {failure}"
                ) from failure
            self._client.bump("retries")
            time.sleep(self._client.backoff(attempt))
        raise AssertionError("unreachable")

    def _generate_on(self, s: Endpoint, payload: dict) -> object:
        self._client.bump("generate_requests")
        try:
            return self._client.send(s, "POST", "/generate", payload, self.cfg.request_timeout_s)
        finally:
            self._pool.done(s)

    def _restore_weights(self, s: Endpoint) -> None:
        """A restarted server holds base weights: reload the last disk sync, or mark it stale."""
        if self._version < 0:
            return
        if self.cfg.weight_sync == "disk" and self._last_disk_dir:
            load_from_disk(self._client, [s], self._last_disk_dir, self._version)
            self._check_version(s, self._version)
        else:
            log.warning("%s restarted with base weights; idle until the next update_weights", s.url)
            s.stale = True

    # -- weight sync ----------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Pause, load every bucket (tensor/distributed/disk), finish; see :meth:`begin_update`."""
        self.begin_update(version)
        try:
            servers = self._update_targets()
            mode = self.cfg.weight_sync
            if mode == "tensor":
                count = sync_tensor(self._client, servers, buckets, version, self._serializer)
            elif mode == "distributed":
                group = self._ensure_group(servers)
                try:
                    count = sync_distributed(self._client, servers, group, buckets, version)
                except Exception:
                    self._group = None  # rebuilt (under a new name) on the next sync
                    raise
            else:
                folder, count = write_sync_folder(self.cfg.sync_dir, buckets, self.cfg.model_path)
                if count:
                    load_from_disk(self._client, servers, folder, version)
                    self._last_disk_dir = folder
            if count == 0:
                raise ValueError("update_weights got no tensors")
        except BaseException:
            self.abort_update()
            raise
        self.finish_update(version)

    def begin_update(self, version: int) -> None:
        """First step of every sync (also of one driven by per-stage senders): pause generation
        (SGLang's default mode aborts in-flight requests), then open a weight-update session on
        every server that has them (tensor and distributed modes)."""
        servers = self._update_targets()
        self._client.each(servers, lambda s: self._client.learn(s, self.cfg.tp_size))
        try:
            self.pause_generation()
            if self.cfg.weight_sync != "disk":
                self._client.each(servers, self._open_session)
        except BaseException:  # partway: no server stays paused, no session stays open
            self.abort_update()
            raise

    def _open_session(self, s: Endpoint) -> None:
        """Open ``s``'s session and record it at once (a later failure elsewhere ends it)."""
        if self._client.begin_session(s):
            with self._session_lock:
                self._in_session.append(s)

    def finish_update(self, version: int) -> None:
        """Last step: close sessions, flush, continue generation, check every live version."""
        servers = self._update_targets()
        done = False
        try:
            self._end_sessions()
            self._client.each(servers, lambda s: self._client.call(s, "GET", "/flush_cache"))
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
        self._client.bump("weight_syncs")
        if self.cfg.router_url:
            self._wait_for_router()

    def _wait_for_router(self) -> None:
        """Before the next rollout: wait until the router counts every worker of ``urls``
        healthy again, at most ``router_recovery_timeout_s``. sglang-router's health checks
        mark a worker that stayed paused through a long sync unhealthy and route to it only
        after enough passing checks; its ``GET /workers`` lists each worker's ``is_healthy``
        (sglang-router 0.3.x ``core/worker_service.rs`` ``list_workers``). A router without that
        route is probed with one ``/health_generate`` through it instead."""
        router = self._pool.gen[0]
        deadline = time.monotonic() + self.cfg.router_recovery_timeout_s
        waited = False
        while pending := self._router_pending(router):
            if time.monotonic() > deadline:
                raise SGLangError(
                    f"router {router.url} did not route to {pending} again within "
                    f"rollout.sglang.router_recovery_timeout_s={self.cfg.router_recovery_timeout_s:g}"
                    " s after a weight sync (its health checks marked the paused workers "
                    "unhealthy, or it does not list them under these URLs; see README for the "
                    "router's health-check flags)"
                )
            if not waited:
                log.warning("router %s holds workers %s unhealthy after the sync; waiting",
                            router.url, pending)
                waited = True
            time.sleep(self.cfg.health_poll_s)

    def _router_pending(self, router: Endpoint) -> list[str]:
        """The workers of ``urls`` the router does not count healthy yet ([] once it does)."""
        try:
            listing = self._client.call(router, "GET", "/workers", retry=False)
        except SGLangError as e:
            if e.status == 404:  # a router without /workers: one generation through it decides
                return [] if self._client.probe(router) else list(self.cfg.urls)
            return list(self.cfg.urls)
        healthy: dict[str, bool] = {}
        for w in listing.get("workers", []) if isinstance(listing, dict) else []:
            if isinstance(w, dict) and isinstance(w.get("url"), str):
                key = router_worker_key(w["url"])  # DP-aware entries: one per rank
                healthy[key] = healthy.get(key, True) and w.get("is_healthy") is True
        return [u for u in self.cfg.urls if not healthy.get(router_worker_key(u), False)]

    def abort_update(self) -> None:
        """After a failed sync: close open sessions and let generation continue (best effort);
        the engine's version stays."""
        try:
            self._end_sessions()
        except SGLangError:
            log.exception("end_weight_update failed after a failed weight sync")
        try:
            self.continue_generation()
        except SGLangError:
            log.exception("continue_generation failed after a failed weight sync")

    def _end_sessions(self) -> None:
        with self._session_lock:
            servers, self._in_session = self._in_session, []
        self._client.each(servers, self._client.end_session)

    @property
    def colocated(self) -> bool:
        """CUDA-IPC (tensor) sync: the servers share the trainer's GPUs."""
        return self.cfg.weight_sync == "tensor"

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.stats.items()}

    def stage_sync_target(self) -> StageSyncSpec | None:
        """What per-stage senders need in distributed mode (a new ``group_name`` after a server
        was restarted); None in the other modes, which enter through ``update_weights``."""
        if self.cfg.weight_sync != "distributed":
            return None
        servers = self._update_targets()
        self._client.each(servers, lambda s: self._client.learn(s, self.cfg.tp_size))
        epochs = {s.index: s.epoch for s in servers}
        if epochs != self._stage_epochs:
            self._stage_group = new_group_name(self.cfg.group_name)
            self._stage_epochs = epochs
        cfg = self.cfg
        return StageSyncSpec(
            urls=tuple(s.url for s in servers),
            tp_sizes=tuple(s.tp_size or 1 for s in servers),
            master_address=cfg.dist_master_address, master_port=cfg.dist_master_port,
            backend=self._backend(), group_name=self._stage_group,
            connect_timeout_s=cfg.connect_timeout_s, sync_timeout_s=cfg.sync_timeout_s,
        )

    def _update_targets(self) -> list[Endpoint]:
        servers = self._live()
        if not servers:
            raise SGLangError("no SGLang server left to update")
        return servers

    def _backend(self) -> str:
        return self.cfg.dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")

    def _check_version(self, s: Endpoint, version: int) -> None:
        reported = self._client.weight_version(s)
        if str(reported) != str(version):
            raise SGLangError(
                f"{s.url} reports weight version {reported!r} after a sync to version {version}"
            )

    def _ensure_group(self, servers: list[Endpoint]) -> UpdateGroup:
        """Create the update group once; again, under a new name, after a server restarted."""
        epochs = {s.index: s.epoch for s in servers}
        if self._group is not None and epochs == self._group_epochs:
            return self._group
        if self._group is not None:
            self._group.destroy(self._client)
        cfg = self.cfg
        group = UpdateGroup(new_group_name(cfg.group_name), servers, cfg.dist_master_address,
                            cfg.dist_master_port, self._backend(), cfg.sync_timeout_s)
        group.create(self._client)
        self._group, self._group_epochs = group, epochs
        return group

    # -- control --------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start (a copy): requests, retries, time-outs, errors, restarts, syncs."""
        return dict(self._client.stats)

    @property
    def urls(self) -> list[str]:
        """Where weight updates go (the servers themselves, never the router)."""
        return [s.url for s in self._servers]

    def pause_generation(self) -> None:
        self._client.each(self._live(), lambda s: self._client.call(
            s, "POST", "/pause_generation", {}))

    def continue_generation(self) -> None:
        self._client.each(self._live(), lambda s: self._client.call(
            s, "POST", "/continue_generation", {}))

    def flush_cache(self) -> None:
        """Drop the prefix cache of every server (refused while requests run)."""
        self._client.each(self._live(), lambda s: self._client.call(s, "GET", "/flush_cache"))

    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Free the servers' weights / KV cache (frees nothing unless started with
        ``--enable-memory-saver``, which servers we start get in the tensor mode)."""
        self._client.each(self._live(), lambda s: self._client.call(
            s, "POST", "/release_memory_occupation", {"tags": list(tags)}))

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        self._client.each(self._live(), lambda s: self._client.call(
            s, "POST", "/resume_memory_occupation", {"tags": list(tags)}))

    def health(self) -> bool:
        return not self._closed and self._pool.healthy()

    def shutdown(self) -> None:
        """Destroy our update group on attached servers, stop every server we started (whole
        process groups); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._group is not None and not any(s.owned for s in self._servers):
            self._group.destroy(self._client)
        self._group = None
        self._gen_pool.shutdown(wait=False, cancel_futures=True)
        self._client.pool.shutdown(wait=False, cancel_futures=True)
        self._pool.stop()

    def _live(self) -> list[Endpoint]:
        self._check_open()
        return self._pool.live()

    def _check_open(self) -> None:
        if self._closed:
            raise SGLangError("SGLangEngine is shut down")

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
