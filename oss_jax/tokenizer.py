"""The o200k_harmony tokenizer, built offline: HF tokenizer files for checkpoints and the vocab file harmony reads.

The 199,998 o200k_base BPE ranks come from toktok-rs (compiled into its extension) or from a checkpoint's own
`tokenizer.json`; nothing is downloaded. `write_tokenizer_files` reproduces the published gpt-oss `tokenizer.json`
byte for byte (merges recovered as transformers' TikTokenConverter does: every split of a token into two tokens,
in rank order), and `harmony_vocab_dir` turns a checkpoint's `tokenizer.json` back into `o200k_base.tiktoken`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

TOKENIZER_JSON = "tokenizer.json"
O200K_BASE_FILE = "o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
TOKENIZER_JSON_SHA256 = "0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3"  # openai/gpt-oss-20b
N_BASE = 199_998  # o200k_base ranks; the special tokens follow
VOCAB_SIZE = 201_088  # the embedding rows of gpt-oss (o200k_harmony reserves ids up to 201087)

O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# The special tokens of the published tokenizer (tokenizer_config.json `added_tokens_decoder`); the other ids in
# 199998..200018 are `<|reserved_ID|>`. Harmony also knows 200019..201087 as reserved; the published files do not.
_NAMED_SPECIAL = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
                  200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
                  200012: "<|call|>", 200018: "<|endofprompt|>"}
SPECIAL_TOKENS = {i: _NAMED_SPECIAL.get(i, f"<|reserved_{i}|>") for i in range(N_BASE, 200_019)}

# The published tokenizer_config.json / special_tokens_map.json / generation_config.json, key for key.
SPECIAL_TOKENS_MAP = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
                     "pad_token_id": 199999, "transformers_version": "4.55.0.dev0"}


def tokenizer_config() -> dict:
    """The published gpt-oss tokenizer_config.json content."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {"added_tokens_decoder": {str(i): {"content": s, **flags} for i, s in SPECIAL_TOKENS.items()},
            **SPECIAL_TOKENS_MAP, "clean_up_tokenization_spaces": False, "extra_special_tokens": {},
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": int(1e30),
            "tokenizer_class": "PreTrainedTokenizerFast"}


# ----------------------------------------------------------------- byte-level alphabet (GPT-2's bytes_to_unicode)


@functools.cache
def _byte_chars() -> str:
    """The 256 printable characters GPT-2 byte-level BPE uses for bytes 0..255, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return "".join(chr(b) if b in keep else chr(next(extra)) for b in range(256))


@functools.cache
def _to_chars() -> dict[int, str]:
    """str.translate table: latin-1 char of a byte -> its byte-level char."""
    return dict(enumerate(_byte_chars()))


@functools.cache
def _to_bytes() -> dict[int, int]:
    """str.translate table: byte-level char -> latin-1 char of its byte."""
    return {ord(c): b for b, c in enumerate(_byte_chars())}


def bytes_to_token(b: bytes) -> str:
    """Raw token bytes -> the byte-level string HF vocabularies store."""
    return b.decode("latin-1").translate(_to_chars())


def token_to_bytes(s: str) -> bytes:
    """A byte-level vocabulary string -> raw token bytes."""
    out = s.translate(_to_bytes())
    try:
        return out.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{s!r} is not a byte-level BPE token") from None


# ----------------------------------------------------------------- o200k_base ranks and the tiktoken vocab file


@functools.cache
def o200k_base_tokens() -> tuple[bytes, ...]:
    """The 199,998 o200k_base token byte strings by rank, from toktok-rs (offline)."""
    import toktok

    tokens = tuple(toktok._encoding("o200k_base").token_byte_values())
    if len(tokens) != N_BASE:
        raise RuntimeError(f"toktok's o200k_base has {len(tokens)} tokens, expected {N_BASE}")
    return tokens


def tiktoken_file_bytes(tokens: tuple[bytes, ...] | list[bytes]) -> bytes:
    """`base64(token) rank` lines, newline-terminated: the .tiktoken vocab format."""
    return b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens))


def _write_verified(path: Path, data: bytes, sha256: str, what: str) -> Path:
    """Write `data` to `path` atomically after checking its sha256."""
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"{what}: sha256 {got} ({len(data):,} bytes) is not the expected {sha256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _is_verified(path: Path, sha256: str) -> bool:
    """Whether `path` exists with this sha256."""
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def cache_dir() -> Path:
    """Where derived files are kept: $OSS_JAX_CACHE, else $XDG_CACHE_HOME/oss-jax, else ~/.cache/oss-jax."""
    if os.environ.get("OSS_JAX_CACHE"):
        return Path(os.environ["OSS_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oss-jax"


def write_o200k_base(dst_dir: str | Path | None = None) -> Path:
    """Write `o200k_base.tiktoken` from toktok's ranks into `dst_dir` (default: the cache); returns the dir."""
    out = Path(dst_dir) if dst_dir is not None else cache_dir() / "harmony" / "toktok"
    if not _is_verified(out / O200K_BASE_FILE, O200K_BASE_SHA256):
        _write_verified(out / O200K_BASE_FILE, tiktoken_file_bytes(o200k_base_tokens()), O200K_BASE_SHA256,
                        "o200k_base from toktok")
    return out


def _find_tokenizer_json(ckpt_dir: str | Path) -> Path:
    """`tokenizer.json` in `ckpt_dir` (or above an `original/` dir, as on the Hub), with a clear error if absent."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file() and ckpt_dir.name == TOKENIZER_JSON:
        return ckpt_dir
    folders = (ckpt_dir, ckpt_dir.parent) if ckpt_dir.name == "original" else (ckpt_dir,)
    for folder in folders:
        if (folder / TOKENIZER_JSON).is_file():
            return folder / TOKENIZER_JSON
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: not a directory")
    raise FileNotFoundError(f"{ckpt_dir}: no {TOKENIZER_JSON} (the published HF checkpoints ship one; add it with "
                            "`oss_jax.tokenizer.write_tokenizer_files(dir)`)")


def base_tokens_from_tokenizer_json(path: str | Path) -> list[bytes]:
    """The BPE ranks of a byte-level `tokenizer.json`: token bytes by id, added (special) tokens excluded."""
    tok = tokenizers.Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=False)
    added = set(tok.get_added_tokens_decoder())
    by_id = sorted((i, s) for s, i in vocab.items() if i not in added)
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise ValueError(f"{path}: BPE vocabulary ids are not 0..{len(by_id) - 1}")
    return [token_to_bytes(s) for _, s in by_id]


def harmony_vocab_dir(ckpt_dir: str | Path, cache: str | Path | None = None) -> Path:
    """The dir to put in TIKTOKEN_ENCODINGS_BASE: `o200k_base.tiktoken` derived from the checkpoint's tokenizer.json."""
    source = _find_tokenizer_json(ckpt_dir)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = Path(cache) if cache is not None else cache_dir() / "harmony" / digest[:16]
    if not _is_verified(out / O200K_BASE_FILE, O200K_BASE_SHA256):
        data = tiktoken_file_bytes(base_tokens_from_tokenizer_json(source))
        _write_verified(out / O200K_BASE_FILE, data, O200K_BASE_SHA256,
                        f"{source}: its BPE ranks are not o200k_base, which harmony requires")
    return out


# ----------------------------------------------------------------- HF tokenizer.json


def recover_merges(tokens: tuple[bytes, ...] | list[bytes]) -> list[tuple[int, int]]:
    """BPE merges as (left rank, right rank): every split of each token into two tokens, in token-rank order."""
    ranks = {t: r for r, t in enumerate(tokens)}
    get = ranks.get
    merges: list[tuple[int, int]] = []
    for token in tokens:
        local = []
        for i in range(1, len(token)):
            left = get(token[:i])
            if left is not None and (right := get(token[i:])) is not None:
                local.append((left, right))
        local.sort()
        merges.extend(local)
    return merges


def build_tokenizer(tokens: tuple[bytes, ...] | list[bytes] | None = None) -> tokenizers.Tokenizer:
    """The o200k_harmony HF tokenizer: byte-level BPE over the ranks + the o200k split regex + special tokens."""
    tokens = o200k_base_tokens() if tokens is None else tokens
    strings = [bytes_to_token(t) for t in tokens]
    merges = [(strings[a], strings[b]) for a, b in recover_merges(tokens)]
    tok = tokenizers.Tokenizer(BPE({s: i for i, s in enumerate(strings)}, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIAL_TOKENS.values()])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    got = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS.values()}
    if got != {s: i for i, s in SPECIAL_TOKENS.items()}:
        raise RuntimeError(f"special tokens got ids {got}")
    return tok


@functools.cache
def tokenizer_json_bytes() -> bytes:
    """The o200k_harmony tokenizer.json (~28 MB): from the on-disk cache when it verifies, else built (~7 s)."""
    cached = cache_dir() / "tokenizer" / TOKENIZER_JSON
    if _is_verified(cached, TOKENIZER_JSON_SHA256):
        return cached.read_bytes()
    data = build_tokenizer().to_str(pretty=True).encode()
    if hashlib.sha256(data).hexdigest() == TOKENIZER_JSON_SHA256:  # only the published bytes are cached
        try:
            _write_verified(cached, data, TOKENIZER_JSON_SHA256, "tokenizer.json")
        except OSError:
            pass  # a read-only cache only costs a rebuild next time
    return data


def _json_text(obj: dict) -> str:
    """JSON as transformers saves it (indent 2, sorted keys, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_tokenizer_files(dst_dir: str | Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json into `dst_dir`."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = {TOKENIZER_JSON: tokenizer_json_bytes(), "tokenizer_config.json": _json_text(tokenizer_config()).encode(),
             "special_tokens_map.json": _json_text(SPECIAL_TOKENS_MAP).encode(),
             "generation_config.json": _json_text(GENERATION_CONFIG).encode()}
    for name, data in files.items():
        tmp = dst / f".{name}.partial"
        tmp.write_bytes(data)
        os.replace(tmp, dst / name)
    return list(files)


def load_tokenizer(ckpt_dir: str | Path) -> tokenizers.Tokenizer:
    """The checkpoint's HF tokenizer (`tokenizer.json` in `ckpt_dir`, or above it for an `original/` dir)."""
    path = _find_tokenizer_json(ckpt_dir)
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path}: unreadable tokenizer file ({e})") from e

