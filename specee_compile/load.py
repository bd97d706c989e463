"""Load: resolve MODEL (directory, .gguf file or built-in name) to an fp32 HF model.

Supported are decoder-only causal LMs of the Llama family of layouts (pre-norm decoder
layers with q/k/v/o projections, RoPE, RMSNorm, gated MLP): Llama, Mistral and Qwen2.
Everything is validated from config.json and the weight files before any weight is read,
so bad input fails in well under a second with a message that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from specee_compile import resources
from specee_compile.errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
BUILTIN_MODELS = {"smollm2": resources.SMOLLM2_WHEEL}
# Peak memory of export relative to fp32 weights (model + traced copy + ONNX serialisation).
_EXPORT_MEMORY_FACTOR = 4.0
_BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelInfo:
    """What the compiler needs to know about a model before loading its weights."""

    path: Path
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    weight_bytes: int

    @property
    def fp32_bytes(self) -> int:
        return self.weight_bytes * 4 // self._stored_bytes_per_param

    _stored_bytes_per_param: int = 4


def resolve(spec: str | os.PathLike) -> Path:
    """Turn MODEL as the user wrote it into a Hugging Face model directory."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        return gguf_to_directory(resources.wheel_member(*BUILTIN_MODELS[text]))
    path = Path(text).expanduser()
    if not path.exists():
        builtins = ", ".join(BUILTIN_MODELS)
        raise ModelLoadError(
            f"model path {path} does not exist. Pass a Hugging Face model directory "
            f"(config.json + *.safetensors), a .gguf file, or a built-in name ({builtins})."
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_to_directory(path)
        raise ModelLoadError(
            f"{path} is a file of unknown kind ({path.suffix or 'no suffix'}). A model file must "
            "be a .gguf; otherwise pass the Hugging Face model directory."
        )
    return path


def inspect(model_dir: Path) -> ModelInfo:
    """Validate config.json and the weight files of a model directory without loading weights."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json, so it is not a Hugging Face model directory. "
            "Pass the folder that save_pretrained() wrote, or a .gguf file."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("top level is not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e}); re-save the model.") from e
    family = cfg.get("model_type")
    if cfg.get("is_encoder_decoder"):
        raise UnsupportedModelError(
            f"{model_dir} is an encoder-decoder model ({family}); specee-compile needs a "
            f"decoder-only causal LM of a supported family: {', '.join(SUPPORTED_FAMILIES)}."
        )
    archs = cfg.get("architectures") or []
    if family not in SUPPORTED_FAMILIES or (archs and not any(a.endswith("ForCausalLM") for a in archs)):
        raise UnsupportedModelError(
            f"{model_dir} is a '{family}' model ({', '.join(archs) or 'no architectures listed'}); "
            f"specee-compile supports decoder-only causal LMs of the families "
            f"{', '.join(SUPPORTED_FAMILIES)}. Convert or choose a model of one of those."
        )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        info_fields = dict(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            max_positions=int(cfg.get("max_position_embeddings") or 2048),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path} lacks a usable field ({e}); re-save the model.") from e
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(
            f"{model_dir} has no *.safetensors weight files. Save the model with "
            "save_pretrained(safe_serialization=True) or pass a .gguf file."
        )
    weight_bytes = sum(_check_safetensors(w) for w in weights)
    stored = _BYTES_PER_PARAM.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), 4)
    info = ModelInfo(model_dir, family, weight_bytes=weight_bytes, _stored_bytes_per_param=stored,
                     **info_fields)
    _check_memory(info)
    return info


def _check_safetensors(path: Path) -> int:
    """Return the byte size of a safetensors file's tensors, raising if the file is truncated."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"weight file {path} is damaged ({e}); download or save it again.") from e
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"weight file {path} is truncated ({size} bytes, tensors need {8 + header_len + end}); "
            "download or save it again."
        )
    return end


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_memory(info: ModelInfo) -> None:
    available = _available_memory()
    need = int(info.fp32_bytes * _EXPORT_MEMORY_FACTOR)
    if available is not None and need > available:
        raise ModelLoadError(
            f"{info.path} needs about {need / 2**30:.1f} GiB to compile in fp32 "
            f"({info.fp32_bytes / 2**30:.1f} GiB of weights), but only {available / 2**30:.1f} GiB "
            "is available. Use a smaller model or a machine with more memory."
        )


def load(model_dir: Path):
    """Load the fp32 PyTorch model and its tokenizer from a validated directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for broken checkpoints
        raise ModelLoadError(f"transformers could not load {model_dir}: {e}") from e
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ModelLoadError(
            f"{model_dir} has no usable tokenizer ({e}); save the tokenizer next to the model."
        ) from e
    return model, tokenizer


def gguf_to_directory(gguf: Path) -> Path:
    """Dequantize a GGUF file to an fp32 Hugging Face directory in the cache, once."""
    digest = _file_digest(gguf)[:16]
    target = resources.cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an fp32 model directory in %s", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as e:
            raise UnsupportedModelError(
                f"transformers could not read {gguf} ({e}). Supported GGUF architectures are "
                f"those of the families {', '.join(SUPPORTED_FAMILIES)}."
            ) from e
        # The dequantized weights are ordinary fp32 tensors; drop the GGUF marker to save them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
