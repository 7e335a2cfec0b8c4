"""SGLang rollout backend: server processes, an HTTP client, streaming generation, weight sync.

Where things are:

- ``config.py``  ``SGLangConfig`` (every field documented)
- ``client.py``  HTTP, retries, and which routes a server release offers
- ``server.py``  starting/stopping server processes (flags, clean environment, health);
  ``watchdog.py`` kills a server whose trainer died without stopping it
- ``pool.py``    the engine's servers: picking one per request, restarting dead ones
- ``generate.py`` ``/generate`` bodies, parsing, streaming jobs
- ``engine.py``  ``SGLangEngine``: generation plus the begin/finish steps of every weight sync
- where weights enter SGLang: ``tensor.py`` (colocated, CUDA IPC), ``distributed.py``
  (update-group broadcast), ``disk.py`` (safetensors folder); ``group.py`` is the update group
  they share with ``stages.py`` (pipeline stages feeding the servers in turn)

Nothing from ``sglang`` is imported except, lazily, its tensor serializer for the colocated path.
SGLang cannot run without CUDA: the client is checked against the released source of 0.5.4,
0.5.10, 0.5.15, 0.5.20, 0.5.22 and 0.5.23 and tested against a protocol fake written from it
(``tests/sglang_fake_server.py``), never against a live server.
"""

from megatron_gvpo.rollout.sglang.client import SGLangError
from megatron_gvpo.rollout.sglang.config import SGLangConfig, WeightSync
from megatron_gvpo.rollout.sglang.engine import SGLangEngine
from megatron_gvpo.rollout.sglang.generate import RouteLayout, parse_generate_output
from megatron_gvpo.rollout.sglang.stages import StageSyncSpec, StageTurns, StageWeightSender
from megatron_gvpo.rollout.sglang.tensor import (
    FlatTensorMeta,
    Serializer,
    flatten_bucket,
    sglang_flattened_bucket_serializer,
    unflatten_bucket,
)

__all__ = [
    "FlatTensorMeta",
    "RouteLayout",
    "SGLangConfig",
    "SGLangEngine",
    "SGLangError",
    "Serializer",
    "StageSyncSpec",
    "StageTurns",
    "StageWeightSender",
    "WeightSync",
    "flatten_bucket",
    "parse_generate_output",
    "sglang_flattened_bucket_serializer",
    "unflatten_bucket",
]
