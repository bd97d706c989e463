"""A bundle's default tree shape, chosen on the machine that compiles it.

Tree speculation's speed-up over the dense bundle is the tokens a target forward emits over
what that forward costs in dense steps. The first depends on the draft (how often its
candidates are the target's greedy tokens), the second on the weights and the CPU: verifying
more nodes costs little more with fp32 weights and much more with 4-bit ones (the kernels
stop being bound by weight reads). So the compiler measures both for the bundle at hand:

1. the dense step: the bundle's dense decode on held-out prompts, seconds per token;
2. the verification cost curve: one tree forward of 1, 2, ... nodes after the first prompt,
   the sizes timed in turn (:func:`timed_in_turn`, medians);
3. per candidate shape, tree speculation replayed on the dense decodes' text
   (``TreeDecoder.accepted_lengths``): tokens per forward (the draft's acceptance; lossless,
   so independent of the machine) and the draft's seconds per forward. The draft grows its
   trees for real; the target's verification is not run, since a lossless tree accepts the
   longest path that follows the dense text. On SmolLM2's bundle (4 prompts x 64 tokens, six
   shapes) the replay gave every shape's accepted lengths of the real decodes on 23 of 24
   prompt runs, the other differing in the forward that reached the end of text, in 0.7-1.4 s
   per shape where the real decodes took 11-18 s;

and predicts each candidate's speed-up as ``tokens_per_forward * dense / (draft +
verification(nodes))``, ``nodes`` being the shape's largest tree (root, budget, lookup). The
candidate with the highest prediction becomes the default, or the one with the fewest nodes
of those within ``TIE`` of it; every number goes to the manifest (``specee.tree.choice``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from specee_compile.errors import BundleError
from specee_compile.runtimes.speculation import TreeShape

# Shapes tried: the draft's top 1, 2 or 4 at depth 1, chains of 2 and a small two-level tree,
# each with 4 nodes of context lookup, and the lone top-1 without lookup.
CANDIDATES = ("1x1x1", "1x1x1+4", "2x1x2+4", "4x1x4+4", "1x2x2+4", "2x2x3+4")
CURVE_SIZES = (1, 2, 3, 4, 5, 8, 16)  # verification cost recorded at these sizes besides the candidates'
# Predictions this close to the best are a tie, which the smaller tree wins: SmolLM2's 1x1x1+4 and
# 2x2x3+4 measured 1.3964x and 1.3975x in one compile (6 and 8 nodes), 1.42x and 1.34x in another.
TIE = 0.02


def nodes(shape: TreeShape) -> int:
    """The most nodes a tree of ``shape`` verifies: the newest token, the budget and the lookup."""
    return 1 + shape.budget + shape.lookup


MAX_PROMPT_TOKENS = 512  # longer prompts are passed over (prefill time, not what is measured)


def choose_tree(bundle: str | Path, prompts: list[str], count: int = 4, new_tokens: int = 64, candidates=CANDIDATES,
                threads: int | None = None, progress: bool = False) -> dict:
    """Measure ``candidates`` on ``bundle`` (a SpecEE bundle compiled with ``--tree``) over
    the first ``count`` of ``prompts`` that fit and return the manifest's ``choice`` record,
    its ``shape`` the chosen one (None, with a ``reason``, when nothing could be measured)."""
    from specee_compile.runtimes import load

    tree = load(bundle, threads=threads, verify="none", tree=candidates[0])
    dense = load(bundle, threads=threads, verify="none", dense=True)
    shapes = [TreeShape.parse(c).check(tree.backend.max_width) for c in candidates]
    new_tokens = min(new_tokens, tree.capacity // 2)  # a small bundle's context holds the prompts too
    extra = max(map(nodes, shapes))  # known tokens past new_tokens: the last forward's, at most a tree's
    room = min(MAX_PROMPT_TOKENS, tree.capacity - new_tokens - 2 * extra)
    fits = [ids for ids in (tree.encode(p) for p in prompts) if len(ids) <= room][:count]
    if not fits:
        return {"shape": None, "reason": f"no prompt fits the bundle's context ({tree.capacity}) with "
                                         f"{new_tokens} new tokens"}
    bar = tqdm(total=len(shapes) + 2, desc="choose tree shape", unit="step", disable=not progress)
    runs = [dense.generate(ids, max_new_tokens=new_tokens + extra) for ids in fits]
    steps = [s for r in runs for s in r.step_seconds]
    bar.update()
    if not steps:
        bar.close()
        return {"shape": None, "reason": "the dense decode ended at once (end of text) on every prompt"}
    dense_step = statistics.median(steps)  # back to back, as a dense decode runs
    decoder = tree.decoder
    request = decoder.new_request()  # one request replays every text and shape
    texts = [decoder.known_features(request, ids, r.token_ids) for ids, r in zip(fits, runs)]
    sizes = sorted({*CURVE_SIZES, *map(nodes, shapes)} & set(range(1, tree.capacity - len(fits[0]) + 1)))
    _, curve = timed_in_turn(None, tree, fits[0], sizes)
    bar.update()
    rows = []
    for shape in shapes:
        decoder.configure(request, tree=shape)
        request.breakdown = {}
        accepted = [a for ids, (sequence, features) in zip(fits, texts)
                    for a in decoder.accepted_lengths(request, len(ids), sequence, features, new_tokens,
                                                      tree.eos_token_ids)]
        bar.update()
        if not accepted:
            continue
        tokens_per_forward = sum(accepted) / len(accepted)
        draft = request.breakdown.get("draft", 0.0) / len(accepted)
        verify = float(np.interp(nodes(shape), list(curve), list(curve.values())))
        rows.append({"shape": str(shape), "tokens_per_forward": round(tokens_per_forward, 4),
                     "draft_ms": round(1000 * draft, 4), "verify_ms": round(1000 * verify, 4),
                     "forward_cost": round((draft + verify) / dense_step, 4),
                     "predicted_speedup": round(tokens_per_forward * dense_step / (draft + verify), 4)})
    bar.close()
    if not rows:
        return {"shape": None, "reason": "tree speculation ended at once (end of text) on every prompt"}
    top = max(r["predicted_speedup"] for r in rows)
    # near the best, the fewest nodes: the curve is timed after one prompt, and a larger tree's
    # cost grows faster with the context (docs/benchmarks/tree-context)
    size = {str(shape): nodes(shape) for shape in shapes}
    best = min((r for r in rows if r["predicted_speedup"] >= (1 - TIE) * top),
               key=lambda r: (size[r["shape"]], -r["predicted_speedup"]))
    from specee_compile.runtimes.backends.ort import shared_pool

    pool = "shared" if shared_pool() else "per-session"
    return {"shape": best["shape"], "method": "highest predicted speed-up: tokens_per_forward * dense_step_ms / "
                                              "(draft_ms + verification_ms at the shape's most nodes), the fewest "
                                              f"nodes within {TIE:.0%} of it; tokens_per_forward replayed on the "
                                              "dense decodes' text",
            "prompts": len(fits), "new_tokens": new_tokens, "context": len(fits[0]), "thread_pool": pool,
            "dense_step_ms": round(1000 * dense_step, 4),
            "verification_ms": {str(k): round(1000 * v, 4) for k, v in curve.items()}, "candidates": rows}


def choose_tree_shared(bundle: str | Path, prompts: list[str], count: int = 4, new_tokens: int = 64,
                       candidates=CANDIDATES, threads: int | None = None, progress: bool = False) -> dict:
    """``choose_tree`` in a child process whose sessions all run in one shared ONNX Runtime
    thread pool, as ``specee-run`` and ``specee-bench`` run bundles by default. With a pool per
    session the tree engine's idle pools must sleep between ops while the dense engine's spin,
    which (SmolLM2, 2-core AMD EPYC, two runs of each) measured one tree forward at 1.12-1.17x
    the dense step where the shared pool gives 0.93-0.94x, and predicted each shape 0.1-0.25x
    slower. The shared pool is process-wide, so the compiler's own process is left as it was."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_choose_in_shared_pool, str(bundle), list(prompts), count, new_tokens, tuple(candidates),
                           threads, progress).result()


def _choose_in_shared_pool(bundle, prompts, count, new_tokens, candidates, threads, progress) -> dict:
    from specee_compile.runtimes import share_threads

    share_threads(threads)
    return choose_tree(bundle, prompts, count, new_tokens, candidates, threads, progress)


def timed_in_turn(dense, tree, ids: list[int], sizes, repeats: int = 10) -> tuple[float | None, dict[int, float]]:
    """Median seconds of a dense decode step (engine ``dense``; None: not timed) and of one tree
    forward of each size (engine ``tree``, star trees) after the prompt ``ids``, measured in
    turn: a dense step, then one forward of each size, ``repeats`` times after a round that
    warms up, so a slow spell of the machine weighs on all of them alike."""
    from specee_compile.runtimes.speculation import TokenTree

    rows = max(max(sizes), repeats + 1 if dense is not None else 0)  # the dense steps write a row each
    if len(ids) + rows > tree.capacity:
        raise BundleError(f"{len(ids)} prompt tokens leave too little room in the cache ({tree.capacity}) for trees of "
                          f"{max(sizes)} nodes" + (f" and {repeats + 1} dense steps." if dense is not None else "."))
    n = len(ids)
    tree_request = tree.decoder.new_request()
    root = tree.decoder.prefill(tree_request, ids)
    laps: dict = {k: [] for k in sizes}
    if dense is not None:
        dense_request = dense.decoder.new_request()
        token = dense.decoder.prefill(dense_request, ids)
        laps["dense"] = []
    for r in range(repeats + 1):
        if dense is not None:
            start = time.perf_counter()
            token = dense.decoder.step(dense_request, token, n + r).tokens[0]
            laps["dense"].append(time.perf_counter() - start)
        for k in sizes:
            star = TokenTree.star(root, [ids[i % n] for i in range(k - 1)])
            start = time.perf_counter()
            tree.decoder.verify(tree_request, star, n)
            laps[k].append(time.perf_counter() - start)
    medians = {k: statistics.median(v[1:]) for k, v in laps.items()}
    return medians.pop("dense", None), medians
