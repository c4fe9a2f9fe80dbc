"""Training data: JSONL harmony conversations or plain text -> token examples with loss masks -> packed batches.

A `.jsonl` line is `{"messages": [...], "tools": [...] (optional)}` or `{"text": "..."}`; other keys are ignored and
blank lines skipped. Messages are `oss_jax.chat` message dicts with role system | developer | user | assistant | tool;
a leading system or developer message becomes the developer instructions (as the gpt-oss chat template does), an
assistant message's `"thinking"` becomes an analysis message before it. Conversations are rendered with harmony's
training rendering (the last assistant message ends with `<|return|>`) without dropping analysis messages: the file
decides which chains of thought are trained. A `.txt` file holds plain-text documents separated by blank lines.
Plain text is tokenized with the checkpoint's tokenizer.json (special-token strings in it become special tokens) and
ended with `<|endoftext|>`.

`Example.loss_mask[i]` says whether the model is trained to predict `tokens[i]`; `tokens[0]` never is. `Batches`
packs examples greedily, in a seeded order per epoch, into rows of T tokens: an example of n tokens takes n - 1 slots
(inputs `tokens[:-1]`, targets `tokens[1:]`), so load with `max_len = seq_len + 1`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from openai_harmony import Conversation, HarmonyEncoding, HarmonyError, Message, RenderConversationConfig

from oss_jax.chat import encoding, header_messages, to_message
from oss_jax.tokenizer import load_tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
TRAIN_ON = ("assistant", "final", "all")
END_OF_TEXT = 199_999  # <|endoftext|>, also the padding token of packed batches
START, MESSAGE = 200_006, 200_008  # <|start|> opens every harmony message, <|message|> ends its header
MAX_ERRORS = 100  # error messages kept in DataStats (all bad lines are counted)


class DataError(ValueError):
    """A bad data file or line; the message names the file and the 1-based line number."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One training sample: `tokens` int32 [n] and `loss_mask` bool [n] (True where tokens[i] is predicted)."""

    tokens: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        if self.tokens.dtype != np.int32 or self.loss_mask.dtype != np.bool_:
            raise TypeError(f"Example wants int32 tokens and bool loss_mask, got {self.tokens.dtype}, "
                            f"{self.loss_mask.dtype}")
        if self.tokens.ndim != 1 or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(f"Example tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} differ")


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What a file yielded: examples, tokens, trained tokens, skipped lines and (the first 100) skip reasons."""

    examples: int
    tokens: int
    trained: int
    skipped: int
    errors: tuple[str, ...] = ()


# ----------------------------------------------------------------- harmony conversations


def _check_message(i: int, m: Any) -> None:
    """Raise ValueError when message `i` (1-based) is not a well-formed message dict."""
    if not isinstance(m, dict):
        raise ValueError(f"message {i} is not a JSON object")
    if m.get("role") not in ROLES:
        raise ValueError(f"message {i}: unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
    if "content" not in m:
        raise ValueError(f"message {i} ({m['role']}) has no content")
    if m.get("channel") is not None and m["channel"] not in CHANNELS:
        raise ValueError(f"message {i}: unknown channel {m['channel']!r} (expected one of {', '.join(CHANNELS)})")
    if m["role"] == "tool" and not m.get("name"):
        raise ValueError(f"message {i}: a tool message needs the tool's name, e.g. \"name\": \"functions.get_weather\"")
    for key in ("recipient", "name", "content_type", "thinking"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise ValueError(f"message {i}: {key} must be a string")
    if m.get("thinking") is not None and m["role"] != "assistant":
        raise ValueError(f"message {i}: only assistant messages have thinking")
    if m["role"] in ("system", "developer") and (i != 1 or not isinstance(m["content"], str)):
        raise ValueError(f"message {i}: a {m['role']} message must come first and hold text")


def _expand_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant messages with "thinking" -> an analysis message followed by the message itself."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("thinking"):
            out.append({"role": "assistant", "channel": "analysis", "content": m["thinking"]})
        out.append({k: v for k, v in m.items() if k != "thinking"})
    return out


def conversation(record: dict[str, Any], reasoning: str = "medium") -> Conversation:
    """A `{"messages": [...], "tools": [...]}` record -> the harmony Conversation (system + developer headers)."""
    messages, tools = record["messages"], record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    if tools is not None:
        check_tools(tools)
    for i, m in enumerate(messages, 1):
        _check_message(i, m)
    developer = messages[0]["content"] if messages[0]["role"] in ("system", "developer") else None
    body = _expand_thinking(messages[1:] if developer is not None else messages)
    return Conversation.from_messages(header_messages(reasoning, developer, tools) + [to_message(m) for m in body])


def check_tools(tools: Any) -> None:
    """Raise ValueError unless `tools` is a list of function tools harmony can describe (see `chat.to_tool`)."""
    if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of objects")
    try:
        header_messages(tools=tools)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'bad tools ({e!r}); a tool is {{"name", "description", "parameters"}}') from None


def _trained(message: Message, train_on: str) -> bool:
    """Whether a harmony message's content and end token carry loss under `train_on` ("assistant" or "final")."""
    return message.author.role.value == "assistant" and (train_on == "assistant" or message.channel == "final")


def render_conversation(conv: Conversation, enc: HarmonyEncoding, train_on: str) -> Example:
    """Harmony's training rendering of `conv` and its loss mask (trained messages: content + end token)."""
    ids = enc.render_conversation_for_training(conv, RenderConversationConfig(auto_drop_analysis=False))
    tokens = np.asarray(ids, np.int32)
    starts = np.flatnonzero(tokens == START)  # content text never renders as special tokens
    if len(starts) != len(conv.messages) or (len(starts) and starts[0] != 0):
        raise RuntimeError(f"harmony rendered {len(starts)} messages for {len(conv.messages)}")
    mask = np.full(len(tokens), train_on == "all", np.bool_)
    mask[0] = False
    for message, begin, end in zip(conv.messages, starts, [*starts[1:], len(tokens)], strict=True):
        if train_on != "all" and _trained(message, train_on):
            mask[begin + int(np.argmax(tokens[begin:end] == MESSAGE)) + 1: end] = True
    return Example(tokens, mask)


# ----------------------------------------------------------------- plain text and files


def text_example(text: str, tokenizer) -> Example:
    """Plain text -> its ids + <|endoftext|>, every token trained but the first."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    tokens = np.asarray([*ids, END_OF_TEXT], np.int32)
    mask = np.ones(len(tokens), np.bool_)
    mask[0] = False
    return Example(tokens, mask)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON or the ValueError it raised) for each non-blank line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, ValueError(f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")


def _text_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(first line number, {"text": paragraph}) for each blank-line-separated paragraph of a text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    first, para = 0, []
    for lineno, line in enumerate([*lines, ""], 1):
        if line.strip():
            first, para = first or lineno, [*para, line]
        elif para:
            yield first, {"text": "\n".join(para)}
            first, para = 0, []


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(ckpt_dir: str):
    """The checkpoint's HF tokenizer, loaded (~3 s) once per process."""
    return load_tokenizer(ckpt_dir)


class _Encoder:
    """Turns parsed records into Examples; harmony and the HF tokenizer are loaded when first needed."""

    def __init__(self, ckpt_dir: str | Path, train_on: str, reasoning: str):
        self.ckpt_dir, self.train_on, self.reasoning = ckpt_dir, train_on, reasoning
        self._harmony, self._tokenizer = None, None

    def __call__(self, record: Any) -> Example:
        if isinstance(record, ValueError):
            raise record
        if not isinstance(record, dict):
            raise ValueError(f"not a JSON object but {type(record).__name__}")
        if ("messages" in record) == ("text" in record):
            raise ValueError('needs either "messages" (a conversation) or "text"')
        if "messages" in record:
            if self._harmony is None:
                self._harmony = encoding(self.ckpt_dir)
            return render_conversation(conversation(record, self.reasoning), self._harmony, self.train_on)
        if not isinstance(record["text"], str):
            raise ValueError("text must be a string")
        if self._tokenizer is None:
            self._tokenizer = _cached_tokenizer(str(Path(self.ckpt_dir).resolve()))
        return text_example(record["text"], self._tokenizer)


def _check_length(ex: Example, max_len: int) -> None:
    """Raise ValueError for an example over `max_len` tokens or with nothing to train on."""
    if len(ex.tokens) > max_len:
        raise ValueError(f"{len(ex.tokens)} tokens, more than max_len {max_len}")
    if not ex.loss_mask[1:].any():
        raise ValueError("no tokens to train on")


def load_examples(path: str | Path, ckpt_dir: str | Path, *, max_len: int, train_on: str = "assistant",
                  skip_bad: bool = False, reasoning: str = "medium") -> tuple[list[Example], DataStats]:
    """Examples of a .jsonl (conversations / text) or .txt file; bad lines raise DataError or, with skip_bad, count."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    header_messages(reasoning)  # checks `reasoning`
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = _text_records(path) if path.suffix == ".txt" else _jsonl_records(path)
    encode, examples, errors, skipped = _Encoder(ckpt_dir, train_on, reasoning), [], [], 0
    for lineno, record in records:
        try:
            ex = encode(record)
            _check_length(ex, max_len)
        except (ValueError, HarmonyError) as e:
            if not skip_bad:
                raise DataError(f"{path}:{lineno}: {e}") from e
            skipped += 1
            errors += [f"{path}:{lineno}: {e}"][: MAX_ERRORS - len(errors)]
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({skipped} bad lines skipped, first: {errors[0]})"
                                                   if skipped else ""))
    stats = DataStats(len(examples), sum(len(e.tokens) for e in examples),
                      sum(int(e.loss_mask[1:].sum()) for e in examples), skipped, tuple(errors))
    return examples, stats


# ----------------------------------------------------------------- packed batches


class Batches:
    """Infinite iterator of packed [B, T] batches: tokens, targets, loss_mask, positions, segments (see module doc).

    Examples follow a seeded permutation per epoch (`np.random.default_rng((seed, epoch))`); a row takes examples in
    that order while they fit, the next batch continues where this one stopped (across epochs too). `state()` after a
    batch, given back to `restore` or `state=`, makes the following batches those an uninterrupted run would yield.
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, seed: int,
                 state: dict[str, int] | None = None):
        if not examples:
            raise ValueError("Batches needs at least one example")
        if batch_size < 1 or seq_len < 1 or seed < 0:
            raise ValueError(f"batch_size and seq_len must be positive and seed >= 0, got {batch_size}, {seq_len}, "
                             f"{seed}")
        self.examples, self.batch_size, self.seq_len, self.seed = list(examples), batch_size, seq_len, seed
        self.lengths = np.array([len(e.tokens) - 1 for e in self.examples])  # slots each example takes in a row
        bad = np.flatnonzero((self.lengths < 1) | (self.lengths > seq_len))
        if len(bad):
            raise ValueError(f"example {bad[0]} has {self.lengths[bad[0]] + 1} tokens; packing into seq_len "
                             f"{seq_len} needs 2..{seq_len + 1}")
        self.restore(state or {"epoch": 0, "index": 0})

    def state(self) -> dict[str, int]:
        """Where the next batch starts: {"epoch", "index" (position in that epoch's order)}."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.examples):
            raise ValueError(f"data state {state} is out of range for {len(self.examples)} examples")
        self._epoch, self._index = epoch, index
        self._order = np.random.default_rng((self.seed, epoch)).permutation(len(self.examples))

    def _advance(self) -> None:
        """Move past the current example, into the next epoch's order after the last."""
        if self._index + 1 < len(self.examples):
            self._index += 1
        else:
            self.restore({"epoch": self._epoch + 1, "index": 0})

    def _fill_row(self, out: dict[str, np.ndarray], b: int) -> None:
        """Pack examples into row `b` while the next one fits."""
        used, segment = 0, 0
        while used + (n := int(self.lengths[i := self._order[self._index]])) <= self.seq_len:
            ex, row = self.examples[i], slice(used, used + n)
            segment += 1
            out["tokens"][b, row], out["targets"][b, row] = ex.tokens[:-1], ex.tokens[1:]
            out["loss_mask"][b, row] = ex.loss_mask[1:]
            out["positions"][b, row], out["segments"][b, row] = np.arange(n), segment
            used += n
            self._advance()

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        shape = (self.batch_size, self.seq_len)
        out = {"tokens": np.full(shape, END_OF_TEXT, np.int32), "targets": np.full(shape, END_OF_TEXT, np.int32),
               "loss_mask": np.zeros(shape, np.float32), "positions": np.full(shape, -1, np.int32),
               "segments": np.zeros(shape, np.int32)}
        for b in range(self.batch_size):
            self._fill_row(out, b)
        return out
