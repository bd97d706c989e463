"""The values a SpecEE decode step's graphs pass each other, from the manifest's I/O lists.

Both backends keep them in fixed buffers, one per value, bound to every graph that reads or
writes it once per request: a decode step then only writes its inputs (the token, the cache
length, the draft's candidates, the active predictors, the threshold) and runs the graphs.
"""

from __future__ import annotations

from pathlib import Path

from specee_compile.contract import ACTIVE_LAYERS, EXIT_THRESHOLD, INPUT_IDS, PAST, PAST_LENGTH, PRESENT
from specee_compile.errors import BundleError

CACHE_PREFIXES = (PAST, PRESENT)
STEP_INPUTS = (INPUT_IDS, PAST_LENGTH, ACTIVE_LAYERS, EXIT_THRESHOLD)  # fed by the runtime
ENGINE_DTYPES = ("float32", "int64", "bool")  # what TensorRT engines exchange (ONNX Runtime graphs add int32)


def exchange_buffers(segments: list[dict], draft: dict, bundle: Path | str = "the bundle",
                     dtypes=ENGINE_DTYPES) -> dict[str, tuple]:
    """name -> (shape, dtype) of every value the graphs of a decode step pass each other.

    From the manifest's I/O lists: the draft's ``draft_ids``, the step inputs the runtime
    feeds (``STEP_INPUTS``) and every segment output but the caches, at their decode-step
    shape (symbolic dimensions are 1). Segments run in manifest order, so a segment input
    must be a step input or an output of the draft or of an earlier segment, with the same
    shape and dtype; anything else is a damaged bundle.
    """
    buffers: dict[str, tuple] = {}

    def entry(v: dict) -> tuple:
        return tuple(d if isinstance(d, int) else 1 for d in v["shape"]), v["dtype"]

    def damaged(what: str) -> BundleError:
        return BundleError(f"{bundle}: {what}; the bundle is damaged or mixed from two compiles. Recompile it.")

    for v in draft["outputs"]:
        if not v["name"].startswith(CACHE_PREFIXES):
            buffers[v["name"]] = entry(v)
    for k, seg in enumerate(segments):
        for v in seg["inputs"]:
            name = v["name"]
            if name.startswith(CACHE_PREFIXES):
                continue
            if name in buffers:
                if buffers[name] != entry(v):
                    raise damaged(f"segment {k} reads '{name}' as {entry(v)}, but it is written as {buffers[name]}")
            elif name in STEP_INPUTS:
                buffers[name] = entry(v)
            else:
                raise damaged(f"segment {k} reads '{name}', which neither the runtime, the draft nor an earlier "
                              "segment provides")
        for v in seg["outputs"]:
            if v["name"].startswith(CACHE_PREFIXES):
                continue
            if v["name"] in buffers:
                raise damaged(f"segment {k} writes '{v['name']}', which an earlier graph or the runtime provides")
            buffers[v["name"]] = entry(v)
    for name, (_, dtype) in buffers.items():
        if dtype not in dtypes:
            raise damaged(f"'{name}' has dtype {dtype!r}; the graphs exchange {sorted(dtypes)}")
    return buffers
