"""Record tests/golden/algorithms.json: what the package's decode-loop algorithms compute now.

examples/standalone_algorithms.py re-implements five algorithms of the package for an engine
without it (the exit schedule, K/V state propagation, the tree shape, the context lookup and
the token tree); tests/test_golden.py checks that both implementations reproduce this file.
The cases are small and chosen by hand (plus seeded random arrays for propagation), so a
reviewer can read the file.

    .venv/bin/python tests/golden/make_algorithms.py

Run it only when a change of these algorithms is intended, and review the diff of the JSON
file with that change: re-recording after an accidental change would hide it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The package's versions (update these imports if the modules move).
from specee_compile.errors import ConfigError
from specee_compile.runtimes.propagation import propagated_kv
from specee_compile.runtimes.tree import TokenTree, TreeShape, context_lookup
from specee_compile.schedule import Schedule

OUT = Path(__file__).resolve().parent / "algorithms.json"
SEED = 20240611


def schedule_cases() -> list[dict]:
    """(schedule, history) -> the active predictor layers, sorted."""
    online = {"num_layers": 8, "offline_layers": [1, 3], "history": 3, "offsets": [-2, 0, 2], "online": True}
    offline = {**online, "online": False}
    wide = {"num_layers": 30, "offline_layers": [4, 9, 17], "history": 5, "offsets": [-1, 0, 1], "online": True}
    cases = [
        ("no-history-uses-offline-layers", online, []),
        ("history-shorter-than-window-uses-offline-layers", online, [4, 7]),
        ("full-window-uses-exit-layers-plus-offsets", online, [4, 4, 5]),
        ("window-clipped-below-0-and-at-last-layer", online, [0, 7, 6]),
        ("only-the-newest-history-entries-count", online, [1, 1, 1, 5, 5, 3]),
        ("offline-schedule-ignores-history", offline, [2, 2, 2, 2]),
        ("empty-offline-layers-before-the-window", {**online, "offline_layers": []}, [5]),
        ("deep-model-window", wide, [12, 12, 29, 3, 0, 20]),
    ]
    return [{"name": name, "schedule": schedule, "history": history,
             "active": sorted(Schedule.from_dict(schedule).active(history))} for name, schedule, history in cases]


def floats(array: np.ndarray) -> list:
    """Nested lists of the shortest decimals that give back the same float32 values."""
    array = np.asarray(array, np.float32)
    if array.ndim == 0:
        return float(str(array[()]))
    return [floats(row) for row in array]


def propagation_cases() -> list[dict]:
    """Layer j's K (after its key norm and RoPE) and V [kv_heads, D] from the exit state h [d]:
    d = 8, 2 KV heads of dimension 4, weights drawn from a seeded generator (4 decimals). ``rotated``
    is how many of the 4 dimensions RoPE turns (0: none), ``k_norm`` the key norm's width (0: none),
    ``norm`` whether the layer has an input norm."""
    rng = np.random.default_rng(SEED)
    d, kv_heads, head_dim = 8, 2, 4
    cases = []
    for name, j, position, eps, bias, scale, rotated, k_norm, norm in [
            ("layer-without-biases", 1, 3, 1e-6, False, 1.0, 4, 0, True),
            ("layer-with-qkv-biases", 2, 17, 1e-5, True, 1.0, 4, 0, True),
            ("small-state-where-eps-matters", 5, 0, 1e-2, True, 1e-2, 4, 0, True),
            ("key-norm-per-head-half-rotated", 3, 9, 1e-6, False, 1.0, 2, head_dim, True),
            ("no-input-norm-key-norm-over-the-whole-key", 4, 6, 1e-6, False, 1.0, 4, kv_heads * head_dim, False),
            ("layer-without-rope", 2, 11, 1e-6, True, 1.0, 0, 0, True)]:
        def draw(*shape):
            return np.round(rng.standard_normal(shape), 4).astype(np.float32)

        def weight(n):
            return np.round(1.0 + 0.1 * rng.standard_normal(n), 4).astype(np.float32)

        kv = {f"{j}.norm": weight(d)} if norm else {}
        kv[f"{j}.k"], kv[f"{j}.v"] = draw(kv_heads * head_dim, d), draw(kv_heads * head_dim, d)
        if bias:
            kv[f"{j}.k_bias"], kv[f"{j}.v_bias"] = draw(kv_heads * head_dim), draw(kv_heads * head_dim)
        if k_norm:
            kv[f"{j}.k_norm"] = weight(k_norm)
        h = (draw(d) * scale).astype(np.float32)
        cos = sin = None
        if rotated:
            inv_freq = 1.0 / 10000.0 ** (np.arange(0, rotated, 2) / rotated)
            cos = np.round(np.cos(position * inv_freq), 6).astype(np.float32)  # [R/2]
            sin = np.round(np.sin(position * inv_freq), 6).astype(np.float32)
        k, v = propagated_kv(np, kv, j, h, cos, sin, eps, kv_heads)
        cases.append({"name": name, "j": j, "eps": eps, "kv_heads": kv_heads,
                      "kv": {key: floats(value) for key, value in kv.items()}, "h": floats(h),
                      "cos": None if cos is None else floats(cos), "sin": None if sin is None else floats(sin),
                      "k": floats(k), "v": floats(v)})
    return cases


def lookup_cases() -> list[dict]:
    """(context, length) -> the tokens that followed the latest earlier occurrence of the tail."""
    cases = [
        ("three-token-tail-repeats", [1, 2, 3, 9, 8, 1, 2, 3], 4),
        ("chain-cut-at-length", [1, 2, 3, 4, 5, 6, 1, 2, 3], 2),
        ("latest-earlier-occurrence-wins", [7, 1, 7, 2, 7, 3, 7], 2),
        ("falls-back-to-two-tokens", [5, 6, 1, 9, 6, 1], 3),
        ("falls-back-to-one-token", [4, 8, 2, 9, 3, 8], 3),
        ("one-token-match-gives-one-token", [4, 8, 2, 9, 3, 4, 6, 8], 4),
        ("two-token-match-gives-two-tokens", [7, 5, 6, 1, 2, 3, 9, 5, 6], 4),
        ("longest-tail-preferred-over-later-shorter", [1, 2, 3, 10, 11, 2, 3, 20, 1, 2, 3], 2),
        ("overlapping-run", [5, 5, 5, 5], 4),
        ("no-earlier-occurrence", [1, 2, 3, 4], 4),
        ("zero-length", [1, 2, 1, 2], 0),
        ("single-token-context", [42], 3),
        ("empty-context", [], 3),
    ]
    return [{"name": name, "context": context, "length": length, "chain": context_lookup(context, length)}
            for name, context, length in cases]


def shape_cases() -> dict:
    """Tree-shape strings -> (width, depth, budget, lookup, exits), and strings refused."""
    valid = ["4", "4x2x6", "4x2x6+3", "1+4", "1+4:exit", "2x2x3+4:exit", "1x1x1+4", "4:exit", " 3x3x6 ", "12x1x12+0"]
    invalid = ["", "x", "4x2", "4x2x", "4x2x6+", "4+", "+4", ":exit", "4:exits", "4x2x6:exit+3", "-1", "4.0",
               "4 x2x6", "4x2x6+3+1", "4X2X6", "a", "1+4 exit"]
    fields = ("width", "depth", "budget", "lookup", "exits")
    for text in invalid:
        try:
            TreeShape.parse(text)
        except ConfigError:
            continue
        raise SystemExit(f"the package accepts the tree shape {text!r}; it cannot be recorded as refused")
    return {"valid": [{"text": text, "shape": {f: getattr(TreeShape.parse(text), f) for f in fields}}
                      for text in valid],
            "invalid": invalid}


TREES = {  # tokens, parents, depths: node 0 is the newest token, parents before children
    "root-only": ([7], [-1], [0]),
    "star": ([10, 11, 12, 13], [-1, 0, 0, 0], [0, 1, 1, 1]),
    "deep": ([10, 20, 21, 30, 31, 40], [-1, 0, 0, 1, 1, 3], [0, 1, 1, 2, 2, 3]),
    "twin-siblings": ([10, 20, 20, 30], [-1, 0, 0, 2], [0, 1, 1, 2]),
}


def tree(name: str) -> TokenTree:
    tokens, parents, depths = TREES[name]
    return TokenTree(list(tokens), list(parents), list(depths))


def bias_cases() -> list[dict]:
    """(tree, past) -> the bias shape and, per node, the columns it sees (bias 0; the rest -1e9)."""
    cases = []
    for name, past in [("root-only", 5), ("star", 0), ("star", 2), ("deep", 3), ("twin-siblings", 1)]:
        bias = tree(name).bias(past)
        visible = [[int(c) for c in np.flatnonzero(row == 0.0)] for row in bias[0, 0]]
        if not np.all((bias == 0.0) | (bias == -1e9)):
            raise SystemExit(f"the bias of tree {name} holds values other than 0 and -1e9")
        cases.append({"name": f"{name}-after-{past}", "tree": name, "past": past, "shape": list(bias.shape),
                      "visible": visible})
    return cases


def accepted_cases() -> list[dict]:
    """(tree, each node's chosen token, optional settled flags) -> the accepted path or None."""
    T, F = True, False
    cases = [
        ("walks-to-a-leaf", "deep", [20, 30, 0, 40, 0, 99], None),
        ("stops-where-no-child-holds-the-token", "deep", [20, 31, 0, 0, 0, 0], None),
        ("root-token-not-drafted", "deep", [99, 30, 0, 40, 0, 0], None),
        ("second-branch", "deep", [21, 0, 5, 0, 0, 0], None),
        ("root-only-accepts-nothing", "root-only", [8], None),
        ("first-of-twin-siblings", "twin-siblings", [20, 30, 30, 1], None),
        ("star-child", "star", [13, 0, 0, 0], None),
        ("settled-along-the-whole-walk", "deep", [20, 30, 0, 40, 0, 99], [T, T, F, T, F, T]),
        ("unsettled-node-on-the-walk", "deep", [20, 30, 0, 40, 0, 99], [T, T, F, F, F, T]),
        ("unsettled-last-node", "deep", [20, 30, 0, 40, 0, 99], [T, T, T, T, T, F]),
        ("unsettled-root", "deep", [20, 30, 0, 40, 0, 99], [F, T, T, T, T, T]),
        ("settled-root-without-matching-child", "star", [99, 0, 0, 0], [T, F, F, F]),
    ]
    out = []
    for name, tree_name, choice, settled in cases:
        flags = None if settled is None else np.array(settled)
        path = tree(tree_name).accepted(np.array(choice, np.int64), flags)
        out.append({"name": name, "tree": tree_name, "choice": choice, "settled": settled, "path": path})
    return out


def chain_cases() -> list[dict]:
    """(tree, chain) -> the tree after merging the chain from the root."""
    cases = [
        ("follows-a-drafted-node-then-appends", "star", [11, 50, 51]),
        ("follows-a-whole-branch-then-appends", "deep", [20, 30, 40, 41]),
        ("appends-under-the-second-branch", "deep", [21, 21]),
        ("fully-drafted-chain-adds-nothing", "deep", [20, 31]),
        ("empty-chain", "deep", []),
        ("chain-from-a-lone-root", "root-only", [1, 2, 1]),
        ("first-twin-followed", "twin-siblings", [20, 30]),
    ]
    out = []
    for name, tree_name, chain in cases:
        t = tree(tree_name)
        t.add_chain(list(chain))
        out.append({"name": name, "tree": tree_name, "chain": chain,
                    "after": {"tokens": t.tokens, "parents": t.parents, "depths": t.depths}})
    return out


def dumps(value, indent: str = "") -> str:
    """JSON with what fits in a line (a case's schedule, a matrix row) on one line, the rest indented."""
    inner = indent + "  "
    if len(indent) + len(json.dumps(value)) <= 100:
        return json.dumps(value)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def main() -> None:
    golden = {
        "about": "Recorded by tests/golden/make_algorithms.py from the package; tests/test_golden.py checks that "
                 "the package and examples/standalone_algorithms.py both reproduce it. Re-record only for an "
                 "intended, reviewed change.",
        "schedule": schedule_cases(),
        "propagation": propagation_cases(),
        "context_lookup": lookup_cases(),
        "tree_shape": shape_cases(),
        "token_tree": {"hidden": -1e9, "trees": {name: {"tokens": t, "parents": p, "depths": d}
                                                 for name, (t, p, d) in TREES.items()},
                       "bias": bias_cases(), "accepted": accepted_cases(), "add_chain": chain_cases()},
    }
    OUT.write_text(dumps(golden) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
