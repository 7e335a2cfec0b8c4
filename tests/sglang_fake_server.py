"""A PROTOCOL FAKE of SGLang's HTTP server, for tests only. It is not SGLang and runs no model.

Written from the released source (``pip download --no-deps sglang==X`` and unzip; paths below
are inside the wheel, line numbers of 0.5.23 unless a release is named) for three server
generations, chosen with ``generation=``:

- ``"0.5.23"`` (new): weight-update sessions, ``/model_info``; no ``/get_weight_version`` route.
- ``"0.5.15"`` (middle, also 0.5.10-0.5.20): ``/model_info`` and ``/server_info``;
  ``/get_weight_version`` answers 404 (0.5.15 ``entrypoints/http_server.py:685``); no sessions.
- ``"0.5.4"`` (old): live ``/get_weight_version`` (0.5.4 ``http_server.py:488``),
  ``/get_server_info`` and ``/get_model_info`` only; no sessions.

Observable rules reproduced (a route a generation lacks answers 404):

- Control and weight calls run one at a time in arrival order: one FIFO lock
  (``managers/communicator.py:42`` ``queueing_call``; the scheduler is one thread that blocks
  inside a broadcast). Two senders reaching two fakes in different orders deadlock, as real
  servers do.
- ``/flush_cache`` is refused (400) while requests run (``http_server.py:1025``; the scheduler's
  ``flush_cache`` checks ``is_fully_idle``).
- ``/pause_generation`` (mode ``abort``) aborts in-flight requests: they return with finish
  reason ``abort`` and the tokens so far; new requests wait until ``/continue_generation``
  (``managers/tokenizer_manager.py:2267, 938``). ``/health`` and ``/health_generate`` run a
  one-token generation (``http_server.py:720-799``; ``/health`` too, as
  ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION`` defaults on, ``environ.py:344``), which waits on
  the pause, so a paused server answers 503 after the health time-out
  (``HEALTH_CHECK_TIMEOUT``, ``http_server.py:218``: 20 s there, ``health_wait_s`` here).
- Sessions (new): ``update_weights_from_tensor``/``_distributed`` outside
  ``/begin_weight_update`` ... ``/end_weight_update`` answer 400 without receiving anything;
  begin twice ("a weight-update session is already open; call end_weight_update() first") or
  end without begin answer 400 (``managers/scheduler_components/weight_updater.py:232-238,
  309-335``; ``http_server.py:1458-1471`` turns ``success=False`` into 400). Disk updates
  need none.
  A session or a pause left by an interrupted trainer stays until someone ends it (tests set
  ``state.session`` / ``state.paused``); ``refuse_begin`` makes a begin fail.
- ``/init_weights_update_group`` joins a real gloo group with torch's own helper, as
  ``utils/common.py:2859`` ``init_custom_process_group`` does; torch refuses a name the process
  already holds (400), ``/destroy_weights_update_group`` frees it (400 if unknown).
- ``/release_memory_occupation`` frees memory only with ``--enable-memory-saver``
  (``utils/torch_memory_saver_adapter.py``: the no-op adapter otherwise); resuming a tag that was
  not released fails (``weight_updater.py:388`` ``offload_tags.remove``); release while requests
  run is refused (``weight_updater.py:338`` asserts idleness).
- ``/generate``: unknown top-level keys are ignored, unknown ``sampling_params`` keys are refused
  with 400 (``sglang/api/v1/api_types.py`` ``GenerateRequest`` / ``SamplingParams``).
- ``/update_weights_from_tensor`` payloads are decoded as SGLang decodes them: base64, then
  ``SafeUnpickler`` with SGLang's allow-list; a refused or broken payload kills the server
  (no answer, the port closes), as it kills the real scheduler (section "tensor payloads").
- Tensors named ``*_scale_inv`` exist only when the model folder's ``config.json`` holds an FP8
  ``quantization_config`` (online ``--quantization fp8`` creates no such parameters).
- Routed experts: a server started with ``--enable-return-routed-experts``
  (``srt/arg_groups/fields/exec_.py:158``) answers a body with ``return_routed_experts: true``
  (``srt/managers/io_struct.py:264``) with ``meta_info.routed_experts``: base64 of the int32
  bytes (``srt/managers/detokenizer_manager.py:432-446``, ``tokenizer_manager.py:2602-2609``) of
  a [tokens, num_hidden_layers, top-k] array (``srt/state_capturer/base.py:38-42``,
  ``routed_experts.py:72-73``) over tokens ``[0, len(prompt) + len(output) - 1)``
  (``scheduler_components/batch_result_processor.py:154-160``, ``base.py:173-188``), dense
  layers' columns zero (never captured). Without the flag there is no capturer
  (``routed_experts.py:50``): the request succeeds and the key is absent
  (``batch_result_processor.py:149-153``). The fake's experts are :func:`fake_routed_experts`.

Tokens are deterministic in (input_ids, sampling_seed), see :func:`fake_tokens`. Decode time is
``decode_s_per_token`` per token. Run as a script it takes the ``sglang.launch_server`` flags the
engine passes plus ``--fake-*`` flags, rejects any other flag, and (like SGLang's process-group
start-up) fails when it inherits torchrun's ``TORCHELASTIC_*`` variables.

One module (over 400 lines) on purpose: it is one server, each route beside the rule it follows.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MEMORY_TAGS = {"weights", "kv_cache", "cuda_graph"}
GENERATIONS = ("0.5.23", "0.5.15", "0.5.4")

# -- field checks --------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


_int_list = _list_of(_is_int)
_str_list = _list_of(lambda v: isinstance(v, str))
_opt_str = lambda v: v is None or isinstance(v, str)  # noqa: E731
_bool = lambda v: isinstance(v, bool)  # noqa: E731

# /generate: top-level keys we send (others are ignored, as GenerateRequest does)
GENERATE = {
    "input_ids": (lambda v: _int_list(v) and len(v) > 0, True),
    "sampling_params": (lambda v: isinstance(v, dict), True),
    "return_logprob": (_bool, False),
    "logprob_start_len": (_is_int, False),
    "rid": (lambda v: isinstance(v, str), False),
    "stream": (lambda v: v is False, False),
    "return_routed_experts": (_bool, False),
}
# sampling_params: a subset of api_types.SamplingParams' fields; unknown keys refused
SAMPLING = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, False),
    "temperature": (lambda v: _is_num(v) and v >= 0, False),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, False),
    "top_k": (lambda v: _is_int(v) and (v == -1 or v >= 1), False),
    "min_p": (_is_num, False),
    "stop": (_str_list, False),
    "stop_token_ids": (_int_list, False),
    "n": (lambda v: _is_int(v) and v >= 1, False),
    "no_stop_trim": (_bool, False),
    "skip_special_tokens": (_bool, False),
    "ignore_eos": (_bool, False),
    "sampling_seed": (_is_int, False),
}
TENSOR = {
    "serialized_named_tensors": (_str_list, True),
    "load_format": (_opt_str, False),
    "flush_cache": (_bool, False),
    "weight_version": (_opt_str, False),
    "abort_all_requests": (_bool, False),
}
INIT_GROUP = {
    "master_address": (lambda v: isinstance(v, str), True),
    "master_port": (lambda v: _is_int(v) and 0 < v < 65536, True),
    "rank_offset": (lambda v: _is_int(v) and v >= 1, True),
    "world_size": (lambda v: _is_int(v) and v >= 2, True),
    "group_name": (lambda v: isinstance(v, str) and v != "", False),
    "backend": (lambda v: v in ("gloo", "nccl"), False),
}
DESTROY_GROUP = {"group_name": (lambda v: isinstance(v, str), False)}
DISTRIBUTED = {
    "names": (_str_list, True),
    "dtypes": (_str_list, True),
    "shapes": (_list_of(_int_list), True),
    "group_name": (lambda v: isinstance(v, str), False),
    "flush_cache": (_bool, False),
    "weight_version": (_opt_str, False),
    "load_format": (_opt_str, False),
    "abort_all_requests": (_bool, False),
}
DISK = {
    "model_path": (lambda v: isinstance(v, str), True),
    "load_format": (_opt_str, False),
    "weight_version": (_opt_str, False),
    "flush_cache": (_bool, False),
    "abort_all_requests": (_bool, False),
}
MEMORY = {"tags": (lambda v: v is None or (_str_list(v) and set(v) <= MEMORY_TAGS), False)}
ABORT = {"rid": (lambda v: isinstance(v, str), False), "abort_all": (_bool, False)}
PAUSE = {"mode": (lambda v: v in ("abort", "retract", "in_place"), False)}
SESSION = {"selector": (lambda v: v in ("target", "draft", "all"), False)}


class BadRequest(Exception):
    pass


def check_fields(body: Any, spec: dict, where: str, *, unknown_ok: bool = False) -> None:
    """Raise BadRequest unless ``body`` is an object with the required keys and right types;
    unknown keys are refused unless ``unknown_ok`` (then ignored, as msgspec's ``ignore``)."""
    if not isinstance(body, dict):
        raise BadRequest(f"{where}: body must be a JSON object")
    unknown = set(body) - set(spec)
    if unknown and not unknown_ok:
        key = sorted(unknown)[0]  # serde's wording (api_types.py _unknown_field)
        raise BadRequest(f"unknown field `{key}`, expected one of {sorted(spec)}")
    for key, (check, required) in spec.items():
        if key not in body:
            if required:
                raise BadRequest(f"{where}: missing field {key!r}")
        elif not check(body[key]):
            raise BadRequest(f"{where}: bad value for {key!r}: {body[key]!r}")


# -- deterministic generation --------------------------------------------------------------------


def fake_routed_experts(model_path: str, tokens: list[int]) -> str:
    """``meta_info.routed_experts`` for the sequence ``tokens`` (prompt + output), encoded as
    0.5.23 encodes it: rows for every token but the last, a column per decoder layer (zeros on
    dense layers), ``top-k`` distinct experts per MoE layer, a pure function of (token,
    position, layer)."""
    import numpy as np

    cfg = json.loads(Path(model_path, "config.json").read_text())
    layers, k = int(cfg["num_hidden_layers"]), int(cfg["num_experts_per_tok"])
    experts = int(cfg.get("num_experts") or cfg["num_local_experts"])
    dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    out = np.zeros((max(len(tokens) - 1, 0), layers, k), dtype=np.int32)
    for t in range(out.shape[0]):
        for layer in range(layers):
            if layer in dense or (layer + 1) % step:
                continue
            first = (3 * tokens[t] + t + 5 * layer) % experts
            out[t, layer] = [(first + j) % experts for j in range(k)]
    return base64.b64encode(out.tobytes()).decode("utf-8")


def fake_tokens(input_ids: list[int], params: dict,
                length_tail: tuple[float, float] | None = None) -> tuple[list, list, dict, str]:
    """(output_ids, logprobs, finish_reason, text) the fake returns; a pure function of the seed.

    ``length_tail=(mu, sigma)``: the response length is drawn log-normally (a long tail) and
    stop tokens are ignored; else tokens are uniform in [3, 50) until a stop token or string.
    """
    seed = params.get("sampling_seed")
    rng = random.Random(f"{input_ids}|{seed}") if seed is not None else random.Random()
    stops = set(params.get("stop_token_ids", []))
    stop_strs = params.get("stop", [])
    max_new = params.get("max_new_tokens", 128)
    target = None
    if length_tail is not None:
        target = max(1, min(max_new, int(math.exp(rng.gauss(*length_tail)))))
    ids: list[int] = []
    text = ""
    finish = None
    for _ in range(target or max_new):
        tok = rng.randrange(3, 50)
        ids.append(tok)
        text += chr(97 + tok % 26)
        if target is not None:
            continue
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
        finish = ({"type": "stop", "matched": 2} if target is not None and target < max_new
                  else {"type": "length", "length": len(ids)})
    logprobs = [fake_logprob(t, p) for p, t in enumerate(ids)]
    return ids, logprobs, finish, text


def fake_logprob(token: int, pos: int) -> float:
    return -(((token * 31 + pos * 7) % 97) / 50.0) - 0.01


# -- tensor payloads: decoded as SGLang decodes them ----------------------------------------------
#
# ``serialized_named_tensors`` travel as base64 strings. The HTTP layer decodes each one
# (``utils/msgspec_utils.py:12-35`` ``Base64Bytes``: ``b64decode(validate=True)``; an invalid
# string is a validation error, which ``entrypoints/http_server.py:635-678`` answers with 400 and
# an ``ErrorResponse``). The tokenizer manager normalizes the bytes
# (``managers/tokenizer_control_mixin.py:576``, ``utils/common.py:3105-3132``: kept when they
# start like a pickle, else base64-decoded once more where that works). Each TP rank then
# unpickles its own entry (``managers/tp_worker.py:194-201`` ``deserialize_own_rank``) with
# ``MultiprocessingSerializer.deserialize`` (``utils/common.py:3085-3100``): ``SafeUnpickler``
# (``utils/common.py:3144-3371``) resolves only the globals below and refuses any other with
# ``RuntimeError("Blocked unsafe global (module.name) during pickle deserialization")``;
# ``torch.storage._load_from_bytes`` is replaced by a ``torch.load(weights_only=True)`` that must
# yield a storage (``utils/common.py:3135-3141``). The scheduler catches nothing around it
# (``managers/scheduler.py:2224-2259``): the exception reaches ``run_scheduler_process``, which
# logs "Scheduler hit an exception" and SIGQUITs the server (``scheduler.py:6370-6378``), whose
# handler kills the whole process tree (``managers/tokenizer_manager.py:4072-4081``). The request
# gets no answer and the server is gone. The same happens to a payload list shorter than the TP
# size (``serialized_named_tensors[tp_rank]``) and to a bucket without ``flattened_tensor`` or
# ``metadata`` (``model_runner_components/weight_updater.py:383-411``).


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# ``SafeUnpickler.ALLOWED_GLOBALS`` of 0.5.23 (``utils/common.py:3148-3359``), by module.
SAFE_UNPICKLER_ALLOWS: dict[str, frozenset[str]] = {
    "builtins": _names(
        "bool bytearray bytes complex dict float frozenset int list range set slice str tuple"
    ),
    "collections": _names("OrderedDict defaultdict deque Counter"),
    "copyreg": _names("__newobj__ __newobj_ex__"),
    "functools": _names("partial"),
    "itertools": _names("chain repeat"),
    "multiprocessing.reduction": _names("_rebuild_partial _rebuild_socket"),
    "multiprocessing.resource_sharer": _names("DupFd"),
    "types": _names("SimpleNamespace"),
    "_codecs": _names("encode"),
    "torch": _names(
        "Tensor BFloat16Tensor BoolTensor ByteTensor CharTensor DoubleTensor FloatTensor "
        "HalfTensor IntTensor LongTensor ShortTensor Size device dtype bcomplex32 bfloat16 "
        "bit bits16 bits1x8 bits2x4 bits4x2 bits8 bool cdouble cfloat chalf complex128 "
        "complex32 complex64 double float float16 float32 float4_e2m1fn_x2 float64 "
        "float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu half int "
        "int1 int16 int2 int3 int32 int4 int5 int6 int64 int7 int8 long qint32 qint8 quint2x4 "
        "quint4x2 quint8 short uint1 uint16 uint2 uint3 uint32 uint4 uint5 uint6 uint64 uint7 "
        "uint8 UntypedStorage BFloat16Storage BoolStorage ByteStorage CharStorage "
        "ComplexDoubleStorage ComplexFloatStorage DoubleStorage FloatStorage HalfStorage "
        "IntStorage LongStorage QInt32Storage QInt8Storage QUInt2x4Storage QUInt4x2Storage "
        "QUInt8Storage ShortStorage per_tensor_affine per_tensor_symmetric per_channel_affine "
        "per_channel_symmetric per_channel_affine_float_qparams"
    ),
    "torch.cuda": _names(
        "BFloat16Tensor BoolTensor ByteTensor CharTensor DoubleTensor FloatTensor HalfTensor "
        "IntTensor LongTensor ShortTensor BFloat16Storage BoolStorage ByteStorage CharStorage "
        "ComplexDoubleStorage ComplexFloatStorage DoubleStorage FloatStorage HalfStorage "
        "IntStorage LongStorage ShortStorage"
    ),
    "torch.cuda.sparse": _names(
        "BFloat16Tensor ByteTensor CharTensor DoubleTensor FloatTensor HalfTensor IntTensor "
        "LongTensor ShortTensor"
    ),
    "torch.sparse": _names(
        "BFloat16Tensor ByteTensor CharTensor DoubleTensor FloatTensor HalfTensor IntTensor "
        "LongTensor ShortTensor"
    ),
    "torch.nn.parameter": _names("Parameter"),
    "torch.serialization": _names("_get_layout"),
    "torch._utils": _names(
        "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter "
        "_rebuild_parameter_with_state _rebuild_qtensor _rebuild_sparse_tensor "
        "_rebuild_meta_tensor_no_storage _rebuild_wrapper_subclass "
        "_rebuild_device_tensor_from_numpy _rebuild_device_tensor_from_cpu_tensor"
    ),
    "torch._tensor": _names("_rebuild_from_type_v2"),
    "torch.storage": _names("UntypedStorage _UntypedStorage TypedStorage"),
    "torch.multiprocessing.reductions": _names(
        "rebuild_tensor rebuild_meta_tensor rebuild_cuda_tensor rebuild_nested_tensor "
        "rebuild_sparse_coo_tensor rebuild_sparse_compressed_tensor rebuild_storage_fd "
        "rebuild_storage_filename rebuild_storage_empty rebuild_typed_storage "
        "rebuild_typed_storage_child"
    ),
    "sglang.srt.utils.patch_torch": _names(
        "_rebuild_cuda_tensor_modified _rebuild_npu_tensor_modified"
    ),
    "torch_npu.multiprocessing.reductions": _names("rebuild_npu_tensor"),
    "sglang.srt.managers.io_struct": _names("GenerateReqInput EmbeddingReqInput"),
    "sglang.srt.disaggregation.encoder.receiver": _names("EmbeddingData"),
    "sglang.srt.managers.schedule_batch": _names("Modality"),
    "sglang.srt.multimodal.modality": _names("Modality"),
    "sglang.srt.weight_sync.tensor_bucket": _names(
        "FlattenedTensorMetadata FlattenedTensorBucket"
    ),
    "sglang.srt.model_executor.model_runner_components.weight_updater": _names(
        "LocalSerializedTensor"
    ),
    "sglang.srt.model_executor.model_runner": _names("LocalSerializedTensor"),
}


@dataclasses.dataclass
class FlattenedTensorMetadata:
    """SGLang's ``weight_sync/tensor_bucket.py:7-16`` metadata record, under SGLang's module name
    (pickles name it so; SGLang itself cannot be installed without CUDA). Instances pickle
    field-for-field as SGLang's dataclass does."""

    name: str
    shape: Any
    dtype: Any
    start_idx: int
    end_idx: int
    numel: int


SGLANG_METADATA_MODULE = "sglang.srt.weight_sync.tensor_bucket"
FlattenedTensorMetadata.__module__ = SGLANG_METADATA_MODULE
# allowed SGLang globals that the fake can rebuild (it cannot import SGLang for the others)
_SGLANG_STANDINS = {(SGLANG_METADATA_MODULE, "FlattenedTensorMetadata"): FlattenedTensorMetadata}


@contextlib.contextmanager
def sglang_standin():
    """Within: ``import sglang.srt.weight_sync.tensor_bucket`` gives :class:`FlattenedTensorMetadata`
    (unless SGLang is installed), so the client's own serializer runs unchanged in tests."""
    import importlib.util
    import types

    if importlib.util.find_spec("sglang") is not None:
        yield
        return
    parts = SGLANG_METADATA_MODULE.split(".")
    names = [".".join(parts[: k + 1]) for k in range(len(parts))]
    for name in names:
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so the next part imports
        sys.modules[name] = mod
    sys.modules[SGLANG_METADATA_MODULE].FlattenedTensorMetadata = FlattenedTensorMetadata
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _safe_load_torch_storage(data: bytes):
    """``utils/common.py:3135-3141``: the storage helper, through a weights-only load."""
    import io

    import torch

    storage = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"Expected a Torch storage, got {type(storage).__name__}")
    return storage


class _NotModelled(Exception):
    """An allowed SGLang global this fake cannot rebuild (SGLang is not installed)."""


class SafeUnpickler(pickle.Unpickler):
    """``utils/common.py:3144`` ``SafeUnpickler.find_class``, with :data:`SAFE_UNPICKLER_ALLOWS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _safe_load_torch_storage
        if name in SAFE_UNPICKLER_ALLOWS.get(module, ()):
            if module.startswith("sglang."):
                if (module, name) not in _SGLANG_STANDINS:
                    raise _NotModelled(f"{module}.{name}")
                return _SGLANG_STANDINS[(module, name)]
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def _looks_like_pickle(data: bytes) -> bool:
    """``utils/common.py:3105``."""
    return len(data) >= 2 and data[0] == 0x80 and data[1] <= pickle.HIGHEST_PROTOCOL


def normalize_payload(data: bytes) -> bytes:
    """``utils/common.py:3109-3126`` for the bytes the HTTP layer decoded."""
    if _looks_like_pickle(data):
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data


def deserialize_payload(data: bytes) -> Any:
    """``MultiprocessingSerializer.deserialize`` of raw bytes (``utils/common.py:3085-3100``)."""
    import io

    return SafeUnpickler(io.BytesIO(data)).load()


def reconstruct_bucket(obj: Any) -> dict:
    """``weight_updater.py:383-411`` and ``tensor_bucket.py:118-135``: name -> tensor (cloned: the
    fake keeps them after the sender's memory is gone)."""
    flat, metadata = obj["flattened_tensor"], obj["metadata"]
    return {m.name: flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape).clone()
            for m in metadata}


class ServerCrash(Exception):
    """What kills a real server's scheduler (and with it the server): see above."""


# -- state ---------------------------------------------------------------------------------------


class FifoLock:
    """Turns granted strictly in ticket (arrival) order (as asyncio.Lock in ``queueing_call``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0

    def ticket(self) -> int:
        with self._cond:
            self._next += 1
            return self._next - 1

    @contextlib.contextmanager
    def turn(self, ticket: int):
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


class FakeState:
    """What the fake remembers: a request log, weights, version, sessions, groups, faults."""

    def __init__(self, tp_size: int = 1, model_path: str = "", generation: str = "0.5.23",
                 memory_saver: bool = False, routed_experts: bool = False,
                 dump_weights: str = "", **faults: Any):
        if generation not in GENERATIONS:
            raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
        self.generation, self.tp_size, self.model_path = generation, tp_size, model_path
        self.memory_saver = memory_saver
        self.routed_experts = routed_experts  # started with --enable-return-routed-experts
        self.dump_weights = dump_weights  # test-only: every finished update writes the weights here
        self.fp8_model = _is_fp8_checkpoint(model_path)
        self.lock = threading.Lock()  # guards the fields below
        self.control = FifoLock()  # control and weight calls: one at a time, arrival order
        self.cond = threading.Condition(self.lock)
        self.log: list[dict] = []  # method, path, body and "at" (time.monotonic() on arrival)
        self.version = "default"
        self.paused = False
        self.session = False
        self.post_loads = 0
        self.inflight = 0
        self.aborted: set[str] = set()
        self.offload_tags: set[str] = set()
        self.freed: set[str] = set()
        self.weights: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}
        self.tensor_updates: list[list[list[str]]] = []  # per update, per TP rank: names
        self.crashed = ""  # why the scheduler died (the server is gone), as it would log it
        self.arrived: set[str] = set()  # group-name parts seen by ``arrive``
        self.generates = 0
        self.faults = {
            "fail_generate": 0,  # the next N /generate answer 500
            "refuse_begin": 0,  # the next N /begin_weight_update answer 400 (nothing opened)
            "drop_generate": 0,  # the next N /generate close the connection without answering
            "slow_generate": 0,  # the next N /generate sleep slow_s first
            "slow_s": 1.0,
            "generate_delay_s": 0.0,  # every /generate sleeps this long
            "decode_s_per_token": 0.0,  # decode time per generated token
            "length_tail": None,  # (mu, sigma): log-normal response lengths
            "exit_after_generates": 0,  # os._exit when the Kth /generate arrives ...
            "crash_marker": "",  # ... unless this file exists (then crash once and create it)
            "stale_version": False,  # the live weight version reports an old value
            "health_wait_s": 0.2,  # a paused server's health check answers 503 after this
            # the next N health checks answer 503 at once (a health generation that fails)
            "failing_health_checks": 0,
            "update_delay_s": 0.0,  # every weight update takes this long (a large model's load)
            # group-name part -> (other part, seconds): the first call naming part queues only
            # after a call naming other has queued, or after that many seconds (network latency
            # made deterministic for ordering tests)
            "arrival_after": {},
            "collective_timeout_s": 30.0,  # group rendezvous and broadcasts give up after this
        }
        unknown = set(faults) - set(self.faults)
        if unknown:
            raise TypeError(f"unknown fault(s) {sorted(unknown)}")
        self.faults.update(faults)

    def arrive(self, entry: dict) -> int:
        """A control call arrives (see ``arrival_after``): it is logged and gets its ticket for
        ``control`` at once, so the log, the arrival rules and the turns agree on one order."""
        body = entry["body"]
        name = body.get("group_name", "") if isinstance(body, dict) else ""
        rules = self.faults["arrival_after"]
        with self.cond:
            for part, (other, seconds) in rules.items():
                if part in name and part not in self.arrived:
                    self.cond.wait_for(lambda o=other: o in self.arrived, timeout=seconds)
            ticket = self.control.ticket()
            self.log.append(entry)
            self.arrived.update(p for p in rules if p in name)
            self.arrived.update(o for o, _ in rules.values() if o in name)
            self.cond.notify_all()
        return ticket

    def take(self, fault: str) -> bool:
        """Consume one occurrence of a counted fault."""
        with self.lock:
            if self.faults[fault] > 0:
                self.faults[fault] -= 1
                return True
            return False

    def paths(self) -> list[str]:
        return [e["path"] for e in self.log]


def _is_fp8_checkpoint(model_path: str) -> bool:
    cfg = Path(model_path or "/nonexistent") / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "fp8" and bool(q.get("weight_block_size"))


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
            route = ROUTES.get((method, path))
            available = route is not None and self.state.generation in route[1]
            entry = {"method": method, "path": path, "body": body, "at": time.monotonic()}
            if available and route[2]:  # control or weight call: logged with its turn's ticket
                ticket = self.state.arrive(entry)
            elif not path.startswith("/fake/"):
                with self.state.lock:
                    self.state.log.append(entry)
            if not available:
                return self._reply(404, {"detail": "Not Found"})
            fn, _, locked = route
            if self.state.crashed:  # a dead server answers nothing
                return self.drop()
            if locked:
                with self.state.control.turn(ticket):
                    result = fn(self, body)
            else:
                result = fn(self, body)
            if result is not None:
                self._reply(*result)
        except BadRequest as e:
            self._reply(400, {"error": {"message": str(e)}})
        except ServerCrash as e:
            self.crash(str(e))

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

    def crash(self, error: str) -> None:
        """The scheduler died of ``error``: no answer, and the server stops listening."""
        with self.state.lock:
            self.state.crashed = f"Scheduler hit an exception: {error}"
        print(f"protocol fake: {self.state.crashed}; exiting", file=sys.stderr, flush=True)
        self.drop()
        threading.Thread(target=self._stop, daemon=True).start()

    def _stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def drop(self) -> None:
        """Close the connection without an answer, as a crashing server would."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _ok(message: str = "Success") -> tuple[int, dict]:
    return 200, {"success": True, "message": message}


def _fail(message: str) -> tuple[int, dict]:
    return 400, {"success": False, "message": message}


# -- generation ----------------------------------------------------------------------------------


def health(h: _Handler, body: Any):
    st = h.state
    if st.take("failing_health_checks"):
        return 503, ""
    with st.lock:
        paused = st.paused
    if paused:  # the health request waits on the pause like any generate request, then gives up
        time.sleep(st.faults["health_wait_s"])
        with st.lock:
            if st.paused:
                return 503, ""
    return 200, ""


def generate(h: _Handler, body: Any):
    check_fields(body, GENERATE, "/generate", unknown_ok=True)
    params = body["sampling_params"]
    check_fields(params, SAMPLING, "/generate sampling_params")
    st, f = h.state, h.state.faults
    with st.cond:
        st.generates += 1
        k = st.generates
        st.cond.wait_for(lambda: not st.paused)  # new requests wait out a pause
        st.inflight += 1
    try:
        if f["exit_after_generates"] and k >= f["exit_after_generates"]:
            marker = Path(f["crash_marker"])
            if not marker.exists():
                marker.write_text("crashed\n")
                os._exit(17)
        if st.take("fail_generate"):
            return 500, {"error": {"message": "injected server error"}}
        if st.take("drop_generate"):
            return h.drop()
        if st.take("slow_generate"):
            time.sleep(f["slow_s"])
        if f["generate_delay_s"]:
            time.sleep(f["generate_delay_s"])
        outs = [_one_output(st, body, params) for _ in range(params.get("n", 1))]
        return 200, outs[0] if len(outs) == 1 else outs
    finally:
        with st.cond:
            st.inflight -= 1
            st.cond.notify_all()


def _one_output(st: FakeState, body: dict, params: dict) -> dict:
    ids, logprobs, finish, text = fake_tokens(body["input_ids"], params, st.faults["length_tail"])
    rid = body.get("rid", "fake")
    step = st.faults["decode_s_per_token"]
    start = time.monotonic()
    while True:  # decode: token t is done at start + (t + 1) * step; a pause or abort cuts it
        done = min(len(ids), int((time.monotonic() - start) / step)) if step else len(ids)
        with st.lock:
            cut = st.paused or rid in st.aborted
        if cut:
            keep = max(1, done)
            ids, logprobs, text = ids[:keep], logprobs[:keep], text[:keep]
            finish = {"type": "abort", "message": "Abort before/while decoding."}
            break
        if done >= len(ids):
            break
        time.sleep(max(0.0, min(0.005, (done + 1) * step - (time.monotonic() - start))))
    meta = {
        "id": rid,
        "finish_reason": finish,
        "prompt_tokens": len(body["input_ids"]),
        "weight_version": st.version,
        "completion_tokens": len(ids),
        "cached_tokens": 0,
        "e2e_latency": 0.0,
    }
    if body.get("return_logprob"):
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(logprobs, ids, strict=True)]
    if body.get("return_routed_experts") and st.routed_experts:
        meta["routed_experts"] = fake_routed_experts(st.model_path, body["input_ids"] + ids)
    return {"text": text, "output_ids": ids, "meta_info": meta}


def abort(h: _Handler, body: Any):
    check_fields(body or {}, ABORT, "/abort_request", unknown_ok=True)
    if body and body.get("rid"):
        with h.state.lock:
            h.state.aborted.add(body["rid"])
    return 200, ""


# -- information ---------------------------------------------------------------------------------


def _live_version(st: FakeState) -> str:
    return "stale" if st.faults["stale_version"] else st.version


def model_info(h: _Handler, body: Any):
    return 200, {"model_path": h.state.model_path, "is_generation": True,
                 "weight_version": _live_version(h.state)}


def get_weight_version(h: _Handler, body: Any):
    """0.5.4: the live version; 0.5.10-0.5.20: a deprecation 404 (0.5.23: no route at all)."""
    if h.state.generation == "0.5.4":
        return 200, {"weight_version": _live_version(h.state)}
    return 404, {"detail": "Endpoint '/get_weight_version' or '/weight_version' is deprecated. "
                           "Please use '/model_info' instead."}


def server_info(h: _Handler, body: Any):
    st = h.state
    return 200, {"version": st.generation, "tp_size": st.tp_size, "model_path": st.model_path,
                 "weight_version": "default", "enable_memory_saver": st.memory_saver}


# -- control -------------------------------------------------------------------------------------


def flush_cache(h: _Handler, body: Any):
    with h.state.lock:
        busy = h.state.inflight
    if busy:
        return 400, "Flush cache failed: requests are still running or queued.\n"
    return 200, "Cache flushed.\n"


def pause(h: _Handler, body: Any):
    check_fields(body or {}, PAUSE, "/pause_generation", unknown_ok=True)
    st = h.state
    with st.cond:
        st.paused = True
        st.cond.wait_for(lambda: st.inflight == 0)  # in-flight requests end as aborted
    return 200, {"message": "Generation paused successfully.", "status": "ok"}


def resume(h: _Handler, body: Any):
    st = h.state
    with st.cond:
        st.paused = False
        st.cond.notify_all()
    return 200, {"message": "Generation continued successfully.", "status": "ok"}


def release(h: _Handler, body: Any):
    check_fields(body or {}, MEMORY, "/release_memory_occupation", unknown_ok=True)
    st = h.state
    tags = set((body or {}).get("tags") or MEMORY_TAGS)
    with st.lock:
        if st.inflight:
            return 400, {"error": {"message": "release_memory_occupation should be called only "
                                              "when server is idle."}}
        st.offload_tags |= tags
        if st.memory_saver:
            st.freed |= tags
    return 200, ""


def resume_memory(h: _Handler, body: Any):
    check_fields(body or {}, MEMORY, "/resume_memory_occupation", unknown_ok=True)
    st = h.state
    tags = set((body or {}).get("tags") or MEMORY_TAGS)
    with st.lock:
        missing = tags - st.offload_tags
        if missing:
            return 400, {"error": {"message": repr(sorted(missing)[0])}}  # KeyError text
        st.offload_tags -= tags
        st.freed -= tags
    return 200, ""


def begin_update(h: _Handler, body: Any):
    check_fields(body or {}, SESSION, "/begin_weight_update", unknown_ok=True)
    st = h.state
    if st.session:
        return _fail("a weight-update session is already open; call end_weight_update() first")
    if st.take("refuse_begin"):
        return _fail("injected: weight update refused")
    st.session = True
    return _ok()


def end_update(h: _Handler, body: Any):
    st = h.state
    if not st.session:
        return _fail("no weight-update session is open; call begin_weight_update() first")
    st.session = False
    st.post_loads += 1
    _dump(st)
    return _ok()


def _dump(st: FakeState) -> None:
    """Test-only (not SGLang): write every weight the fake holds, under the names it received
    them by, to ``dump_weights`` (safetensors, replaced atomically) after a finished update."""
    if not st.dump_weights:
        return
    from safetensors.torch import save_file

    tmp = st.dump_weights + ".tmp"
    save_file({n: t.detach().contiguous().clone() for n, t in st.weights.items()}, tmp)
    os.replace(tmp, st.dump_weights)


def _check_session(st: FakeState, route: str) -> None:
    if st.generation == "0.5.23" and not st.session:
        raise BadRequest(f"{route} must run between begin_weight_update() and "
                         "end_weight_update()")


def _accept(st: FakeState, tensors: dict) -> None:
    scales = [n for n in tensors if n.endswith("_scale_inv")]
    if scales and not st.fp8_model:
        raise BadRequest(f"parameter {scales[0]!r} does not exist: the model was not loaded "
                         "from a blockwise-FP8 checkpoint")
    st.weights.update(tensors)


def _updated(st: FakeState, body: dict):
    time.sleep(st.faults["update_delay_s"])
    if body.get("weight_version") is not None:
        st.version = body["weight_version"]
    return _ok("Succeeded to update model weights.")


def _validation_error(message: str) -> tuple[int, dict]:
    """A request-validation failure: ``http_server.py:635-678`` answers 400 ``ErrorResponse``."""
    return 400, {"object": "error", "message": message, "type": "Bad Request", "param": None,
                 "code": 400}


def from_tensor(h: _Handler, body: Any):
    check_fields(body, TENSOR, "/update_weights_from_tensor", unknown_ok=True)
    st = h.state
    raw = []
    for k, text in enumerate(body["serialized_named_tensors"]):  # the HTTP layer: Base64Bytes
        try:
            raw.append(base64.b64decode(text, validate=True))
        except binascii.Error:
            return _validation_error(f"1 validation error: serialized_named_tensors.{k}: Value "
                                     "error, Expected base64-encoded bytes")
    raw = [normalize_payload(b) for b in raw]  # the tokenizer manager
    _check_session(st, "update_weights_from_tensor")  # the scheduler
    if body.get("load_format") != "flattened_bucket":
        raise BadRequest("protocol fake only decodes load_format='flattened_bucket'")
    per_rank = []
    for rank in range(st.tp_size):  # each TP rank deserializes its own entry
        try:
            if rank >= len(raw):
                raise IndexError("list index out of range")
            per_rank.append(reconstruct_bucket(deserialize_payload(raw[rank])))
        except _NotModelled as e:
            raise BadRequest(f"protocol fake cannot rebuild SGLang's {e} (allowed there)") from e
        except Exception as e:  # noqa: BLE001 - what kills the real scheduler
            raise ServerCrash(f"{type(e).__name__}: {e}") from e
    st.tensor_updates.append([sorted(t) for t in per_rank])
    _accept(st, per_rank[0])
    return _updated(st, body)


def init_group(h: _Handler, body: Any):
    check_fields(body, INIT_GROUP, "/init_weights_update_group", unknown_ok=True)
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
    if name in st.groups:  # torch: "The specified group name has already been created"
        return _fail(f"Failed to initialize custom process group: The specified group name "
                     f"{name} has already been created, please use a different group name.")
    timeout = datetime.timedelta(seconds=st.faults["collective_timeout_s"])
    url = f"tcp://{body['master_address']}:{body['master_port']}"
    try:
        store, rank, world = next(rendezvous(url, body["rank_offset"], body["world_size"],
                                             timeout=timeout))
        pg, _ = _new_process_group_helper(world, rank, [], Backend("gloo"),
                                          PrefixStore(name, store), group_name=name,
                                          timeout=timeout)
    except Exception as e:
        return _fail(f"Failed to initialize custom process group: {e}.")
    st.groups[name] = (pg, store)
    return _ok("Succeeded to initialize custom process group.")


def destroy_group(h: _Handler, body: Any):
    check_fields(body or {}, DESTROY_GROUP, "/destroy_weights_update_group", unknown_ok=True)
    import torch.distributed as dist

    st = h.state
    name = (body or {}).get("group_name", "weight_update_group")
    if name not in st.groups:
        return _fail("The group to be destroyed does not exist.")
    pg, _ = st.groups.pop(name)
    dist.destroy_process_group(pg)
    return _ok("Succeeded to destroy custom process group.")


def from_distributed(h: _Handler, body: Any):
    check_fields(body, DISTRIBUTED, "/update_weights_from_distributed", unknown_ok=True)
    import torch
    import torch.distributed as dist

    st = h.state
    _check_session(st, "update_weights_from_distributed")
    names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest("names, dtypes and shapes differ in length")
    name = body.get("group_name", "weight_update_group")
    if name not in st.groups:
        return _fail(f"Failed to receive weights: no weight update group {name!r}")
    pg = st.groups[name][0]
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    received = {}
    try:
        for n, d, s in zip(names, dtypes, shapes, strict=True):
            if not isinstance(getattr(torch, d, None), torch.dtype):
                raise BadRequest(f"unknown dtype {d!r}")
            t = torch.empty(s, dtype=getattr(torch, d))
            pg.broadcast([t], opts).wait()
            received[n] = t
    except RuntimeError as e:
        return _fail(f"Failed to receive weights: {e}")
    _accept(st, received)
    return _updated(st, body)


def from_disk(h: _Handler, body: Any):
    check_fields(body, DISK, "/update_weights_from_disk", unknown_ok=True)
    from safetensors.torch import load_file

    folder = Path(body["model_path"])
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return _fail(f"{folder}: no safetensors index")
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        part = load_file(str(folder / shard))
        if set(part) != {n for n, f in weight_map.items() if f == shard}:
            return _fail(f"{shard}: index disagrees with file")
        tensors.update(part)
    _accept(h.state, tensors)
    if not h.state.session:
        _dump(h.state)  # no session closes a disk update
    return _updated(h.state, body)


def fake_log(h: _Handler, body: Any):
    return 200, {"log": h.state.log, "generates": h.state.generates}


def fake_weights(h: _Handler, body: Any):
    return 200, {
        n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "values": t.float().flatten().tolist()}
        for n, t in h.state.weights.items()
    }


ALL, NEW, MID_NEW = set(GENERATIONS), {"0.5.23"}, {"0.5.23", "0.5.15"}
# (method, path) -> (handler, generations that route it, runs under the control lock)
ROUTES = {
    ("GET", "/health_generate"): (health, ALL, False),
    ("GET", "/health"): (health, ALL, False),
    ("POST", "/generate"): (generate, ALL, False),
    ("POST", "/abort_request"): (abort, ALL, False),
    ("GET", "/model_info"): (model_info, MID_NEW, False),
    ("GET", "/get_model_info"): (model_info, ALL, False),
    ("GET", "/get_weight_version"): (get_weight_version, {"0.5.15", "0.5.4"}, False),
    ("GET", "/weight_version"): (get_weight_version, {"0.5.15"}, False),
    ("GET", "/server_info"): (server_info, MID_NEW, True),
    ("GET", "/get_server_info"): (server_info, ALL, True),
    ("GET", "/flush_cache"): (flush_cache, ALL, True),
    ("POST", "/flush_cache"): (flush_cache, ALL, True),
    ("POST", "/pause_generation"): (pause, ALL, True),
    ("POST", "/continue_generation"): (resume, ALL, True),
    ("POST", "/release_memory_occupation"): (release, ALL, True),
    ("POST", "/resume_memory_occupation"): (resume_memory, ALL, True),
    ("POST", "/begin_weight_update"): (begin_update, NEW, True),
    ("POST", "/end_weight_update"): (end_update, NEW, True),
    ("POST", "/update_weights_from_tensor"): (from_tensor, ALL, True),
    ("POST", "/init_weights_update_group"): (init_group, ALL, True),
    ("POST", "/destroy_weights_update_group"): (destroy_group, ALL, True),
    ("POST", "/update_weights_from_distributed"): (from_distributed, ALL, True),
    ("POST", "/update_weights_from_disk"): (from_disk, ALL, True),
    ("GET", "/fake/log"): (fake_log, ALL, False),  # test-only introspection, not SGLang
    ("GET", "/fake/weights"): (fake_weights, ALL, False),
}


class FakeSGLangServer:
    """The protocol fake on a background thread (``with FakeSGLangServer() as fake: fake.url``).

    In-process fakes share torch's group-name registry; fakes that join update groups with the
    same name must run as processes (as SGLang servers do): ``python sglang_fake_server.py``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tp_size: int = 1,
                 model_path: str = "", generation: str = "0.5.23", memory_saver: bool = False,
                 routed_experts: bool = False, dump_weights: str = "", **faults: Any):
        self.state = FakeState(tp_size, model_path, generation, memory_saver, routed_experts,
                               dump_weights,
                               **faults)
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


def _arrival_rules(items: list[str]) -> dict[str, tuple[str, float]]:
    out = {}
    for item in items:
        part, other, seconds = item.split(":")
        out[part] = (other, float(seconds))
    return out


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
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--enable-return-routed-experts", action="store_true")
    p.add_argument("--fake-generation", default="0.5.23", choices=GENERATIONS)
    p.add_argument("--fake-generate-delay", type=float, default=0.0)
    p.add_argument("--fake-decode-s-per-token", type=float, default=0.0)
    p.add_argument("--fake-exit-after-generates", type=int, default=0)
    p.add_argument("--fake-crash-marker", default="")
    p.add_argument("--fake-collective-timeout", type=float, default=30.0)
    p.add_argument("--fake-dump-weights", default="",
                   help="after each finished weight update, write the weights to this "
                        "safetensors file (test introspection)")
    p.add_argument("--fake-arrival-after", action="append", default=[],
                   help="PART:OTHER:SECONDS, the first call whose group name has PART queues "
                        "after one naming OTHER (or after SECONDS)")
    a = p.parse_args(argv)
    inherited = sorted(k for k in os.environ if k.startswith("TORCHELASTIC_"))
    if inherited:  # stands in for SGLang's broken process-group start-up under torchrun
        sys.exit(f"protocol fake: inherited torchrun variables {inherited}; "
                 "torch's env:// rendezvous would use the trainer's agent store")
    if not Path(a.model_path, "config.json").is_file():
        sys.exit(f"protocol fake: model path {a.model_path} has no config.json")
    server = FakeSGLangServer(a.host, a.port, a.tp_size, a.model_path, a.fake_generation,
                              a.enable_memory_saver,
                              routed_experts=a.enable_return_routed_experts,
                              dump_weights=a.fake_dump_weights,
                              generate_delay_s=a.fake_generate_delay,
                              decode_s_per_token=a.fake_decode_s_per_token,
                              exit_after_generates=a.fake_exit_after_generates,
                              crash_marker=a.fake_crash_marker,
                              arrival_after=_arrival_rules(a.fake_arrival_after),
                              collective_timeout_s=a.fake_collective_timeout)
    print(f"protocol fake ({a.fake_generation}) listening on {server.url}", flush=True)
    server.httpd.serve_forever()
    if server.state.crashed:  # as SGLang's SIGQUIT handler ends the process tree
        sys.exit(f"protocol fake: {server.state.crashed}")


if __name__ == "__main__":
    main()
