"""``export.py format=gguf``: each configuration as a llama.cpp base GGUF + GGUF LoRA adapter
(docs/gguf.md, "Export to llama.cpp").

One directory, built in a temporary sibling and swapped in (``coalora.io.
replace_dir_atomically``), so an interrupted export leaves nothing half-written::

    <out_dir>/<label>/base.gguf          the base at the configuration's GGUF types (gguf_base)
    <out_dir>/<label>/adapter.gguf       its LoRA (CoA-LoRA: B folded for it; gguf_lora)
    <out_dir>/<label>/quant_config.json  the configuration (layer → GGUF type)
    <out_dir>/README.md                  model card: the llama.cpp commands
    <out_dir>/manifest.json              configurations, stated types, bits, sha256 of every file

Runs: llama-family decoders (``model.arch`` llama or qwen2) trained with ``quant.space.kind=gguf``
and a LoRA-pair adapter (LoRA, QLoRA, Shared-LoRA, CoA-LoRA); QWHA and LQ-LoRA are refused with
one line naming ``format=merged`` (their adapters are no LoRA pair on a quantized W).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from coalora.deploy.format import check_labels, file_table, sha256
from coalora.deploy.gguf_base import (
    ARCHS,
    NON_TARGET,
    TensorNames,
    base_tensors,
    check_config,
    check_gguf_run,
    file_bits,
    write_base,
)
from coalora.deploy.gguf_lora import lora_pairs, write_adapter
from coalora.deploy.schema import check_digest, sign_manifest
from coalora.deploy.writer import MARKER, ExportJob, Written, check_target, is_export_of
from coalora.errors import CoaloraError
from coalora.io import replace_dir_atomically
from coalora.quant.config import ModelQuantConfig

FORMAT = "coalora-gguf"
VERSION = 1
MANIFEST = "manifest.json"
BASE, ADAPTER, CONFIG = "base.gguf", "adapter.gguf", "quant_config.json"


def save_gguf(
    model: nn.Module,
    names: list[str],
    configs: dict[str, ModelQuantConfig],
    adapt: Callable[[ModelQuantConfig], None],
    out_dir: str | Path,
    run_cfg: Any,
    tokenizer: Any = None,
    run_dir: Path | None = None,
    overwrite: bool = False,
    embedding_type: str = "F16",
    source: str = "",
) -> dict[str, Any]:
    """Write ``configs`` (label → configuration) of ``model`` as GGUF pairs; ``adapt(config)``
    switches the model's base and adapter to a configuration. Returns the manifest."""
    check_gguf_run(run_cfg)
    types = {label: check_config(c, label) for label, c in configs.items()}
    if not configs:
        raise CoaloraError("format=gguf: no configurations to export")
    check_labels(configs)
    out_dir = Path(out_dir).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else None
    check_target(out_dir, run_dir, overwrite)
    hf = model.config
    arch = str(run_cfg.model.arch)
    tnames = TensorNames(arch, hf)
    method = str(run_cfg.method.name)
    lora_pairs(model, names, tnames, method)  # refuse a non-LoRA adapter before any work
    title = f"coalora {method} {run_cfg.model.name}"
    records: dict[str, dict[str, Any]] = {}

    def build(tmp: Path) -> None:
        for label, config in configs.items():
            adapt(config)  # the base at this configuration, CoA-LoRA's B folded for it
            (tmp / label).mkdir()
            tensors = base_tensors(model, names, types[label], tnames, embedding_type)
            write_base(tmp / label / BASE, tensors, hf, tnames.gguf_arch, tokenizer,
                       run_cfg.model, f"{title} {label}")  # fmt: skip
            pairs, scaling, rank = lora_pairs(model, names, tnames, method)
            write_adapter(tmp / label / ADAPTER, pairs, scaling * rank, tnames.gguf_arch,
                          f"{title} {label} adapter")  # fmt: skip
            (tmp / label / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            bits = file_bits(tensors)
            records[label] = {
                "base": f"{label}/{BASE}",
                "adapter": f"{label}/{ADAPTER}",
                "config": f"{label}/{CONFIG}",
                "target_average_bits": config.average_bits(),
                "file_bits_per_weight": bits["bits_per_weight"],
                "params": bits["params"],
                "tensor_bytes": bits["tensor_bytes"],
                "lora": {"rank": rank, "scaling": scaling, "alpha": scaling * rank},
                "tensors": bits["tensors"],
            }
        (tmp / "README.md").write_text(
            model_card(run_cfg, records, embedding_type, source, out_dir)
        )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "method": method,
            "model": str(run_cfg.model.name),
            "arch": ARCHS[arch][0],
            "run_dir": str(run_dir) if run_dir is not None else None,
            "source": source,
            "non_target_types": {**NON_TARGET, "token_embd/output": embedding_type},
            "qk_rows_permuted": tnames.permutes,
            "configurations": records,
            "files": file_table(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(sign_manifest(manifest), indent=2) + "\n")
        marker = {"run_dir": str(run_dir) if run_dir is not None else None, "format": "gguf"}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    replace_dir_atomically(
        out_dir, build, is_ours=lambda p: is_export_of(p, run_dir), overwrite=overwrite
    )
    return read_gguf_manifest(out_dir)


def read_gguf_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a GGUF export, its digest checked and (``verify``) every file's sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise CoaloraError(f"{mpath}: not a coalora GGUF export ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CoaloraError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
    check_digest(manifest, mpath)
    if verify:
        for rel, entry in manifest["files"].items():
            f = path / rel
            if not f.is_file() or sha256(f) != entry["sha256"]:
                raise CoaloraError(f"{f}: missing or its sha256 differs from {MANIFEST}")
    return manifest


def model_card(
    run_cfg: Any, records: dict[str, dict], embedding_type: str, source: str, out_dir: Path
) -> str:
    rows = "\n".join(
        f"| {label} | `{r['base']}` | {r['target_average_bits']:.4f} | "
        f"{r['file_bits_per_weight']:.3f} | `{r['adapter']}` (r={r['lora']['rank']}, "
        f"alpha={r['lora']['alpha']:g}) |"
        for label, r in records.items()
    )
    label = next(iter(records))
    r = records[label]
    return (
        f"# coalora GGUF export: {run_cfg.method.name} on {run_cfg.model.name} / "
        f"{run_cfg.task.name}\n\n"
        f"Configurations ({source or 'as exported'}): a llama.cpp base GGUF each, with the GGUF\n"
        "LoRA adapter trained for it. Target linears hold the configuration's GGUF types\n"
        "(`quant_config.json`); norms and biases are F32, the token embedding (and an untied\n"
        f'output) {embedding_type}. "file bits" counts every tensor of the base file.\n\n'
        "| configuration | base | target bits | file bits | adapter |\n|---|---|---|---|---|\n"
        f"{rows}\n\n"
        "## Run with llama.cpp\n\n"
        "```sh\n"
        f'llama-cli -m {r["base"]} --lora {r["adapter"]} -p "The meaning of life is"\n'
        f"llama-perplexity -m {r['base']} --lora {r['adapter']} -f wiki.test.raw\n"
        f"llama-server -m {r['base']} --lora {r['adapter']}\n"
        "```\n\n"
        "Without `--lora` llama.cpp runs the quantized base alone. From Python (the `llamacpp`\n"
        "extra: `pip install 'coalora[llamacpp]'`, the prebuilt `xllamacpp` wheel):\n\n"
        "```python\nimport xllamacpp as xlc\n\nparams = xlc.CommonParams()\n"
        f"params.model.path = {str(out_dir / r['base'])!r}\n"
        f"lora = xlc.CommonAdapterLoraInfo({str(out_dir / r['adapter'])!r}, 1.0)\n"
        "params.lora_adapters = [lora]\n"
        "server = xlc.Server(params)\n"
        'print(server.handle_completions({"prompt": "The meaning of life is", "max_tokens": 32}))\n'
        "```\n\n"
        "Compare llama.cpp's perplexity with coalora's on the task's evaluation blocks:\n\n"
        f"```sh\npython scripts/llamacpp_check.py {out_dir} --budget {label}\n```\n\n"
        "`manifest.json` lists every file's sha256 and every tensor's type.\n"
    )


def write_gguf(job: ExportJob) -> Written:
    """``export.py format=gguf``: every configuration of ``job`` (``quant.budget`` or
    ``quant.budgets``) as a base GGUF + GGUF LoRA adapter."""
    manifest = save_gguf(
        job.model, job.names, job.configs, job.adapt, job.out_dir, job.run_cfg,
        tokenizer=job.tokenizer() if job.tokenizer is not None else None,
        run_dir=job.run_dir, overwrite=job.overwrite, source=job.source,
        embedding_type=job.options.get("gguf_embedding", "F16"),
    )  # fmt: skip
    confs = manifest["configurations"]
    sizes = {k: round(c["target_average_bits"], 4) for k, c in confs.items()}
    files = {k: round(c["file_bits_per_weight"], 3) for k, c in confs.items()}
    return Written(
        {"format": "gguf", "model_dir": str(job.out_dir), "avg_bits": sizes, "file_bits": files},
        f"GGUF base + LoRA for {sizes} average bits (files {files} bits/weight)",
    )


__all__ = ["FORMAT", "MANIFEST", "VERSION", "model_card", "read_gguf_manifest", "save_gguf",
           "write_gguf"]  # fmt: skip
