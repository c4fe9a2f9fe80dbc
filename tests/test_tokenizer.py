"""The o200k_harmony tokenizer files and the harmony chat format, all offline."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tokenizers

from configs import preset_path
from convert.synthetic import make_checkpoint
from oss_jax import tokenizer as tk
from oss_jax.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
# sha256 of the published openai/gpt-oss-20b files (the 120b ones are identical)
PUBLISHED = {"tokenizer.json": tk.TOKENIZER_JSON_SHA256,
             "tokenizer_config.json": "9279e942392b742d633c7adbb89ebe002c98399db8926a7af5125c726f404070",
             "special_tokens_map.json": "dd5e191d20c12d2fee1da5bae14ca1db0f5f4215300af691f23cdee97120a293",
             "generation_config.json": "f9970ada892d2d1f72e3ed0a6535ccebadd11897318794ca671d8c7014c957da"}
NAMED = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
         "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
         "<|endofprompt|>": 200018}
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'LL tell you: don't, won't, He's, we've, THEY'RE, o'clock, rock'n'roll",
    "HTTPServerError parseJSONResponse getX2Coordinate snake_case_name __dunder__ CamelCase",
    "ünïcödé façade naïve coöperate Straße İstanbul ǅemal",
    "日本語のテキストと漢字、中文文本，한국어 텍스트, العربية, עברית, हिन्दी में पाठ, ภาษาไทย",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇯🇵 ✔︎",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C++\n#include <vector>\n",
    "numbers 1234567890 3.14159265 1,000,000 -42 +7e-10 0x1F 2024-06-30 12:34:56 ½ ² ٣٤٥ ૧૨",
    "   leading and trailing spaces   \n\n\n\t\t  mixed \r\n whitespace \u00a0 runs\u2003\u3000 x     ",
    "\n", " ", "  ", "", "a", "\t\n \n", "!!!???...---***", "https://example.com/path?q=1&r=two#frag",
    "\u0301 combining acute alone, e\u0301 vs \u00e9, \u200b zero width, \ufeff bom",
    "<|start|>user<|message|>hi<|end|> not special: <|start (broken) |> <|reserved_200019|>",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Seeded strings drawn from ASCII, Latin-1, CJK, emoji and whitespace code points."""
    rng = np.random.default_rng(seed)
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x4E00, 0x4F00), range(0x1F600, 0x1F650), [9, 10, 13, 32]]
    out = []
    for _ in range(n):
        picks = [pools[p][rng.integers(len(pools[p]))] for p in rng.integers(0, len(pools), rng.integers(1, 40))]
        out.append("".join(map(chr, picks)))
    return out


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return tk.build_tokenizer().to_str(pretty=True)


@pytest.fixture(scope="module")
def hf(tokenizer_json) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(tokenizer_json)


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's o200k_harmony built directly from the same ranks (tiktoken.get_encoding would download)."""
    specials = {f"<|reserved_{i}|>": i for i in range(tk.N_BASE, tk.VOCAB_SIZE)} | NAMED
    specials.pop("<|endofprompt|>")  # harmony and tiktoken call 200018 <|reserved_200018|>
    ranks = {t: r for r, t in enumerate(tk.o200k_base_tokens())}
    return tiktoken.Encoding("o200k_harmony", pat_str=tk.O200K_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(ModelConfig.from_file(preset_path("tiny")), tmp_path_factory.mktemp("tok") / "hf")


@pytest.fixture(scope="module")
def vocab_dir(ckpt, tmp_path_factory) -> Path:
    """o200k_base.tiktoken derived from the checkpoint, into a fresh cache."""
    return tk.harmony_vocab_dir(ckpt, cache=tmp_path_factory.mktemp("harmony"))


def test_tokenizer_json_is_the_published_file(tokenizer_json):
    data = tokenizer_json.encode()
    assert len(data) == 27_868_174
    assert hashlib.sha256(data).hexdigest() == PUBLISHED["tokenizer.json"]


def test_ids_match_tiktoken(hf, reference):
    texts = CORPUS + _random_texts(300)
    ours = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    allowed = set(tk.SPECIAL_TOKENS.values()) - {"<|endofprompt|>"}
    theirs = [reference.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]
    for text, a, b in zip(texts, ours, theirs, strict=True):
        assert a == b, text
    assert ours[CORPUS.index("\n")] == [198]
    for text, ids in zip(texts, ours, strict=True):
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_vocab_tokens_encode_like_tiktoken(hf, reference):
    tokens = tk.o200k_base_tokens()
    picks = np.random.default_rng(1).choice(len(tokens), 40_000, replace=False)
    texts = [t for t in (tokens[i].decode(errors="ignore") for i in picks) if t]  # 40k of the 200k, as text
    ours = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert ours == reference.encode_ordinary_batch(texts)


def test_special_tokens(hf):
    assert {s: hf.token_to_id(s) for s in NAMED} == NAMED
    assert tk.SPECIAL_TOKENS == {i: hf.id_to_token(i) for i in range(tk.N_BASE, 200_019)}
    assert hf.get_vocab_size() == 200_019  # as published: ids 200019..201087 are harmony-only reserved tokens
    assert hf.encode("<|start|>assistant<|channel|>final<|message|>Hi<|return|>").ids == [
        200006, 173781, 200005, 17196, 200008, 12194, 200002]


def test_byte_level_alphabet_round_trips():
    every = bytes(range(256))
    assert tk.token_to_bytes(tk.bytes_to_token(every)) == every
    assert tk.bytes_to_token(b" \n") == "ĠĊ"
    with pytest.raises(ValueError, match="not a byte-level"):
        tk.token_to_bytes("日")


def test_files_written_as_published(ckpt):
    for name, sha in PUBLISHED.items():
        assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == sha, name


def test_harmony_vocab_file_from_checkpoint(ckpt, vocab_dir, tmp_path):
    data = (vocab_dir / tk.O200K_BASE_FILE).read_bytes()
    assert len(data) == 3_613_922 and hashlib.sha256(data).hexdigest() == tk.O200K_BASE_SHA256
    assert (tk.write_o200k_base(tmp_path / "toktok") / tk.O200K_BASE_FILE).read_bytes() == data
    assert tk.harmony_vocab_dir(ckpt, cache=vocab_dir) == vocab_dir  # verified and reused


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tk.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tk.harmony_vocab_dir(tmp_path / "missing")
    other = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not o200k_base"):
        tk.harmony_vocab_dir(tmp_path, cache=tmp_path / "cache")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable tokenizer file"):
        tk.load_tokenizer(tmp_path)


def test_transformers_loads_the_checkpoint_tokenizer(ckpt, hf):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (199998, 200002, 199999)
    for text in CORPUS:
        assert auto(text, add_special_tokens=False)["input_ids"] == hf.encode(text, add_special_tokens=False).ids
    assert tk.load_tokenizer(ckpt).encode(CORPUS[4]).ids == hf.encode(CORPUS[4]).ids
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == [200002, 199999, 200012]


HARMONY_SCRIPT = """
import json, sys
from openai_harmony import Conversation, Role
from oss_jax import chat
tools = [{"name": "get_weather", "description": "Current weather for a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
user = [{"role": "user", "content": "What is the weather in Tokyo?"}]
reply = [{"role": "assistant", "channel": "analysis", "content": "Need the weather tool."},
         {"role": "assistant", "recipient": "functions.get_weather", "content": {"city": "Tokyo"}}]
prompt = chat.render_conversation(user, reasoning="high", developer="Answer briefly.", tools=tools)
header = chat.header_messages("high", "Answer briefly.", tools)
enc = chat.encoding()
full = enc.render_conversation(Conversation.from_messages(header + [chat.to_message(m) for m in user + reply]))
every = enc.parse_messages_from_completion_tokens(full, None)
json.dump({"prompt": prompt, "full": full, "text": enc.decode_utf8(full), "stops": chat.stop_token_ids(),
           "completion": chat.parse_completion(full[len(prompt):]),
           "messages": [chat.message_dict(m) for m in every]}, sys.stdout)
"""


def test_harmony_offline_round_trip(vocab_dir, hf, tmp_path):
    empty = {k: tmp_path / k for k in ("TIKTOKEN_RS_CACHE_DIR", "TIKTOKEN_CACHE_DIR")}
    no_net = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # a download would fail fast
    env = {**os.environ, **no_net, "TIKTOKEN_ENCODINGS_BASE": str(vocab_dir), "PYTHONPATH": str(ROOT),
           **{k: str(v) for k, v in empty.items()}}
    run = subprocess.run([sys.executable, "-c", HARMONY_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert not any(p.exists() for p in empty.values())  # nothing was downloaded or cached
    assert got["stops"] == [200002, 200012]  # <|return|>, <|call|>
    prompt, full = got["prompt"], got["full"]
    assert full[:len(prompt)] == prompt and prompt[-2:] == [200006, hf.token_to_id("assistant")]
    assert hf.decode(full, skip_special_tokens=False) == got["text"]
    assert hf.encode(got["text"]).ids == full
    assert "Reasoning: high" in got["text"] and "type get_weather = (_: {\ncity: string,\n}) => any;" in got["text"]
    completion = got["completion"]
    assert completion["analysis"] == "Need the weather tool." and completion["final"] is None
    assert completion["tool_calls"] == [{"recipient": "functions.get_weather", "name": "get_weather",
                                         "arguments": {"city": "Tokyo"}, "channel": "commentary",
                                         "content_type": "<|constrain|>json"}]
    roles = [(m["role"], m["channel"], m["recipient"]) for m in got["messages"]]
    assert roles == [("system", None, None), ("developer", None, None), ("user", None, None),
                     ("assistant", "analysis", None), ("assistant", "commentary", "functions.get_weather")]
    assert got["messages"][2]["content"] == "What is the weather in Tokyo?"
    assert "# Instructions\n\nAnswer briefly." in got["messages"][1]["content"]
