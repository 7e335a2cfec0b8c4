"""torchrun entry: ``megatron_gvpo.train`` for the colocated (tensor) weight sync on CPU.

Run by tests/test_moe.py as ``torchrun --nproc_per_node 2 <this file> <hydra overrides>``. The
client's own serializer (``rollout/sglang/tensor.py``) imports SGLang's
``FlattenedTensorMetadata``, which cannot be installed without CUDA: the protocol fake's
stand-in (``tests/sglang_fake_server.py``, the same dataclass under SGLang's module name) is
importable for the whole run. CPU tensors pickle through torch's shared-memory reductions; the
fake is a separate, unrelated process, so storages travel by shared-memory file name (torch's
``file_system`` strategy) instead of by file descriptors, which only related processes can pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the protocol fake

import torch.multiprocessing as mp  # noqa: E402
from sglang_fake_server import sglang_standin  # noqa: E402

from megatron_gvpo.train import main  # noqa: E402

if __name__ == "__main__":
    mp.set_sharing_strategy("file_system")
    with sglang_standin():
        main()
