"""Hostile manifests: fields in range, the SpecEE and tree sections included.

Each case is a field a compiled bundle would never hold; loading must fail with a
BundleError naming the manifest and the field, never a KeyError, IndexError, ValueError or
MemoryError from deep inside a runtime.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specee_compile.bundle import MANIFEST
from specee_compile.errors import BundleError
from specee_compile.runtimes import load
from tests.conftest import mutate_json

CASES = {
    "negative-heads": (lambda m: m["model"].update(num_heads=-4), "model.num_heads"),
    "zero-kv-heads": (lambda m: m["model"].update(num_kv_heads=0), "model.num_kv_heads"),
    "absurd-capacity": (lambda m: m["cache"].update(capacity=1 << 40), "cache.capacity"),
    "eos-past-vocab": (lambda m: m["model"].update(eos_token_ids=[10**9]), "model.eos_token_ids"),
    "bool-layers": (lambda m: m["model"].update(num_layers=True), "model.num_layers"),
    "empty-segments": (lambda m: m["specee"].update(segments=[]), "specee.segments"),
    "segments-miss-a-layer": (lambda m: m["specee"].update(segments=m["specee"]["segments"][:-1]), "last_layer"),
    "segment-overlap": (lambda m: m["specee"]["segments"][1].update(first_layer=0), "specee.segments.1.first_layer"),
    "exit-layer-past-model": (lambda m: m["specee"]["segments"][0].update(exit_layer=99), "exit_layer"),
    "exit-layer-without-predictor": (lambda m: m["specee"].update(predictor_layers=[]), "exit_layer"),
    "predictor-past-model": (lambda m: m["specee"].update(predictor_layers=[0, 7]), "specee.predictor_layers"),
    "threshold-nan": (lambda m: m["specee"].update(threshold=float("nan")), "specee.threshold"),
    "threshold-above-one": (lambda m: m["specee"].update(threshold=3), "specee.threshold"),
    "unknown-rule": (lambda m: m["specee"].update(rule="oracle"), "specee.rule"),
    "unknown-exit-mode": (lambda m: m["specee"].update(exit_mode="magic"), "specee.exit_mode"),
    "schedule-of-another-model": (lambda m: m["specee"]["schedule"].update(num_layers=30), "specee.schedule.num_layers"),
    "huge-history": (lambda m: m["specee"]["schedule"].update(history=10**9), "specee.schedule.history"),
    "draft-vocab-past-model": (lambda m: m["specee"]["draft"].update(vocab_size=10**6), "specee.draft.vocab_size"),
    "fusion-layer-past-model": (lambda m: m["specee"]["draft"].update(fusion_layers=[2, 99]),
                                "specee.draft.fusion_layers"),
    "negative-eps": (lambda m: m["specee"]["kv_fill"].update(eps=-1), "specee.kv_fill.eps"),
    "tree-width-zero": (lambda m: m["specee"]["tree"].update(max_width=0), "specee.tree.max_width"),
    "tree-segments-empty": (lambda m: m["specee"]["tree"].update(segments=[]), "specee.tree.segments"),
    "tree-default-too-wide": (lambda m: m["specee"]["tree"].update(default_shape="99"), "specee.tree.default_shape"),
    "tree-default-not-a-shape": (lambda m: m["specee"]["tree"].update(default_shape=["1"]),
                                 "specee.tree.default_shape"),
    "tree-without-draft": (lambda m: m["specee"]["tree"].pop("draft"), "specee.tree.draft"),
    "io-shape-a-number": (lambda m: m["specee"]["tree"]["inputs"][0].update(shape=1), "specee.tree.inputs.0.shape"),
    "io-dtype-a-list": (lambda m: m["graphs"]["step"]["outputs"][0].update(dtype=[]), "graphs.step.outputs.0.dtype"),
}


@pytest.fixture(scope="module")
def hostile(tiny_specee_bundle, tmp_path_factory):
    """(a private copy of the tiny SpecEE tree bundle, its original manifest)."""
    copy_dir = tmp_path_factory.mktemp("ranges") / "s.onnx"
    shutil.copytree(tiny_specee_bundle, copy_dir)
    return copy_dir, json.loads((copy_dir / MANIFEST).read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_range_field_raises_naming_manifest_and_field(hostile, case):
    bundle, original = hostile
    change, field = CASES[case]
    manifest = copy.deepcopy(original)
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re.escape(field)) as e:
        load(bundle, verify=False, tree=True)
    assert str(bundle / MANIFEST) in str(e.value)


# Numbers and strings a compiler never writes there.
ODD_VALUES = st.integers(-(2**40), 2**40) | st.floats() | st.sampled_from(["", "../x", [], {}])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_in_the_specee_section_loads_and_decodes_or_raises_bundle_error(hostile, data):
    bundle, original = hostile
    manifest = copy.deepcopy(original)
    mutate_json(data.draw, manifest["specee"], ODD_VALUES, delete=False)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    try:
        engine = load(bundle, verify=False, tree=data.draw(st.sampled_from([None, "2x1x2", "1+2:exit"])))
    except BundleError as e:
        assert str(bundle) in str(e)
        return
    result = engine.generate([1, 5, 6], max_new_tokens=3)
    assert len(result.token_ids) <= 3
