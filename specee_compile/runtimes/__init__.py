"""Runtimes that execute compiled bundles. ``load(path)`` picks the one the bundle needs."""

from __future__ import annotations

from pathlib import Path

from specee_compile.bundle import read_manifest
from specee_compile.errors import BundleError, ConfigError
from specee_compile.runtimes.ort import share_threads
from specee_compile.tokenizer import bundle_tokenizer

__all__ = ["check_threads", "load", "share_threads"]
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
            measured default ``runtimes.tree.DEFAULT_TREE``, 1x1x1+4), with a SpecEE bundle compiled with ``--tree``.
    """
    check_threads(threads)
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    backend = manifest.get("backend")
    if backend not in ("onnxruntime", "tensorrt"):
        raise BundleError(f"{path} is a '{backend}' bundle; the runtimes load 'onnxruntime' and 'tensorrt' bundles.")
    tokenizer = bundle_tokenizer(path, manifest, BundleError)
    specee = "specee" in manifest and not dense
    if tree is not None:
        if "specee" not in manifest or backend != "onnxruntime" or dense:
            raise BundleError(f"tree speculation runs ONNX Runtime SpecEE bundles compiled with --tree, without "
                              f"dense; {path} with these options is not one.")
        from specee_compile.runtimes.tree import TreeEngine

        return TreeEngine(path, manifest, tokenizer, threads=threads, profile_dir=profile_dir, shape=tree,
                          threshold=threshold)
    if threshold is not None and not specee:
        raise BundleError(f"{path} has no early exits (not a SpecEE bundle, or dense=True); it takes no threshold.")
    if backend == "tensorrt":
        from specee_compile.runtimes.tensorrt import TrtEngine, TrtSpecEEEngine

        if specee:
            return TrtSpecEEEngine(path, manifest, tokenizer, threshold=threshold)
        return TrtEngine(path, manifest, tokenizer)
    from specee_compile.runtimes.ort import OrtEngine

    if specee:
        from specee_compile.runtimes.specee import SpecEEEngine, SpecEEGraphEngine

        graph_mode = isinstance(manifest["specee"], dict) and manifest["specee"].get("exit_mode") == "graph"
        cls = SpecEEGraphEngine if graph_mode else SpecEEEngine
        return cls(path, manifest, tokenizer, threads=threads, profile_dir=profile_dir, threshold=threshold)
    return OrtEngine(path, manifest, tokenizer, threads=threads, profile_dir=profile_dir)
