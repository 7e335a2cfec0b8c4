"""Load a tokenizer from an HF folder the way the data pipeline expects."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(path: str | Path):
    """``PreTrainedTokenizerFast`` when the folder names that class (our char tokenizer: a
    qwen2-typed config would make ``AutoTokenizer`` rebuild it and drop spaces), else
    ``AutoTokenizer``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = Path(path, "tokenizer_config.json")
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if cfg.get("tokenizer_class") == "PreTrainedTokenizerFast":
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))
