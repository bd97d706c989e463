"""Reading a bundle as untrusted data: the manifest, its files, and what may be opened.

Guarantees of :func:`read_manifest` (every violation is a :class:`BundleError` naming the
manifest and the field or file):

- every field a runtime relies on exists and is in range (:mod:`.manifest`), the ``specee``
  and tree sections included, and every file name a field holds is listed in ``files``;
- the folder holds exactly ``manifest.json`` and the files ``files`` lists: no unlisted file
  (a tokenizer file slipped in beside the listed ones would be read), no symbolic link or
  special file anywhere in it, no listed name that leaves it;
- every listed file has its size and, unless ``verify="none"``, its SHA-256. With
  ``verify="cached"`` (the default) a file is hashed once and then trusted while a record
  of that check in the cache (:mod:`.record`) still matches its size, mtime, ctime and
  inode; ``verify="full"`` hashes every file every time;
- every ONNX file's external data (initializers and tensor attributes, subgraphs included)
  names a listed file, so ONNX Runtime opens nothing else.

The runtimes turn a manifest's file name into a path only through :func:`member`.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path, PurePosixPath

from specee_compile.bundle import record
from specee_compile.bundle.files import FORMAT, FORMAT_VERSION, MANIFEST, entries, parents, sha256
from specee_compile.bundle.manifest import check_fields
from specee_compile.errors import BundleError

VERIFY = ("cached", "full", "none")
_MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(bundle_dir: Path, verify: bool | str = "cached") -> dict:
    """Read and validate a bundle's manifest and files (see the module docstring).

    Args:
        bundle_dir: the bundle folder.
        verify: "cached" (True), "full" or "none" (False): how checksums are checked.

    Raises:
        BundleError: naming the manifest and the bad field or file, for anything a reader cannot use.
    """
    mode = {True: "cached", False: "none"}.get(verify, verify) if isinstance(verify, bool) else verify
    if mode not in VERIFY:
        raise BundleError(f"verify must be one of {VERIFY} (or True/False), not {verify!r}.")
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(
            f"{bundle_dir} is not a bundle directory; compile one with `specee-compile MODEL --out {bundle_dir}`."
        )
    path = bundle_dir / MANIFEST
    manifest, raw = _parse(bundle_dir, path)
    check_fields(manifest, path)
    _check_entries(bundle_dir, manifest, path)
    trusted = record.trusted(bundle_dir, raw) if mode == "cached" else {}
    checked = _check_files(bundle_dir, manifest, mode, trusted)
    if mode == "none" or checked != trusted:  # files the record vouches for were found sound before
        _check_external_data(bundle_dir, manifest)
    if mode != "none" and checked != trusted:  # recorded only once every check passed
        record.remember(bundle_dir, raw, checked)
    return manifest


def member(bundle_dir: Path, manifest: dict, name: object, field: str) -> Path:
    """The path of the bundle file ``name`` that the manifest's ``field`` holds.

    Only names the manifest's ``files`` lists are given out; :func:`read_manifest` checked
    those (inside the bundle, regular files, checksums).
    """
    if not isinstance(name, str) or name not in manifest.get("files", {}):
        raise BundleError(
            f"{Path(bundle_dir) / MANIFEST}: field '{field}' names {reprlib.repr(name)}, which 'files' does not "
            "list; a runtime opens only the bundle's listed files. The bundle is damaged: recompile it."
        )
    return Path(bundle_dir) / name


def _parse(bundle_dir: Path, path: Path) -> tuple[dict, bytes]:
    """The manifest as a dict (and its bytes), with its format and version checked."""
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST}; it is incomplete or not a specee bundle. Recompile it.")
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than a manifest ever holds")
        raw = path.read_bytes()
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("top level is not an object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged. Recompile it.") from e
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e}); check its permissions.") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{path} is not a {FORMAT} manifest (format={reprlib.repr(manifest.get('format'))}). "
            "Pass a bundle written by specee-compile, or recompile it."
        )
    version = manifest.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {reprlib.repr(version)}; this specee-compile reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade specee-compile or recompile the bundle with this version."
        )
    return manifest, raw


def _check_entries(bundle_dir: Path, manifest: dict, path: Path) -> None:
    """Listed names stay inside the bundle; the folder holds nothing but them (no links, no extras)."""
    for name, meta in manifest["files"].items():
        pure = PurePosixPath(name)
        if (not name or "\\" in name or "\0" in name or pure.is_absolute() or str(pure) != name
                or any(p in ("..", ".") for p in pure.parts) or name == MANIFEST):
            raise BundleError(f"{path}: field 'files' names {reprlib.repr(name)}, which is not a path inside the bundle "
                              "(a plain relative name); the bundle is damaged or crafted. Recompile it.")
        if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and meta["bytes"] >= 0
                and isinstance(meta.get("sha256"), str)):
            raise BundleError(f"{path}: field 'files.{name}' must be {{\"sha256\": str, \"bytes\": int >= 0}}; "
                              "the bundle is damaged. Recompile it.")
    try:
        files, folders, others = entries(bundle_dir)
    except OSError as e:
        raise BundleError(f"{bundle_dir} cannot be listed ({e}); check its permissions.") from e
    listed = set(manifest["files"])
    allowed = set().union(*(parents(n) for n in listed))
    if others:
        raise BundleError(f"{bundle_dir} holds symbolic links or special files ({', '.join(others[:5])}); a bundle "
                          "holds regular files only, so that it cannot make a runtime open anything outside it. "
                          "Recompile it, or copy it without links (cp -rL).")
    extra = [n for n in files if n not in listed and n != MANIFEST] + [n + "/" for n in folders if n not in allowed]
    if extra:
        raise BundleError(f"{bundle_dir} holds files its {MANIFEST} does not list ({', '.join(extra[:5])}); a runtime "
                          "reads only listed, checksummed files. Remove them, or recompile the bundle.")


def _check_files(bundle_dir: Path, manifest: dict, mode: str, trusted: dict[str, list[int]]) -> dict:
    """Every listed file exists with its size, and (unless mode "none") its checksum, hashed
    unless ``trusted`` holds its unchanged stat key; returns the stat keys of the files checked."""
    checked = {}
    for name, meta in manifest["files"].items():
        f = bundle_dir / name
        try:
            if not f.is_file():
                raise BundleError(f"bundle file {f} is missing; the bundle is damaged. Recompile it.")
            stat = f.stat()
            if stat.st_size != meta["bytes"]:
                raise BundleError(f"bundle file {f} has {stat.st_size} bytes where {MANIFEST} says {meta['bytes']}: "
                                  "it was altered or truncated. Recompile the bundle.")
            if mode == "none":
                continue
            key = record.stat_key(stat)
            if trusted.get(name) != key and sha256(f) != meta["sha256"]:
                raise BundleError(f"bundle file {f} does not match its checksum in {MANIFEST}: it was altered or "
                                  "truncated. Recompile the bundle.")
            checked[name] = key
        except OSError as e:
            raise BundleError(f"bundle file {f} cannot be read ({e}); check its permissions or recompile.") from e
    return checked


def _check_external_data(bundle_dir: Path, manifest: dict) -> None:
    """Each listed ONNX file's external data must be listed files (ONNX Runtime opens them by name)."""
    import onnx

    for name in manifest["files"]:
        if not name.endswith(".onnx"):
            continue
        try:
            model = onnx.load(bundle_dir / name, load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise BundleError(f"bundle file {bundle_dir / name} is not a readable ONNX model ({type(e).__name__}: "
                              f"{e}); the bundle is damaged. Recompile it.") from e
        folder = PurePosixPath(name).parent
        for location in _external_locations(model.graph):
            target = str(folder / location) if str(folder) != "." else location
            pure = PurePosixPath(location)
            if pure.is_absolute() or ".." in pure.parts or "\\" in location or target not in manifest["files"]:
                raise BundleError(
                    f"{bundle_dir / name} keeps weights in {location!r}, which {MANIFEST}'s 'files' does not list; "
                    "ONNX Runtime would open a file the bundle does not vouch for. Recompile the bundle."
                )


def _external_locations(graph) -> set[str]:
    """The external-data file names a GraphProto's tensors refer to, subgraphs included."""
    import onnx

    found: set[str] = set()
    tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
    graphs = []
    for node in graph.node:
        for attr in node.attribute:
            tensors += ([attr.t] if attr.type == onnx.AttributeProto.TENSOR else []) + list(attr.tensors)
            graphs += ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")
    for g in graphs:
        found |= _external_locations(g)
    return found
