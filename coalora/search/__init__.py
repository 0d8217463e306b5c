"""Pareto search over per-layer quantization configurations (CoA-LoRA, arXiv 2509.25214 §4.3; docs/search.md).

`configset`, `encoding` and `pareto` import eagerly and never import botorch (training reads
configsets without the search stack); `bo` and `loop` (GP, qLogNEHVI, the search loop) load on
first use.
"""

from __future__ import annotations

import importlib

from coalora.search.configset import ConfigEntry, ConfigSet, make_provenance
from coalora.search.encoding import Encoder, bounds, decode, encode, normalize
from coalora.search.pareto import (
    hypervolume_2d,
    infer_reference,
    non_dominated,
    non_dominated_mask,
    segmented_selection,
)

_LAZY = {
    "fit_models": "coalora.search.bo",
    "build_acquisition": "coalora.search.bo",
    "finite_difference_search": "coalora.search.bo",
    "discrete_neighbour_search": "coalora.search.bo",
    "propose_candidates": "coalora.search.bo",
    "run_search": "coalora.search.loop",
    "SearchResult": "coalora.search.loop",
    "Observation": "coalora.search.loop",
    "IterationRecord": "coalora.search.loop",
    "CalibrationObjective": "coalora.search.objectives",
}

__all__ = [
    "ConfigEntry",
    "ConfigSet",
    "Encoder",
    "bounds",
    "decode",
    "encode",
    "hypervolume_2d",
    "infer_reference",
    "make_provenance",
    "non_dominated",
    "non_dominated_mask",
    "normalize",
    "segmented_selection",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'coalora.search' has no attribute {name!r}")
