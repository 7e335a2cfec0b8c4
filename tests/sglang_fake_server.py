"""A PROTOCOL FAKE of SGLang's HTTP server, for tests only. It is not SGLang and runs no model.

It answers the endpoints ``megatron_gvpo.rollout.sglang`` uses with SGLang's request and response
shapes (read from sgl-project/sglang ``http_server.py`` / ``io_struct.py`` and from how slime and
verl call them), rejects any request whose fields have the wrong type, miss a required key or carry
an unknown one, and injects faults (5xx, dropped connections, slow answers, a process exit, stale
weight versions). Tokens are deterministic in (input_ids, sampling_seed), see :func:`fake_tokens`.
``/init_weights_update_group`` really joins a gloo process group the way SGLang's side does (torch
``rendezvous`` + ``_new_process_group_helper``) and ``/update_weights_from_distributed`` really
receives the broadcasts; ``/update_weights_from_disk`` really reads the safetensors folder.

Run as a script it takes the flags of ``python -m sglang.launch_server`` that the engine passes
(plus ``--fake-*`` fault flags) and rejects any other flag.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STANDIN_PREFIX = "fake-flat-bucket:"
MEMORY_TAGS = {"weights", "kv_cache", "cuda_graph"}


# -- field checks --------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


_int_list = _list_of(_is_int)
_str_list = _list_of(_is_str)

GENERATE = {
    "input_ids": (lambda v: _int_list(v) and len(v) > 0, True),
    "sampling_params": (lambda v: isinstance(v, dict), True),
    "return_logprob": (_is_bool, False),
    "logprob_start_len": (_is_int, False),
    "rid": (_is_str, False),
    "stream": (lambda v: v is False, False),
}
SAMPLING = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, False),
    "temperature": (lambda v: _is_num(v) and v >= 0, False),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, False),
    "top_k": (lambda v: _is_int(v) and (v == -1 or v >= 1), False),
    "stop": (_str_list, False),
    "stop_token_ids": (_int_list, False),
    "n": (lambda v: _is_int(v) and v >= 1, False),
    "no_stop_trim": (_is_bool, False),
    "skip_special_tokens": (_is_bool, False),
    "sampling_seed": (_is_int, False),
}
TENSOR = {
    "serialized_named_tensors": (_str_list, True),
    "load_format": (_opt_str, False),
    "flush_cache": (_is_bool, False),
    "weight_version": (_opt_str, False),
    "abort_all_requests": (_is_bool, False),
}
INIT_GROUP = {
    "master_address": (_is_str, True),
    "master_port": (lambda v: _is_int(v) and 0 < v < 65536, True),
    "rank_offset": (lambda v: _is_int(v) and v >= 1, True),
    "world_size": (lambda v: _is_int(v) and v >= 2, True),
    "group_name": (_is_str, False),
    "backend": (lambda v: v in ("gloo", "nccl"), False),
}
DISTRIBUTED = {
    "names": (_str_list, True),
    "dtypes": (_str_list, True),
    "shapes": (_list_of(_int_list), True),
    "group_name": (_is_str, False),
    "flush_cache": (_is_bool, False),
    "weight_version": (_opt_str, False),
    "load_format": (_opt_str, False),
    "abort_all_requests": (_is_bool, False),
}
DISK = {
    "model_path": (_is_str, True),
    "load_format": (_opt_str, False),
    "weight_version": (_opt_str, False),
    "flush_cache": (_is_bool, False),
    "abort_all_requests": (_is_bool, False),
}
MEMORY = {"tags": (lambda v: _str_list(v) and set(v) <= MEMORY_TAGS, False)}
ABORT = {"rid": (_is_str, False), "abort_all": (_is_bool, False)}
PAUSE = {"mode": (lambda v: v in ("abort", "retract", "in_place"), False)}


class BadRequest(Exception):
    pass


def check_fields(body: Any, spec: dict, where: str) -> None:
    """Raise BadRequest unless ``body`` is a dict with the required keys, no others, right types."""
    if not isinstance(body, dict):
        raise BadRequest(f"{where}: body must be a JSON object")
    unknown = set(body) - set(spec)
    if unknown:
        raise BadRequest(f"{where}: unknown field(s) {sorted(unknown)}")
    for key, (check, required) in spec.items():
        if key not in body:
            if required:
                raise BadRequest(f"{where}: missing field {key!r}")
        elif not check(body[key]):
            raise BadRequest(f"{where}: bad value for {key!r}: {body[key]!r}")


# -- deterministic generation --------------------------------------------------------------------


def fake_tokens(input_ids: list[int], params: dict) -> tuple[list[int], list[float], dict, str]:
    """(output_ids, logprobs, finish_reason, text) the fake returns; a pure function of the seed."""
    seed = params.get("sampling_seed")
    rng = random.Random(f"{input_ids}|{seed}") if seed is not None else random.Random()
    stops = set(params.get("stop_token_ids", []))
    stop_strs = params.get("stop", [])
    ids: list[int] = []
    text = ""
    finish = None
    for _ in range(params.get("max_new_tokens", 128)):
        tok = rng.randrange(3, 50)
        ids.append(tok)
        text += chr(97 + tok % 26)
        if tok in stops:
            finish = {"type": "stop", "matched": tok}
            break
        hit = next((s for s in stop_strs if s and s in text), None)
        if hit is not None:
            finish = {"type": "stop", "matched": hit}
            if not params.get("no_stop_trim", False):
                text = text[: text.index(hit)]
            break
    if finish is None:
        finish = {"type": "length", "length": len(ids)}
    logprobs = [fake_logprob(t, p) for p, t in enumerate(ids)]
    return ids, logprobs, finish, text


def fake_logprob(token: int, pos: int) -> float:
    return -(((token * 31 + pos * 7) % 97) / 50.0) - 0.01


# -- stand-in tensor serialization (replaces SGLang's CUDA-IPC serializer in tests) -------------


def encode_standin_bucket(flat, metas, tp_size: int) -> list[str]:
    """A test serializer for the engine: the flat tensor as safetensors bytes plus the metadata."""
    from safetensors.torch import save

    doc = {
        "blob": base64.b64encode(save({"flat": flat.contiguous()})).decode(),
        "meta": [
            {"name": m.name, "shape": list(m.shape), "dtype": str(m.dtype).removeprefix("torch."),
             "start": m.start, "end": m.end}
            for m in metas
        ],
    }
    return [STANDIN_PREFIX + json.dumps(doc)] * tp_size


def decode_standin_bucket(payload: str) -> dict:
    """Inverse of :func:`encode_standin_bucket`: name -> tensor."""
    from safetensors.torch import load

    doc = json.loads(payload[len(STANDIN_PREFIX):])
    flat = load(base64.b64decode(doc["blob"]))["flat"]
    out = {}
    for m in doc["meta"]:
        if str(flat.dtype).removeprefix("torch.") != m["dtype"]:
            raise BadRequest(f"tensor {m['name']}: dtype {m['dtype']} but bucket is {flat.dtype}")
        out[m["name"]] = flat[m["start"] : m["end"]].view(m["shape"]).clone()
    return out


# -- state and faults ----------------------------------------------------------------------------


class FakeState:
    """What the fake remembers: a request log, weights received, version, faults to inject."""

    def __init__(self, tp_size: int = 1, model_path: str = "", **faults: Any):
        self.tp_size = tp_size
        self.model_path = model_path
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.version = "default"
        self.paused = False
        self.released: set[str] = set()
        self.weights: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}
        self.generates = 0
        self.faults = {
            "fail_generate": 0,  # the next N /generate answer 500
            "drop_generate": 0,  # the next N /generate close the connection without answering
            "slow_generate": 0,  # the next N /generate sleep slow_s first
            "slow_s": 1.0,
            "generate_delay_s": 0.0,  # every /generate sleeps this long
            "exit_after_generates": 0,  # os._exit when the Kth /generate arrives ...
            "crash_marker": "",  # ... unless this file exists (then crash once and create it)
            "stale_version": False,  # /get_weight_version reports an old version
        }
        unknown = set(faults) - set(self.faults)
        if unknown:
            raise TypeError(f"unknown fault(s) {sorted(unknown)}")
        self.faults.update(faults)

    def take(self, fault: str) -> bool:
        """Consume one occurrence of a counted fault."""
        with self.lock:
            if self.faults[fault] > 0:
                self.faults[fault] -= 1
                return True
            return False

    def paths(self) -> list[str]:
        return [e["path"] for e in self.log]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeState

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?")[0]
        try:
            body = self._body()
            if not path.startswith("/fake/"):
                with self.state.lock:
                    self.state.log.append({"method": method, "path": path, "body": body})
            route = ROUTES.get((method, path))
            if route is None:
                return self._reply(404, {"detail": f"no route {method} {path}"})
            result = route(self, body)
            if result is not None:
                self._reply(*result)
        except BadRequest as e:
            self._reply(400, {"object": "error", "message": str(e), "type": "BadRequest",
                              "code": 400})

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n == 0:
            return None
        try:
            return json.loads(self.rfile.read(n))
        except ValueError as e:
            raise BadRequest(f"body is not JSON: {e}") from e

    def _reply(self, code: int, payload: Any) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def drop(self) -> None:
        """Close the connection without an answer, as a crashing server would."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# -- endpoints -----------------------------------------------------------------------------------


def _no_body(body: Any, where: str) -> None:
    if body not in (None, {}):
        raise BadRequest(f"{where}: takes no body, got {body!r}")


def health(h: _Handler, body: Any):
    _no_body(body, "/health_generate")
    return 200, ""


def generate(h: _Handler, body: Any):
    check_fields(body, GENERATE, "/generate")
    params = body["sampling_params"]
    check_fields(params, SAMPLING, "/generate sampling_params")
    st = h.state
    with st.lock:
        st.generates += 1
        k = st.generates
    f = st.faults
    if f["exit_after_generates"] and k >= f["exit_after_generates"]:
        marker = Path(f["crash_marker"])
        if not marker.exists():
            marker.write_text("crashed\n")
            os._exit(17)
    if st.take("fail_generate"):
        return 500, {"object": "error", "message": "injected server error", "code": 500}
    if st.take("drop_generate"):
        return h.drop()
    if st.take("slow_generate"):
        time.sleep(f["slow_s"])
    if f["generate_delay_s"]:
        time.sleep(f["generate_delay_s"])
    outs = [_one_output(st, body, params) for _ in range(params.get("n", 1))]
    return 200, outs[0] if len(outs) == 1 else outs


def _one_output(st: FakeState, body: dict, params: dict) -> dict:
    ids, logprobs, finish, text = fake_tokens(body["input_ids"], params)
    meta = {
        "id": body.get("rid", "fake"),
        "finish_reason": finish,
        "prompt_tokens": len(body["input_ids"]),
        "weight_version": st.version,
        "completion_tokens": len(ids),
        "cached_tokens": 0,
        "e2e_latency": 0.0,
    }
    if body.get("return_logprob"):
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(logprobs, ids, strict=True)]
    return {"text": text, "output_ids": ids, "meta_info": meta}


def server_info(h: _Handler, body: Any):
    _no_body(body, "/get_server_info")
    return 200, {"tp_size": h.state.tp_size, "model_path": h.state.model_path,
                 "weight_version": h.state.version}


def weight_version(h: _Handler, body: Any):
    _no_body(body, "/get_weight_version")
    v = "stale" if h.state.faults["stale_version"] else h.state.version
    return 200, {"weight_version": v}


def flush_cache(h: _Handler, body: Any):
    _no_body(body, "/flush_cache")
    return 200, "Cache flushed.\n"


def pause(h: _Handler, body: Any):
    check_fields(body or {}, PAUSE, "/pause_generation")
    h.state.paused = True
    return 200, {"message": "Generation paused successfully.", "status": "ok"}


def resume(h: _Handler, body: Any):
    check_fields(body or {}, {}, "/continue_generation")
    h.state.paused = False
    return 200, {"message": "Generation continued successfully.", "status": "ok"}


def release(h: _Handler, body: Any):
    check_fields(body or {}, MEMORY, "/release_memory_occupation")
    h.state.released |= set((body or {}).get("tags") or MEMORY_TAGS)
    return 200, ""


def resume_memory(h: _Handler, body: Any):
    check_fields(body or {}, MEMORY, "/resume_memory_occupation")
    h.state.released -= set((body or {}).get("tags") or MEMORY_TAGS)
    return 200, ""


def abort(h: _Handler, body: Any):
    check_fields(body, ABORT, "/abort_request")
    return 200, ""


def from_tensor(h: _Handler, body: Any):
    check_fields(body, TENSOR, "/update_weights_from_tensor")
    st = h.state
    payloads = body["serialized_named_tensors"]
    if len(payloads) != st.tp_size:
        raise BadRequest(f"serialized_named_tensors has {len(payloads)} entries, tp_size is "
                         f"{st.tp_size}")
    if body.get("load_format") != "flattened_bucket":
        raise BadRequest("protocol fake only decodes load_format='flattened_bucket'")
    if payloads[0].startswith(STANDIN_PREFIX):
        st.weights.update(decode_standin_bucket(payloads[0]))
    return _updated(st, body)


def _updated(st: FakeState, body: dict):
    if body.get("weight_version") is not None:
        st.version = body["weight_version"]
    return 200, {"success": True, "message": "Succeeded to update model weights."}


def init_group(h: _Handler, body: Any):
    check_fields(body, INIT_GROUP, "/init_weights_update_group")
    import datetime

    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        rendezvous,
    )

    st = h.state
    if body.get("backend", "nccl") != "gloo":
        raise BadRequest("protocol fake joins gloo groups only (nccl needs GPUs)")
    if st.tp_size != 1:
        raise BadRequest("protocol fake joins a group with tp_size 1 only")
    name = body.get("group_name", "weight_update_group")
    timeout = datetime.timedelta(seconds=30)
    url = f"tcp://{body['master_address']}:{body['master_port']}"
    store, rank, world = next(rendezvous(url, body["rank_offset"], body["world_size"],
                                         timeout=timeout))
    pg, _ = _new_process_group_helper(world, rank, [], Backend("gloo"),
                                      PrefixStore(name, store), group_name=name, timeout=timeout)
    st.groups[name] = (pg, store)
    return 200, {"success": True, "message": "Succeeded to initialize custom process group."}


def from_distributed(h: _Handler, body: Any):
    check_fields(body, DISTRIBUTED, "/update_weights_from_distributed")
    import torch
    import torch.distributed as dist

    st = h.state
    names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest("names, dtypes and shapes differ in length")
    name = body.get("group_name", "weight_update_group")
    if name not in st.groups:
        raise BadRequest(f"no weight update group {name!r}")
    pg = st.groups[name][0]
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    for n, d, s in zip(names, dtypes, shapes, strict=True):
        if not isinstance(getattr(torch, d, None), torch.dtype):
            raise BadRequest(f"unknown dtype {d!r}")
        t = torch.empty(s, dtype=getattr(torch, d))
        pg.broadcast([t], opts).wait()
        st.weights[n] = t
    return _updated(st, body)


def from_disk(h: _Handler, body: Any):
    check_fields(body, DISK, "/update_weights_from_disk")
    from safetensors.torch import load_file

    folder = Path(body["model_path"])
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return 400, {"success": False, "message": f"{folder}: no safetensors index"}
    weight_map = json.loads(index.read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        tensors = load_file(str(folder / shard))
        if set(tensors) != {n for n, f in weight_map.items() if f == shard}:
            return 400, {"success": False, "message": f"{shard}: index disagrees with file"}
        h.state.weights.update(tensors)
    return _updated(h.state, body)


def fake_log(h: _Handler, body: Any):
    return 200, {"log": h.state.log, "generates": h.state.generates}


def fake_weights(h: _Handler, body: Any):
    return 200, {
        n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "values": t.float().flatten().tolist()}
        for n, t in h.state.weights.items()
    }


ROUTES = {
    ("GET", "/health_generate"): health,
    ("GET", "/health"): health,
    ("POST", "/generate"): generate,
    ("GET", "/get_server_info"): server_info,
    ("GET", "/get_weight_version"): weight_version,
    ("GET", "/flush_cache"): flush_cache,
    ("POST", "/flush_cache"): flush_cache,
    ("POST", "/pause_generation"): pause,
    ("POST", "/continue_generation"): resume,
    ("POST", "/release_memory_occupation"): release,
    ("POST", "/resume_memory_occupation"): resume_memory,
    ("POST", "/abort_request"): abort,
    ("POST", "/update_weights_from_tensor"): from_tensor,
    ("POST", "/init_weights_update_group"): init_group,
    ("POST", "/update_weights_from_distributed"): from_distributed,
    ("POST", "/update_weights_from_disk"): from_disk,
    ("GET", "/fake/log"): fake_log,  # test-only introspection, not part of SGLang
    ("GET", "/fake/weights"): fake_weights,
}


class FakeSGLangServer:
    """The protocol fake on a background thread (``with FakeSGLangServer() as fake: fake.url``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tp_size: int = 1,
                 model_path: str = "", **faults: Any):
        self.state = FakeState(tp_size, model_path, **faults)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)

    def __enter__(self) -> FakeSGLangServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    """Stand-in for ``python -m sglang.launch_server`` (same flags as the engine passes)."""
    p = argparse.ArgumentParser(description="SGLang protocol fake (tests only; not SGLang)")
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--base-gpu-id", type=int, default=0)
    p.add_argument("--quantization", choices=["fp8"])
    p.add_argument("--fake-generate-delay", type=float, default=0.0)
    p.add_argument("--fake-exit-after-generates", type=int, default=0)
    p.add_argument("--fake-crash-marker", default="")
    a = p.parse_args(argv)
    if not Path(a.model_path, "config.json").is_file():
        sys.exit(f"protocol fake: model path {a.model_path} has no config.json")
    server = FakeSGLangServer(a.host, a.port, a.tp_size, a.model_path,
                              generate_delay_s=a.fake_generate_delay,
                              exit_after_generates=a.fake_exit_after_generates,
                              crash_marker=a.fake_crash_marker)
    print(f"protocol fake listening on {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
