"""The one tokenizer loader of the data pipeline, the rollout engines and the rewards.

``model.path`` is an HF folder or a converted Megatron checkpoint, whose tokenizer files live in
its ``hf/`` folder. A fast tokenizer saved from ``tokenizers`` (class ``PreTrainedTokenizerFast``;
transformers 5 writes ``TokenizersBackend``) is loaded as exactly that: ``AutoTokenizer`` would
pick the class of the config's ``model_type`` (``Qwen2Tokenizer`` rebuilds the pre-tokenizer and
drops spaces). ``trust_remote_code`` is always passed: ``False`` never prompts and never imports
a folder's ``auto_map`` module.
"""

from __future__ import annotations

import json
from pathlib import Path

# Classes that are "the tokenizer.json as saved", under transformers 4 and 5 names.
_FAST_AS_SAVED = ("PreTrainedTokenizerFast", "TokenizersBackend")
CHECKPOINT_META = "megatron_gvpo.json"  # marks a converted checkpoint (bridge/checkpoint.py)


def hf_dir(path: str | Path) -> Path:
    """The HF folder of ``path``: itself, or ``path/hf`` for a converted Megatron checkpoint."""
    path = Path(path)
    return path / "hf" if (path / CHECKPOINT_META).is_file() else path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of an HF folder or converted checkpoint (see the module docstring)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = hf_dir(path)
    cfg_file = folder / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    remote = isinstance(cfg.get("auto_map"), dict) and bool(cfg["auto_map"])
    if remote and not trust_remote_code:
        if cfg.get("tokenizer_class") in _FAST_AS_SAVED and (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        raise ValueError(
            f"{cfg_file} names custom tokenizer code (auto_map: {cfg['auto_map']}); it is not run "
            "unless model.trust_remote_code=true"
        )
    if cfg.get("tokenizer_class") in _FAST_AS_SAVED and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    if not any(folder.glob("tokenizer*")) and not (folder / "vocab.json").is_file():
        raise FileNotFoundError(
            f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)"
            + (" in the converted checkpoint's hf/ folder" if folder != Path(path) else "")
        )
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
