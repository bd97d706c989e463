"""The package and the standalone example reproduce the same recorded algorithm outputs.

examples/standalone_algorithms.py re-implements, without this package, the exit schedule,
K/V state propagation, the tree shape, the context lookup and the token tree. Every case of
tests/golden/algorithms.json (written by tests/golden/make_algorithms.py) runs through both
implementations, so a change to either that alters a recorded output fails here; a change
meant to alter them is re-recorded and reviewed with its diff.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

# The package's versions (update these imports if the modules move).
from specee_compile.errors import ConfigError
from specee_compile.runtimes.propagation import propagated_kv
from specee_compile.runtimes.tree import TokenTree, TreeShape, context_lookup
from specee_compile.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "examples" / "standalone_algorithms.py"
GOLDEN = json.loads((ROOT / "tests" / "golden" / "algorithms.json").read_text())
TREES = GOLDEN["token_tree"]["trees"]
IMPLEMENTATIONS = ["package", "standalone"]


def _load_standalone():
    """examples/standalone_algorithms.py loaded from its path, as its own module."""
    spec = importlib.util.spec_from_file_location("golden_standalone_algorithms", ALGORITHMS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


standalone = _load_standalone()


def _cases(section: list[dict]):
    return [pytest.param(case, id=case["name"]) for case in section]


def _tree(implementation: str, name: str):
    t = TREES[name]
    kind = TokenTree if implementation == "package" else standalone.TokenTree
    return kind(list(t["tokens"]), list(t["parents"]), list(t["depths"]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _cases(GOLDEN["schedule"]))
def test_schedule_activates_the_recorded_layers_for_the_exit_history(implementation, case):
    if implementation == "package":
        active = Schedule.from_dict(case["schedule"]).active(case["history"])
    else:
        active = standalone.scheduled_layers(case["schedule"], case["history"])
    assert sorted(active) == case["active"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _cases(GOLDEN["propagation"]))
def test_propagation_gives_the_recorded_keys_and_values(implementation, case):
    kv = {name: np.array(value, np.float32) for name, value in case["kv"].items()}
    h, cos, sin = (None if case[name] is None else np.array(case[name], np.float32) for name in ("h", "cos", "sin"))
    args = (kv, case["j"], h, cos, sin, case["eps"], case["kv_heads"])
    k, v = propagated_kv(np, *args) if implementation == "package" else standalone.propagated_kv(*args)
    np.testing.assert_allclose(k, np.array(case["k"], np.float32), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, np.array(case["v"], np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _cases(GOLDEN["context_lookup"]))
def test_context_lookup_returns_the_recorded_chain(implementation, case):
    lookup = context_lookup if implementation == "package" else standalone.lookup_chain
    assert [int(t) for t in lookup(list(case["context"]), case["length"])] == case["chain"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c["text"]) for c in GOLDEN["tree_shape"]["valid"]])
def test_valid_tree_shape_parses_to_the_recorded_fields(implementation, case):
    parse = TreeShape.parse if implementation == "package" else standalone.parse_shape
    shape = parse(case["text"])
    assert {field: getattr(shape, field) for field in case["shape"]} == case["shape"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("text", GOLDEN["tree_shape"]["invalid"])
def test_malformed_tree_shape_is_refused(implementation, text):
    parse, error = (TreeShape.parse, ConfigError) if implementation == "package" else (standalone.parse_shape,
                                                                                        ValueError)
    with pytest.raises(error, match="WIDTHxDEPTHxBUDGET"):
        parse(text)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _cases(GOLDEN["token_tree"]["bias"]))
def test_tree_bias_hides_every_column_but_the_recorded_ones(implementation, case):
    bias = _tree(implementation, case["tree"]).bias(case["past"])
    want = np.full(case["shape"], GOLDEN["token_tree"]["hidden"], np.float32)
    for node, columns in enumerate(case["visible"]):
        want[0, 0, node, columns] = 0.0
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias, want)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _cases(GOLDEN["token_tree"]["accepted"]))
def test_accepted_path_is_the_recorded_one(implementation, case):
    settled = None if case["settled"] is None else np.array(case["settled"])
    path = _tree(implementation, case["tree"]).accepted(np.array(case["choice"], np.int64), settled)
    assert path == case["path"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _cases(GOLDEN["token_tree"]["add_chain"]))
def test_adding_a_lookup_chain_gives_the_recorded_tree(implementation, case):
    tree = _tree(implementation, case["tree"])
    tree.add_chain(list(case["chain"]))
    assert {"tokens": tree.tokens, "parents": tree.parents, "depths": tree.depths} == case["after"]


def test_recording_covers_settled_and_unsettled_walks_and_refused_shapes():
    accepted = GOLDEN["token_tree"]["accepted"]
    assert any(c["settled"] is None for c in accepted) and any(c["settled"] is not None for c in accepted)
    assert any(c["path"] is None for c in accepted) and GOLDEN["tree_shape"]["invalid"]
    assert all(GOLDEN[section] for section in ("schedule", "propagation", "context_lookup"))


def test_standalone_example_uses_the_checked_algorithms_and_no_copy_of_them():
    """examples/standalone_ort.py imports these pieces from the checked module and defines
    none of them itself; the checked module imports neither the package nor torch."""
    checked = {"scheduled_layers", "propagated_kv", "parse_shape", "lookup_chain", "TokenTree"}
    script = ast.parse((ROOT / "examples" / "standalone_ort.py").read_text())
    imported = {alias.name for node in ast.walk(script) if isinstance(node, ast.ImportFrom)
                and node.module == "standalone_algorithms" for alias in node.names}
    defined = {node.name for node in ast.walk(script) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert checked <= imported and not checked & defined
    modules = {alias.name.split(".")[0] for node in ast.walk(ast.parse(ALGORITHMS.read_text()))
               if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(ast.parse(ALGORITHMS.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module}
    assert modules - set(sys.stdlib_module_names) == {"numpy"}
