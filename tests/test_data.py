"""Training data: harmony rendering and loss masks against openai-harmony, plain text, bad lines, packing, resume."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from oss_jax.chat import encoding
from oss_jax.data import Batches, DataError, Example, load_examples
from oss_jax.tokenizer import write_tokenizer_files

TOOL = {"name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CONVERSATION = {"tools": [TOOL], "messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris? <|start|>not special<|end|>"},
    {"role": "assistant", "channel": "analysis", "content": "Need the weather tool."},
    {"role": "assistant", "recipient": "functions.get_weather", "content": {"city": "Paris"}},
    {"role": "tool", "name": "functions.get_weather", "content": "{\"sunny\": true}"},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "thinking": "Be polite.", "content": "You're welcome."},
]}
# (text, end token) of each assistant message as harmony renders it, and whether it is on the final channel
ASSISTANT = [("Need the weather tool.", "<|end|>", False), ('{"city": "Paris"}', "<|call|>", False),
             ("Sunny.", "<|end|>", True), ("Be polite.", "<|end|>", False), ("You're welcome.", "<|return|>", True)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ckpt"
    write_tokenizer_files(out)
    return out


def _write(path: Path, records: list) -> Path:
    """One JSONL line per record (strings are written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _harmony_reference() -> list[int]:
    """CONVERSATION built with openai-harmony's own API and rendered by its render_conversation_for_training."""
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)
    tool = ToolDescription.new(TOOL["name"], TOOL["description"], parameters=TOOL["parameters"])
    developer = DeveloperContent.new().with_instructions("Answer briefly.").with_function_tools([tool])
    call = Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}').with_channel("commentary")
    messages = [
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, "Weather in Paris? <|start|>not special<|end|>"),
        Message.from_role_and_content(Role.ASSISTANT, "Need the weather tool.").with_channel("analysis"),
        call.with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"sunny": true}')
        .with_channel("commentary").with_recipient("assistant"),
        Message.from_role_and_content(Role.ASSISTANT, "Sunny.").with_channel("final"),
        Message.from_role_and_content(Role.USER, "Thanks!"),
        Message.from_role_and_content(Role.ASSISTANT, "Be polite.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "You're welcome.").with_channel("final"),
    ]
    config = RenderConversationConfig(auto_drop_analysis=False)
    return encoding().render_conversation_for_training(Conversation.from_messages(messages), config)


def _masked_runs(ex: Example) -> list[list[int]]:
    """The maximal runs of consecutive masked tokens."""
    edges = np.flatnonzero(np.diff(np.r_[0, ex.loss_mask.astype(int), 0]))
    return [ex.tokens[a:b].tolist() for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("train_on", ["assistant", "final", "all"])
def test_conversation_rendering_and_mask(ckpt, tmp_path, train_on):
    """Tokens equal harmony's training rendering; the mask covers exactly the trained messages' text + end token."""
    (ex,), stats = load_examples(_write(tmp_path / "c.jsonl", [CONVERSATION]), ckpt, max_len=1000, train_on=train_on)
    want = _harmony_reference()
    assert ex.tokens.tolist() == want and ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == np.bool_
    assert (stats.examples, stats.tokens, stats.skipped) == (1, len(want), 0)
    assert stats.trained == ex.loss_mask.sum()
    enc = encoding(ckpt)
    if train_on == "all":
        assert not ex.loss_mask[0] and ex.loss_mask[1:].all()
        return
    got = [enc.decode(run) for run in _masked_runs(ex)]
    expected = [text + end for text, end, final in ASSISTANT if train_on == "assistant" or final]
    print(f"train_on={train_on}: {stats.trained} of {stats.tokens} tokens trained: {got}")
    assert got == expected


def test_plain_text(ckpt, tmp_path):
    """{"text"} lines and .txt paragraphs: harmony's (tiktoken) encoding + <|endoftext|>, all but token 0 trained."""
    docs = ["Hello world.\nSecond line of the same document.", "ünïcödé 日本語 😀 x = {'a': [1, 2]}", "last"]
    enc = encoding(ckpt)
    txt = tmp_path / "d.txt"
    txt.write_text(f"\n\n{docs[0]}\n \n\n{docs[1]}\n\n{docs[2]}")
    for path in (_write(tmp_path / "t.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)]), txt):
        examples, stats = load_examples(path, ckpt, max_len=100)
        assert [e.tokens.tolist() for e in examples] == [enc.encode(d) + [199999] for d in docs]
        assert all(not e.loss_mask[0] and e.loss_mask[1:].all() for e in examples)
        assert (stats.examples, stats.trained, stats.skipped) == (3, stats.tokens - 3, 0)
    txt.write_text("short\n\nline three\nline four is the one that runs far too long for max_len\n")
    with pytest.raises(DataError, match=r"d\.txt:3: \d+ tokens, more than max_len 8"):
        load_examples(txt, ckpt, max_len=8)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD = {
    "{not json": "invalid JSON",
    json.dumps({"messages": [{"role": "bot", "content": "x"}]}): "message 1: unknown role 'bot'",
    json.dumps({"conversation": []}): 'needs either "messages" \\(a conversation\\) or "text"',
    json.dumps({"messages": [], "text": "x"}): 'needs either "messages"',
    json.dumps({"messages": [{"role": "user"}]}): "message 1 \\(user\\) has no content",
    json.dumps({"messages": []}): "messages must be a non-empty list",
    json.dumps({"text": "word " * 80}): "\\d+ tokens, more than max_len 64",
    json.dumps({"messages": [{"role": "tool", "content": "x"}]}): "message 1: a tool message needs the tool's name",
    json.dumps({"messages": [{"role": "user", "content": "no answer"}]}): "no tokens to train on",
    json.dumps({"text": 7}): "text must be a string",
    "[1, 2]": "not a JSON object but list",
}


@pytest.mark.parametrize("line,reason", BAD.items())
def test_bad_line_names_file_and_line(ckpt, tmp_path, line, reason):
    """Each bad line raises DataError naming file:line; with skip_bad it is counted and the good lines stay."""
    path = _write(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: {reason}"):
        load_examples(path, ckpt, max_len=64)
    examples, stats = load_examples(path, ckpt, max_len=64, skip_bad=True)
    assert (len(examples), stats.examples, stats.skipped) == (2, 2, 1)
    assert stats.errors[0].startswith(f"{path}:3: ")


def test_bad_files(ckpt, tmp_path):
    """A missing file, a file of bad lines, and bad arguments each give one clear error."""
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", ckpt, max_len=64)
    path = _write(tmp_path / "all_bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"all_bad.jsonl: no examples \(2 bad lines skipped, first: .*:1: invalid"):
        load_examples(path, ckpt, max_len=64, skip_bad=True)
    with pytest.raises(ValueError, match="train_on must be one of"):
        load_examples(path, ckpt, max_len=64, train_on="user")
    with pytest.raises(ValueError, match="reasoning must be one of"):
        load_examples(path, ckpt, max_len=64, reasoning="max")


# ----------------------------------------------------------------- packing


def _examples(n: int, seed: int = 0, max_len: int = 24) -> list[Example]:
    """n examples of 2..max_len tokens; example i starts with token 1000 + i and has a random mask."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(2, max_len + 1))
        tokens = np.r_[1000 + i, rng.integers(0, 1000, k - 1)].astype(np.int32)
        out.append(Example(tokens, rng.random(k) < 0.7))
    return out


def _row_examples(batch: dict, b: int, examples: list[Example]) -> list[int]:
    """Check row b's layout against the examples it holds; returns their ids in order."""
    seg, pos = batch["segments"][b], batch["positions"][b]
    used = int((seg > 0).sum())
    assert (seg[used:] == 0).all() and (pos[used:] == -1).all() and (batch["loss_mask"][b, used:] == 0).all()
    ids, starts = [], np.flatnonzero(pos[:used] == 0)
    for s, (a, z) in enumerate(zip(starts, [*starts[1:], used], strict=True), 1):
        assert (seg[a:z] == s).all() and (pos[a:z] == np.arange(z - a)).all()
        ex = examples[int(batch["tokens"][b, a]) - 1000]
        assert batch["tokens"][b, a:z].tolist() == ex.tokens[:-1].tolist()
        assert batch["targets"][b, a:z].tolist() == ex.tokens[1:].tolist()  # next token, never across segments
        assert batch["loss_mask"][b, a:z].tolist() == ex.loss_mask[1:].astype(np.float32).tolist()
        ids.append(int(batch["tokens"][b, a]) - 1000)
    return ids


def test_packing_layout_and_epoch_order():
    """Rows hold whole examples greedily; the stream of examples is the seeded permutation of each epoch."""
    examples, T = _examples(50), 32
    batches = Batches(examples, batch_size=3, seq_len=T, seed=7)
    rows = []
    for _ in range(30):
        batch = next(batches)
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
            "tokens": ((3, T), "int32"), "targets": ((3, T), "int32"), "loss_mask": ((3, T), "float32"),
            "positions": ((3, T), "int32"), "segments": ((3, T), "int32")}
        rows += [_row_examples(batch, b, examples) for b in range(3)]
    stream = [i for row in rows for i in row]
    assert len(stream) > 100
    want = [*np.random.default_rng((7, 0)).permutation(50), *np.random.default_rng((7, 1)).permutation(50)]
    assert stream[:100] == [int(i) for i in want]  # every example once per epoch, in the seeded order
    for row, nxt in zip(rows[:-1], rows[1:], strict=True):  # greedy: the next example did not fit in the row before
        assert sum(len(examples[i].tokens) - 1 for i in row) + len(examples[nxt[0]].tokens) - 1 > T


def _take(batches: Batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
                                    for x, y in zip(a, b, strict=True))


def test_seed_determinism():
    examples = _examples(40)
    run = _take(Batches(examples, batch_size=2, seq_len=32, seed=1), 10)
    assert _same(run, _take(Batches(examples, batch_size=2, seq_len=32, seed=1), 10))
    assert not _same(run, _take(Batches(examples, batch_size=2, seq_len=32, seed=2), 10))


def test_state_restore_mid_epoch_and_across_epochs():
    """Resuming from state() after any batch yields exactly the batches an uninterrupted run yields next."""
    examples = _examples(20)
    batches = Batches(examples, batch_size=2, seq_len=40, seed=3)
    run, states = [], []
    for _ in range(16):
        run.append(next(batches))
        states.append(batches.state())
    epochs = [s["epoch"] for s in states]
    crossing = next(k for k in range(1, 16) if epochs[k] > epochs[k - 1])  # batch k spans an epoch boundary
    mid = next(k for k in range(16) if states[k]["index"] > 0)
    assert epochs[-1] >= 2, states
    for k in sorted({mid, crossing - 1, crossing, 12}):
        resumed = Batches(examples, batch_size=2, seq_len=40, seed=3, state=json.loads(json.dumps(states[k])))
        assert _same(_take(resumed, 15 - k), run[k + 1:]), k
        fresh = Batches(examples, batch_size=2, seq_len=40, seed=3)
        fresh.restore(states[k])
        assert _same(_take(fresh, 3), run[k + 1:k + 4]), k


def test_batches_refuse_bad_input():
    examples = _examples(4, max_len=10)
    with pytest.raises(ValueError, match="seq_len 8 needs 2..9"):
        Batches(examples + [Example(np.arange(10, dtype=np.int32), np.ones(10, bool))], batch_size=1, seq_len=8,
                seed=0)
    with pytest.raises(ValueError, match="out of range"):
        Batches(examples, batch_size=1, seq_len=16, seed=0, state={"epoch": 0, "index": 4})
