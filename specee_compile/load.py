"""Load: resolve MODEL (directory, .gguf file or built-in name) to an fp32 HF model.

Supported are decoder-only causal LMs whose layers are RoPE self-attention and a gated MLP with
RMSNorms (what differs between them is read by ``architecture.Architecture``): Llama, Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, Granite, SmolLM3 and OLMo 2.
Everything is validated from config.json and the weight files before any weight is read,
so bad input fails in well under a second with a message that names the fix.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from specee_compile import resources
from specee_compile.bundle.files import sha256
from specee_compile.errors import WRITE_ERRORS, ModelLoadError, UnsupportedModelError
from specee_compile.tokenizer import SAFE, load_tokenizer

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "granite", "smollm3",
                      "olmo2")
# GGUF architectures transformers dequantizes, of those families (a Gemma 3 GGUF loads as gemma3_text)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
BUILTIN_MODELS = {"smollm2": resources.SMOLLM2_WHEEL}
# Peak memory of a compile: a fixed part (Python, torch, ONNX Runtime, the exporter) plus a factor
# of the fp32 weights, fitted to the peaks measured on this machine class (docs/memory.md: tiny
# models 0.44 GiB, SmolLM2 from its GGUF 1.16 GiB for 0.50 GiB of weights, a 0.76B GGUF 4.45 GiB
# for 2.81 GiB); the estimate stayed 26-70% above every measured peak. The packed gate|up product
# (an MLP's gate and up weights copied into one) added 0.20 GiB to SmolLM2's peak and 0.35 GiB to a
# random Llama's with 0.92 GiB of weights, so the factor went from 1.75 to 2.
_EXPORT_MEMORY_BASE = 0.75 * 2**30
_EXPORT_MEMORY_FACTOR = 2.0
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


def gguf_source(spec: str | os.PathLike) -> Path | None:
    """The GGUF file MODEL names (a built-in name or a .gguf path), or None for a directory."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        return resources.wheel_member(*BUILTIN_MODELS[text])
    path = Path(text).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def inspect(model_dir: Path) -> ModelInfo:
    """Validate config.json and the weight files of a model directory without loading weights.

    Memory is checked twice: first from the parameter count config.json implies, before any
    weight file is looked at (so a model far too large fails at once, weights or not), then
    from the sizes of the weight files.
    """
    cfg_path = model_dir / "config.json"
    cfg = _read_config(model_dir)
    family = _check_family(model_dir, cfg)
    try:
        heads = _positive(cfg, "num_attention_heads")
        hidden = _positive(cfg, "hidden_size")
        info_fields = dict(
            num_layers=_positive(cfg, "num_hidden_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=_positive(cfg, "num_key_value_heads", heads),
            head_dim=_positive(cfg, "head_dim", hidden // heads),
            vocab_size=_positive(cfg, "vocab_size"),
            max_positions=_positive(cfg, "max_position_embeddings", 2048),
        )
        params = estimate_parameters(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path} lacks a usable field ({e}); re-save the model.") from e
    _check_memory(model_dir, 4 * params, "estimated from config.json")
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
    _check_memory(model_dir, info.fp32_bytes, "from the weight files")
    return info


def _read_config(model_dir: Path) -> dict:
    """config.json of a model directory as a dict, or a ModelLoadError saying what is wrong."""
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
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e}); re-save the model.") from e
    except OSError as e:
        raise ModelLoadError(f"{cfg_path} cannot be read ({e}); check its permissions.") from e
    return cfg


def _check_family(model_dir: Path, cfg: dict) -> str:
    """The config's model_type, if it is a decoder-only causal LM of a supported family."""
    family = cfg.get("model_type")
    if cfg.get("is_encoder_decoder"):
        raise UnsupportedModelError(
            f"{model_dir} is an encoder-decoder model ({family}); specee-compile needs a "
            f"decoder-only causal LM of a supported family: {', '.join(SUPPORTED_FAMILIES)}."
        )
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        archs = [str(archs)]
    if family not in SUPPORTED_FAMILIES or (archs and not any(str(a).endswith("ForCausalLM") for a in archs)):
        raise UnsupportedModelError(
            f"{model_dir} is a '{family}' model ({', '.join(map(str, archs)) or 'no architectures listed'}); "
            f"specee-compile supports decoder-only causal LMs of the families "
            f"{', '.join(SUPPORTED_FAMILIES)}. Convert or choose a model of one of those."
        )
    return family


def _positive(cfg: dict, key: str, default: int | None = None) -> int:
    """``cfg[key]`` as a positive int (``default`` when absent or null); raises KeyError/ValueError."""
    raw = cfg.get(key) if default is not None else cfg[key]
    value = int(default if raw is None else raw)
    if value <= 0:
        raise ValueError(f"{key} must be positive, got {raw!r}")
    return value


def estimate_parameters(cfg: dict) -> int:
    """Parameter count a Llama-family config.json implies, without looking at any weight.

    Counts the token embeddings, per layer the q/k/v/o projections (with their biases when
    the family or ``attention_bias`` has them), the gated MLP and two RMSNorms, the final
    RMSNorm, and the LM head unless ``tie_word_embeddings``. A missing
    ``intermediate_size`` counts as 0, so the estimate never overstates.
    """
    hidden = _positive(cfg, "hidden_size")
    heads = _positive(cfg, "num_attention_heads")
    q = heads * _positive(cfg, "head_dim", hidden // heads)  # width of the query projection
    kv = q // heads * _positive(cfg, "num_key_value_heads", heads)
    mlp = int(cfg.get("intermediate_size") or 0)
    vocab = _positive(cfg, "vocab_size")
    layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden
    if cfg.get("model_type") == "qwen2" or cfg.get("attention_bias"):
        layer += q + 2 * kv + (hidden if cfg.get("attention_bias") else 0)
    if cfg.get("mlp_bias"):
        layer += 2 * mlp + hidden
    head = 0 if cfg.get("tie_word_embeddings") else vocab * hidden
    return vocab * hidden + _positive(cfg, "num_hidden_layers") * layer + hidden + head


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
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_memory(path: Path, fp32_bytes: int, source: str) -> None:
    """Fail if exporting ``fp32_bytes`` of weights would not fit the memory available now."""
    available = _available_memory()
    need = int(_EXPORT_MEMORY_BASE + fp32_bytes * _EXPORT_MEMORY_FACTOR)
    if available is not None and need > available:
        raise ModelLoadError(
            f"{path} needs about {need / 2**30:.1f} GiB of memory to compile in fp32 "
            f"({fp32_bytes / 2**30:.1f} GiB of weights, {source}), but only "
            f"{available / 2**30:.1f} GiB is available. Use a smaller model, free memory, or "
            "compile on a machine with more memory."
        )


def load(model_dir: Path):
    """Load the fp32 PyTorch model and its tokenizer from a validated directory."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir, "the model directory", ModelLoadError)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **SAFE)
    except Exception as e:  # transformers raises many types for broken checkpoints
        raise ModelLoadError(f"transformers could not load {model_dir}: {e}") from e
    model.eval()
    return model, tokenizer


def gguf_to_directory(gguf: Path) -> Path:
    """Dequantize a GGUF file to an fp32 Hugging Face directory in the cache, once.

    The conversion is written to a hidden ``.partial-*`` sibling and renamed into place only
    when complete, so a failed or interrupted conversion leaves no cache entry behind.
    """
    digest = sha256(gguf)[:16]
    target = resources.cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    _check_gguf(gguf)
    with resources.cache_lock(f"model-{target.name}", f"waiting for another run that is converting {gguf.name}"):
        if not (target / "config.json").is_file():  # else another process converted it while this one waited
            _convert_into(gguf, target)
    return target


def _convert_into(gguf: Path, target: Path) -> None:
    logger.info("converting %s to an fp32 model directory in %s", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        _convert_gguf(gguf, tmp)
        _publish(tmp, target)
    except WRITE_ERRORS as e:
        raise ModelLoadError(
            f"could not write the fp32 conversion of {gguf} to {target.parent} ({e}). Free disk "
            "space there or point XDG_CACHE_HOME at another folder, then run again."
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_gguf(gguf: Path) -> None:
    """Read a GGUF's header (no weights): fail fast on a damaged file, a foreign family or a too-large model."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
        params = sum(int(t.n_elements) for t in reader.tensors)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on damaged files
        raise UnsupportedModelError(
            f"{gguf} is not a readable GGUF file ({e}). Pass a .gguf written by llama.cpp's "
            "converter (downloaded completely), or a Hugging Face model directory."
        ) from e
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf} holds a GGUF model of architecture {arch!r}; specee-compile reads GGUFs of the "
            f"architectures {', '.join(GGUF_ARCHITECTURES)}. Choose a GGUF of one of those, or a "
            "Hugging Face directory."
        )
    _check_memory(gguf, 4 * params, "from its tensor shapes")


@contextlib.contextmanager
def _gguf_read_once():
    """While transformers loads one GGUF, parse it once and build each tensor-name map once.

    transformers parses the whole file three times (the tokenizer, the config, the weights)
    and builds gguf's tensor-name map again for each of a model's ~400 modules: 30 of the 32 s
    a SmolLM2 conversion took, against 2.4 s of dequantizing. Both are pure functions of their
    arguments (the reader is a read-only memory map), so they are memoized for the duration of
    the load, then gguf's own functions are put back.
    """
    import gguf as gguf_py

    reader, name_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def read_once(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf_py.GGUFReader, gguf_py.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_py.GGUFReader, gguf_py.get_tensor_name_map = reader, name_map


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (dequantized to fp32) and save it as a HF directory in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **SAFE)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         **SAFE)
    except Exception as e:
        raise UnsupportedModelError(
            f"transformers could not read {gguf} ({e}). Supported GGUF architectures are "
            f"{', '.join(GGUF_ARCHITECTURES)}."
        ) from e
    # The dequantized weights are ordinary fp32 tensors; drop the GGUF marker to save them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished conversion to ``target``; a concurrent run that finished first wins."""
    if target.exists() and not (target / "config.json").is_file():
        shutil.rmtree(target)  # not an entry: entries only ever appear whole, by rename
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
