"""Runtimes that execute compiled bundles. ``load(path)`` composes the one a bundle needs:

    Engine (engine.py)          the generation loop: prompts, stop rules, streaming, timing
      Decoder (decoders.py,     dense | SpecEE segments | SpecEE graph exits | tree speculation
               tree.py)
        Backend (backends/)     ONNX Runtime sessions | TensorRT engines: buffers and binding
"""

from __future__ import annotations

import logging
from pathlib import Path

from specee_compile.bundle import MANIFEST, read_manifest
from specee_compile.bundle.manifest import Manifest
from specee_compile.errors import BundleError, ConfigError
from specee_compile.runtimes.backends.ort import share_threads
from specee_compile.runtimes.engine import BundleFacts, Engine, Generation, Scored
from specee_compile.tokenizer import bundle_tokenizer

logger = logging.getLogger(__name__)
__all__ = ["Engine", "Generation", "Scored", "check_threads", "load", "share_threads"]
MAX_THREADS = 1024


def check_threads(threads) -> None:
    """A thread count from the command line or the API: None (ONNX Runtime's choice) or 1..MAX_THREADS."""
    if threads is not None and (type(threads) is not int or not 1 <= threads <= MAX_THREADS):
        raise ConfigError(f"--threads (threads) must be an integer from 1 to {MAX_THREADS}, not {threads!r}; leave it "
                          "out for ONNX Runtime's choice (the physical cores).")


def load(path: str | Path, threads: int | None = None, verify: bool | str = "cached", dense: bool = False,
         threshold: float | None = None, profile_dir: str | Path | None = None, tree=None):
    """Load a compiled bundle and return an engine with ``generate(prompt, ...)``.

    Args:
        path: the bundle directory written by ``specee-compile``.
        threads: ONNX Runtime intra-op threads (default: ORT's choice, the physical cores);
            TensorRT bundles ignore it.
        verify: "cached" (True, the default): every file's SHA-256 checked once, then trusted while a
            record of that check matches its size, mtime, ctime and inode; "full": hashed every time
            (about 1 s per GB); "none" (False): sizes only. Links, unlisted files and paths outside
            the bundle are refused always (:func:`specee_compile.bundle.read_manifest`).
        dense: run a SpecEE bundle's dense graph only (no early exit), for comparison.
        threshold: a SpecEE bundle's exit threshold (default: the calibrated one in its manifest);
            with ``tree``, the threshold of the exits inside verification (shapes with ":exit").
        profile_dir: write ONNX Runtime per-node profiles there (``engine.end_profiling()``).
        tree: decode by lossless tree speculation with trees of this shape (a ``TreeShape``,
            "WIDTHxDEPTHxBUDGET" like "4x2x6", or one width W for W candidates at depth 1, either
            with "+L" context-lookup nodes and ":exit" for early exit inside verification (lossy); True: the
            bundle's default shape, chosen when it was compiled (``specee.tree.default_shape``; bundles
            without one run ``runtimes.tree.DEFAULT_TREE``, 1x1x1+4), with a SpecEE bundle compiled with ``--tree``.
    """
    check_threads(threads)
    path = Path(path)
    raw = read_manifest(path, verify=verify)
    manifest = Manifest.from_json(raw, path / MANIFEST)
    backend = manifest.backend
    if backend not in ("onnxruntime", "tensorrt"):
        raise BundleError(f"{path} is a '{backend}' bundle; the runtimes load 'onnxruntime' and 'tensorrt' bundles.")
    bundle = BundleFacts(path, manifest, bundle_tokenizer(path, raw, BundleError))
    specee = manifest.specee is not None and not dense
    if tree is not None and (manifest.specee is None or dense):
        raise BundleError(f"tree speculation runs SpecEE bundles compiled with --tree, without dense; {path} with "
                          "these options is not one.")
    if tree is True and manifest.specee.tree is not None and manifest.specee.tree.default_shape:
        tree = manifest.specee.tree.default_shape
    if tree is not None and manifest.specee.tree is not None and manifest.specee.tree.inexact:
        logger.warning("%s: %s", path, manifest.specee.tree.inexact)
    if threshold is not None and not specee:
        raise BundleError(f"{path} has no early exits (not a SpecEE bundle, or dense=True); it takes no threshold.")
    return Engine(bundle, _decoder(bundle, backend, specee, tree, threads, profile_dir, threshold))


def _decoder(bundle: BundleFacts, backend: str, specee: bool, tree, threads, profile_dir, threshold):
    """The decoder a bundle and these options need, over the backend that runs its graphs."""
    from specee_compile.runtimes.decoders import DenseDecoder, GraphExitDecoder, SegmentedDecoder, SpecEEFacts

    if not specee:
        if backend == "tensorrt":
            from specee_compile.runtimes.backends.tensorrt import TrtStep

            return DenseDecoder(TrtStep(bundle), bundle)
        from specee_compile.runtimes.backends.ort import OrtStep

        return DenseDecoder(OrtStep(bundle, threads, profile_dir), bundle)
    spec = SpecEEFacts.read(bundle)
    if tree is not None:
        from specee_compile.runtimes.tree import TreeDecoder

        if backend == "tensorrt":
            from specee_compile.runtimes.backends.tensorrt_tree import TrtTree

            return TreeDecoder(TrtTree(bundle, spec), bundle, spec, tree, threshold)
        from specee_compile.runtimes.backends.ort_tree import OrtTree

        return TreeDecoder(OrtTree(bundle, spec, threads, profile_dir), bundle, spec, tree, threshold)
    if backend == "tensorrt":
        from specee_compile.runtimes.backends.tensorrt import TrtSpecEE

        return SegmentedDecoder(TrtSpecEE(bundle, spec), bundle, spec, threshold)
    from specee_compile.runtimes.backends.ort import OrtSpecEE

    cls = GraphExitDecoder if spec.exit_mode == "graph" else SegmentedDecoder
    return cls(OrtSpecEE(bundle, spec, threads, profile_dir), bundle, spec, threshold)
