"""Deployable exports of a trained run: one module per format, each with a writer that
``export.py format=<name>`` calls (docs/architecture.md, "Stage flow"; docs/packed.md).

* packed: ``format.py`` (layout, manifest, labels), ``save.py`` (``save_packed``, the writer),
  ``reader.py`` (``load``): many configurations in one directory, served without training code;
* ``peft.py``: a PEFT LoRA adapter for one configuration + ``load_quantized_base``;
* ``merged.py``: a plain ``transformers`` checkpoint with the effective weights;
* ``writer.py``: what the writers share (``ExportJob``, ``Written``, ``write_export``).

``import coalora.deploy`` gives the packed format's API and imports neither Lightning, Hydra nor
botorch::

    from coalora import deploy
    deploy.save_packed(model, names, {"3.0": config}, adapters, out_dir, scaling=scaling,
                       tokenizer=tokenizer)
    model = deploy.load(out_dir, budget=3.0)
    tokenizer = deploy.load_tokenizer(out_dir)  # when the export ships one (export.py does)
"""

from coalora.deploy.format import FORMAT, VERSION, clean_state_dict, labels, read_manifest
from coalora.deploy.reader import BACKENDS, load, load_tokenizer
from coalora.deploy.save import lora_tensors, save_packed

__all__ = [
    "BACKENDS",
    "FORMAT",
    "VERSION",
    "clean_state_dict",
    "labels",
    "load",
    "load_tokenizer",
    "lora_tensors",
    "read_manifest",
    "save_packed",
]
