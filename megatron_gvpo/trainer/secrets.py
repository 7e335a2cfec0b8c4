"""Keep credentials given in the config (reward kwargs: ``headers``, ``api_key``, tokens) out of
what a run writes or prints: Hydra's ``<run_dir>/hydra/*.yaml``, every checkpoint's saved config,
``train.log`` and the console (the error report of a failed run included).

Values under a key that looks secret are replaced by ``***`` (all values of ``headers``); in any
string, a URL's user information (``https://user:pass@host``) and the values of secret-looking
query parameters (``?token=...``, ``&api_key=...``) are too. The running job still gets the real
values; better still, pass them as ``${oc.env:VAR}``, which Hydra stores unresolved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

REDACTED = "***"
# api_key, x-api-key, Authorization, password, client_secret, cookie, credentials, hf_token,
# access_token (not max_new_tokens or stop_token_ids: "token" must end the key); access_key,
# openai_key, private_key, ... (a key ending in "key" after a credential word, not data.answer_key
# or prompt_key); auth, x-auth, basic_auth; signature, sig.
_SECRET_KEY = re.compile(
    r"(api[-_]?key|authorization|password|passwd|secret|cookie|credential|(^|[-_])token$"
    r"|(^|[-_])(access|private|openai|anthropic|hf|aws|session|signing|encryption|master)"
    r"[-_]?key$|(^|[-_])auth$|(^|[-_])(signature|sig)$)",
    re.IGNORECASE,
)
# scheme://user:password@host -> scheme://***@host
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
# ?token=abc / &api_key=abc (a secret-looking name), up to the next & # or whitespace
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<key>[\w.-]+)=(?P<value>[^&#\s'\",}\]]*)")
_HEADERS = re.compile(r"^headers$", re.IGNORECASE)
# In override strings: `key: value` / `key=value` up to the next , } ] (not a nested {...}/[...]).
_PAIR = re.compile(
    r"(?P<key>[\w.-]+)(?P<sep>\s*[:=]\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s,}\]\[{][^,}\]\n]*)"
)
_HEADERS_BLOCK = re.compile(r"(?P<key>headers)(?P<sep>\s*[:=]\s*)\{[^}]*\}", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """True for keys whose values are credentials (``api_key``, ``Authorization``, ...)."""
    return bool(_SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, scalars) with secret values replaced by ``***``."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if _HEADERS.match(str(k)) and isinstance(v, dict):
                out[k] = {hk: REDACTED for hk in v}
            elif is_secret_key(k) and v is not None and not isinstance(v, (dict, list)):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(x) for x in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_url(text: str) -> str:
    """URL user information and secret-looking query parameter values replaced by ``***``."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_PARAM.sub(
        lambda m: f"{m['lead']}{m['key']}={REDACTED}" if is_secret_key(m["key"]) else m[0], text
    )


def redact_text(text: str) -> str:
    """``key: value`` pairs with a secret key, ``headers: {...}``, URL user information and
    secret query parameters, redacted in free text (Hydra's override strings such as
    ``reward.rewards=[{..., api_key: abc}]``, log lines, error reports)."""
    text = _HEADERS_BLOCK.sub(lambda m: f"{m['key']}{m['sep']}{{{REDACTED}}}", text)
    text = redact_url(text)
    return _PAIR.sub(
        lambda m: f"{m['key']}{m['sep']}{REDACTED}" if is_secret_key(m["key"]) else m[0], text
    )


def redact_hydra_dir(hydra_dir: str | Path) -> None:
    """Rewrite Hydra's saved ``config.yaml``, ``overrides.yaml`` and ``hydra.yaml`` redacted."""
    import yaml

    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        path = Path(hydra_dir) / name
        if not path.is_file():
            continue
        data = redact(yaml.safe_load(path.read_text()))
        tmp = path.with_suffix(f".yaml.{os.getpid()}.tmp")  # every rank rewrites the same files
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(path)
