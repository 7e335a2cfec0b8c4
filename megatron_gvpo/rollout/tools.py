"""OpenAI-style function tools as a ``rollout.env`` environment: Python functions the model
calls in its chat template's tool-call format, their results returned as the next observation.

    class Search(FunctionToolEnv):
        tools = [lookup, add]             # plain functions; keyword arguments from the call
        tool_format = "qwen3"             # or "llama3"

        def answer_reward(self, action):  # the turn without a tool call ends the trajectory
            return float(self.row["answer"] in action)

Run it with ``rollout.env=my_tools.py:Search rollout.env_observation_role=tool`` (results then
go back as tool messages through the chat template) and ``rollout.turn_stop`` set to the end of
a call where the format has one (``</tool_call>`` for Qwen3). Formats parsed:

- ``qwen3`` (Hermes style, Qwen2.5 and Qwen3 chat templates): one or more
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks;
- ``llama3`` (Llama 3.1+ JSON tool calling): a JSON object ``{"name": ..., "parameters": {...}}``
  (``arguments`` also accepted), optionally after ``<|python_tag|>``; several separated by ``;``.

A call to an unknown tool, with bad arguments, or that raises returns an error text to the model
(its mistake is part of the trajectory, not an environment failure). ``tool_schema`` gives a
function's OpenAI-style schema for the prompt (``apply_chat_template(..., tools=[...])``).
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

TOOL_FORMATS = ("qwen3", "llama3")
_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
               dict: "object"}


@dataclass
class ToolCall:
    """One parsed call: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any]


def _as_call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some templates carry the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _json_objects(text: str) -> list[Any]:
    """Every top-level JSON object in ``text``, left to right."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        out.append(obj)
        i = end
    return out


def parse_tool_calls(text: str, tool_format: str) -> list[ToolCall]:
    """The tool calls in a model turn (empty: the turn calls no tool)."""
    if tool_format == "qwen3":
        blocks = _QWEN_CALL.findall(text)
        if not blocks and "<tool_call>" in text:  # cut by rollout.turn_stop before the closing tag
            blocks = [text.split("<tool_call>", 1)[1]]
        objs = [o for b in blocks for o in _json_objects(b)[:1]]
    elif tool_format == "llama3":
        objs = _json_objects(text.replace("<|python_tag|>", ""))
    else:
        raise ValueError(f"tool_format={tool_format!r}: {', '.join(TOOL_FORMATS)}")
    return [c for c in map(_as_call, objs) if c is not None]


def tool_schema(fn: Callable) -> dict:
    """The OpenAI-style ``{"type": "function", "function": {...}}`` schema of ``fn``: its name,
    the first paragraph of its docstring, and its parameters typed from their annotations."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)  # string annotations (``from __future__``) resolved
    except Exception:  # an annotation that does not resolve: leave those parameters untyped
        hints = {}
    props, required = {}, []
    for name, p in sig.parameters.items():
        kind = hints.get(name)
        props[name] = {"type": _JSON_TYPES.get(kind, "string")} if kind is not None else {}
        if p.default is inspect.Parameter.empty:
            required.append(name)
    doc = inspect.getdoc(fn) or ""
    return {
        "type": "function",
        "function": {
            "name": fn.__name__,
            "description": doc.split("\n\n", 1)[0].replace("\n", " "),
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }


class FunctionToolEnv:
    """An environment of Python functions (``tools``) called in ``tool_format``; subclass it,
    set both, and override :meth:`answer_reward` (or score the answer with ``reward.rewards``)."""

    tools: ClassVar[Sequence[Callable]] = ()
    tool_format: ClassVar[str] = "qwen3"

    def __init__(self, row: dict):
        self.row = row
        self.calls = 0
        self._by_name = {fn.__name__: fn for fn in self.tools}

    def reset(self) -> str | None:
        return None

    def answer_reward(self, action: str) -> float:
        """The reward of the turn that calls no tool (the answer); default 0."""
        return 0.0

    def step(self, action: str) -> tuple[str | None, float, bool]:
        calls = parse_tool_calls(action, self.tool_format)
        if not calls:
            return None, float(self.answer_reward(action)), True
        self.calls += len(calls)
        return "\n".join(self._run(c) for c in calls), 0.0, False

    def _run(self, call: ToolCall) -> str:
        fn = self._by_name.get(call.name)
        if fn is None:
            return f"error: unknown tool {call.name!r} (tools: {', '.join(self._by_name)})"
        try:
            result = fn(**call.arguments)
        except Exception as e:  # the model's bad call: it reads the error, the run goes on
            return f"error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result)
