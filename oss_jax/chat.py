"""The harmony chat format, offline: render a conversation to prompt ids, parse completion ids back into channels.

A thin layer over `openai-harmony`. Its vocabulary file is never downloaded: `encoding()` points
TIKTOKEN_ENCODINGS_BASE at an `o200k_base.tiktoken` derived from a checkpoint's tokenizer.json or from toktok-rs.

Messages are dicts: {"role": "user" | "assistant" | "tool", "content": str or JSON-able, "channel", "recipient",
"content_type", "name"} (all but role and content optional). Assistant messages default to the final channel, or to
commentary when they have a recipient (a tool call); tool results need "name" (e.g. "functions.get_weather").
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

from oss_jax.tokenizer import O200K_BASE_FILE, harmony_vocab_dir, write_o200k_base

VOCAB_ENV = "TIKTOKEN_ENCODINGS_BASE"
REASONING = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
JSON_CONTENT = "<|constrain|>json"


@functools.cache
def _load(vocab_dir: str) -> HarmonyEncoding:
    """harmony's gpt-oss encoding with its vocab read from `vocab_dir`."""
    os.environ[VOCAB_ENV] = vocab_dir
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def encoding(ckpt_dir: str | Path | None = None) -> HarmonyEncoding:
    """harmony's encoding, offline; vocab from `ckpt_dir`'s tokenizer.json, else $TIKTOKEN_ENCODINGS_BASE or toktok."""
    if ckpt_dir is not None:
        return _load(str(harmony_vocab_dir(ckpt_dir)))
    env = os.environ.get(VOCAB_ENV)
    if env and (Path(env) / O200K_BASE_FILE).is_file():
        return _load(env)
    return _load(str(write_o200k_base()))


def stop_token_ids() -> list[int]:
    """Ids that end an assistant turn, sorted: <|return|> 200002 (final answer) and <|call|> 200012 (tool call)."""
    return sorted(encoding().stop_tokens_for_assistant_actions())


def _text(content: Any) -> str:
    """Message content as text: strings as they are, anything else as JSON."""
    return content if isinstance(content, str) else json.dumps(content)


def to_message(m: dict[str, Any] | Message) -> Message:
    """A message dict (see the module docstring) -> a harmony Message."""
    if isinstance(m, Message):
        return m
    role = Role(m["role"])
    author = Author(role=role, name=m.get("name"))
    if role == Role.TOOL and not author.name:
        raise ValueError(f"a tool message needs the tool's name, e.g. 'functions.get_weather': {m}")
    msg = Message.from_author_and_content(author, _text(m["content"]))
    recipient = m.get("recipient") or ("assistant" if role == Role.TOOL else None)
    channel = m.get("channel")
    if channel is None and role in (Role.ASSISTANT, Role.TOOL):
        channel = "commentary" if recipient else "final"
    content_type = m.get("content_type")
    if content_type is None and role == Role.ASSISTANT and recipient and not isinstance(m["content"], str):
        content_type = JSON_CONTENT
    msg.channel, msg.recipient, msg.content_type = channel, recipient, content_type
    return msg


def to_tool(tool: dict[str, Any]) -> ToolDescription:
    """{"name", "description", "parameters": JSON schema} (or OpenAI's {"type": "function", "function": ...})."""
    spec = tool.get("function", tool)
    return ToolDescription.new(spec["name"], spec.get("description", ""), parameters=spec.get("parameters"))


def header_messages(reasoning: str = "medium", developer: str | None = None,
                    tools: Sequence[dict[str, Any]] | None = None) -> list[Message]:
    """The system message (reasoning effort) and, with instructions or function tools, the developer message."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {sorted(REASONING)}, got {reasoning!r}")
    system = SystemContent.new().with_reasoning_effort(REASONING[reasoning])
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    if developer or tools:
        dev = DeveloperContent.new()
        if developer:
            dev = dev.with_instructions(developer)
        if tools:
            dev = dev.with_function_tools([to_tool(t) for t in tools])
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    return out


def render_conversation(messages: Sequence[dict[str, Any] | Message], reasoning: str = "medium",
                        developer: str | None = None, tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """Prompt ids: system + developer + `messages`, ending with `<|start|>assistant` for the model to complete."""
    return completion_ids(Conversation.from_messages(header_messages(reasoning, developer, tools) +
                                                     [to_message(m) for m in messages]))


def completion_ids(conversation: Conversation) -> list[int]:
    """Prompt ids of a whole harmony Conversation, ending with `<|start|>assistant` (earlier turns' analysis
    dropped by harmony)."""
    return list(encoding().render_conversation_for_completion(conversation, Role.ASSISTANT))


def message_dict(m: Message) -> dict[str, Any]:
    """A harmony Message -> {"role", "channel", "recipient", "content_type", "content"} with text content."""
    return {"role": m.author.role.value, "name": m.author.name, "channel": m.channel, "recipient": m.recipient,
            "content_type": m.content_type, "content": "".join(getattr(c, "text", "") for c in m.content)}


def _tool_call(m: dict[str, Any]) -> dict[str, Any]:
    """An assistant message to a tool -> {"recipient", "name", "arguments" (parsed JSON when it parses), ...}."""
    try:
        arguments = json.loads(m["content"])
    except json.JSONDecodeError:
        arguments = m["content"]
    return {"recipient": m["recipient"], "name": m["recipient"].rpartition(".")[2], "arguments": arguments,
            "channel": m["channel"], "content_type": m["content_type"]}


def parse_completion(tokens: Sequence[int], *, strict: bool = False) -> dict[str, Any]:
    """Ids the model generated after the prompt -> {"analysis", "commentary", "tool_calls", "final", "messages"}."""
    parsed = encoding().parse_messages_from_completion_tokens(list(tokens), Role.ASSISTANT, strict=strict)
    messages = [message_dict(m) for m in parsed]
    texts = {ch: [m["content"] for m in messages if m["channel"] == ch and not m["recipient"]]
             for ch in ("analysis", "commentary", "final")}
    return {"analysis": "\n".join(texts["analysis"]), "commentary": "\n".join(texts["commentary"]),
            "tool_calls": [_tool_call(m) for m in messages if m["recipient"] and m["role"] == "assistant"],
            "final": "\n".join(texts["final"]) if texts["final"] else None, "messages": messages}
