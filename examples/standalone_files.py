"""The bundle's files, for examples/standalone_ort.py: the standard library, numpy and jinja2 only.

What the standalone engine reads itself, before and besides ONNX Runtime (docs/bundle-format.md,
"Layout" and "manifest.json"):

- ``read_manifest``: the manifest, after the file rules (only the listed files, no links,
  each with its SHA-256), and ``listed``: a file a manifest field names;
- ``read_safetensors``: the safetensors format, for the K/V propagation weights (kv_fill),
  without the safetensors package;
- ``render_chat``: the bundle's chat template rendered as transformers renders it (``--chat``;
  needs jinja2, the language chat templates are written in).

Like the example, it never imports specee_compile, transformers or torch. A bundle that breaks
a rule ends the program with a message (``sys.exit``), as the script does.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def read_manifest(bundle: Path) -> dict:
    """The manifest, after the file rules of docs/bundle-format.md: the folder holds only the
    listed files (no links, nothing unlisted), each with its SHA-256. Field ranges and the
    external-data names inside the graphs are left to ONNX Runtime and to the caller."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("format") != "specee-bundle" or manifest.get("format_version") != 1:
        sys.exit(f"{bundle} is not a version-1 specee bundle")
    if manifest.get("backend") != "onnxruntime":
        sys.exit(f"{bundle} is a {manifest.get('backend')!r} bundle, not an ONNX Runtime one")
    files = manifest.get("files") or {}
    for path in bundle.rglob("*"):
        name = path.relative_to(bundle).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            sys.exit(f"{bundle} holds a link or special file: {name}")
        if path.is_file() and name != "manifest.json" and name not in files:
            sys.exit(f"{bundle} holds a file its manifest does not list: {name}")
    for name, meta in files.items():
        path = bundle / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
            sys.exit(f"{bundle}: the listed file {name!r} is not a file inside the bundle")
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("sha256"):
            sys.exit(f"{bundle}: {name} does not match its SHA-256 in the manifest")
    return manifest


def listed(bundle: Path, manifest: dict, name: str) -> Path:
    """A file a manifest field names: only one the manifest lists (and read_manifest checked)."""
    if name not in manifest["files"]:
        sys.exit(f"{bundle}: the manifest names {name!r}, which its files do not list")
    return bundle / name


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format: u64 little-endian header size, a JSON header, then raw data."""
    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data = memoryview(raw)[8 + size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        tensors[name] = array.copy()  # own, aligned and writable
    return tensors


def render_chat(bundle: Path, prompt: str) -> str:
    """The chat template rendered as transformers' ``apply_chat_template`` renders it."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config = json.loads((bundle / "tokenizer_config.json").read_text())
    template_file = bundle / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    if not isinstance(template, str):
        sys.exit(f"{bundle} has no chat template; run without --chat")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    # The template also sees the named special tokens (as strings) of tokenizer_config.json.
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None:
            special[name] = str(token)
    messages = [{"role": "user", "content": prompt}]
    return env.from_string(template).render(messages=messages, tools=None, documents=None,
                                            add_generation_prompt=True, **special)
