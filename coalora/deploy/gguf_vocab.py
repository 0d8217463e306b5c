"""The run's tokenizer as a GGUF vocabulary (``tokenizer.ggml.*`` keys) for ``export.py
format=gguf`` (docs/gguf.md, "Export to llama.cpp").

llama.cpp picks its tokenizer by ``tokenizer.ggml.model``: a WordPiece tokenizer (tiny_llama's
MiniLM one) is ``bert``, whose pieces mark a word start with ▁ instead of marking continuations
with ##; a byte-level BPE tokenizer (SmolLM2, Qwen2.5, Llama 3) is ``gpt2`` with its merges and
the name of llama.cpp's pre-tokenizer for that model (``tokenizer.ggml.pre``). SentencePiece-style
BPE with byte fallback (Llama 2) is refused with one line.
"""

from __future__ import annotations

import json
from typing import Any

from coalora.errors import ConfigError

# llama.cpp's pre-tokenizer name for each byte-level BPE tokenizer coalora's models use
# (llama.cpp identifies them by a hash of a test tokenization; these are its names)
BPE_PRE = {"smollm2_135m": "smollm", "llama3_1_8b": "llama-bpe"}
BPE_PRE_BY_ARCH = {"qwen2": "qwen2"}


def _tokenizer_json(tok: Any) -> dict[str, Any]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"format=gguf needs a fast (tokenizers) tokenizer; got {type(tok).__name__}"
        )
    return json.loads(backend.to_str())


def add_tokenizer(writer: Any, tok: Any, model_cfg: Any, n_vocab: int) -> str:
    """The run's tokenizer as ``tokenizer.ggml.*`` keys; returns the ggml tokenizer model
    (``bert`` for WordPiece, ``gpt2`` for byte-level BPE). Ids past the tokenizer's length (a
    vocabulary padded in the embedding) become unused ``[PADn]`` tokens."""
    import gguf

    spec = _tokenizer_json(tok)
    kind = spec["model"]["type"]
    n_tok = len(tok)
    if n_tok > n_vocab:
        raise ConfigError(f"format=gguf: the tokenizer has {n_tok} tokens, the embedding {n_vocab}")
    special = set(tok.all_special_ids)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    pieces = tok.convert_ids_to_tokens(list(range(n_tok)))
    types = []
    for i in range(n_tok):
        if i in special or added.get(i, {}).get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    if kind == "WordPiece":
        model = "bert"

        def phantom(piece: str, t: int) -> str:  # llama.cpp's WPM marks word starts with ▁
            if t == gguf.TokenType.CONTROL:
                return piece
            return piece[2:] if piece.startswith("##") else "\u2581" + piece

        pieces = [phantom(p, t) for p, t in zip(pieces, types)]
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre("default")
    elif kind == "BPE" and not spec["model"].get("byte_fallback"):
        model = "gpt2"
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        writer.add_tokenizer_model(model)
        name = str(model_cfg.get("name"))
        pre = BPE_PRE.get(name) or BPE_PRE_BY_ARCH.get(str(model_cfg.get("arch")), "default")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    else:
        raise ConfigError(
            f"format=gguf: tokenizer model {kind!r} (byte_fallback="
            f"{spec['model'].get('byte_fallback')}) is not supported; supported: WordPiece, "
            "byte-level BPE (use format=merged and llama.cpp's convert_hf_to_gguf.py)"
        )
    pieces += [f"[PAD{i}]" for i in range(n_tok, n_vocab)]
    types += [gguf.TokenType.UNUSED] * (n_vocab - n_tok)
    writer.add_token_list(pieces)
    writer.add_token_types([int(t) for t in types])
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("sep_token_id", writer.add_sep_token_id),
        ("mask_token_id", writer.add_mask_token_id),
    ):
        value = getattr(tok, attr, None)
        if isinstance(value, int) and 0 <= value < n_vocab:
            add(value)
    if model == "gpt2":
        writer.add_add_bos_token(False)  # byte-level BPE models here add no BOS (HF default)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return model


__all__ = ["BPE_PRE", "BPE_PRE_BY_ARCH", "add_tokenizer"]
