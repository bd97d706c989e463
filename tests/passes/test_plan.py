"""One pipeline per graph family: listing, skipping by family, dumps, the onnx_ir contract."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from specee_compile import cli
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.contract import FAMILIES
from specee_compile.errors import PassError
from specee_compile.passes import InsertEarlyExitPass, InsertPredictorsPass, Pipeline, default_plan
from specee_compile.passes.conditions import Unmet
from tests.passes.test_pipeline import RenamePass, _model


def test_list_passes_shows_every_family_the_options_emit(capsys):
    assert cli.compile_main(["--list-passes", "--specee", "--tree"]) == 0
    out = capsys.readouterr().out
    for family in FAMILIES:
        assert f"{family}: {FAMILIES[family]}" in out
    assert out.count("insert_predictors") == 2 and "draft: the draft head's step\n  (no passes)" in out
    assert cli.compile_main(["--list-passes"]) == 0
    assert "decode:" not in capsys.readouterr().out


def test_a_qualified_skip_names_one_family_and_unknown_names_list_the_passes():
    plan = default_plan("O1", "ort", specee=True)
    plan.check_skip(("fuse_ort_transformers", "segments:fuse_ort_transformers", "decode:fuse_draft_gathers"))
    with pytest.raises(PassError, match="cannot skip unknown pass.*'draft:fuse_ort_transformers'.*FAMILY:NAME"):
        plan.check_skip(("draft:fuse_ort_transformers",))
    # (a plan listed without a calibration holds fuse_draft_input without weights, as the SpecEE passes)
    _, log = plan.run("step", _model(), skip=("segments:fuse_ort_transformers", "step:fuse_draft_input"))
    assert log == [{"graph": "step", "phase": "specee", "pass": "fuse_draft_input", "skipped": True},
                   {"graph": "step", "phase": "optimize", "pass": "fuse_ort_transformers", "modified": False}]
    _, log = plan.run("segments", _model(), skip=("segments:fuse_ort_transformers",), part=3)
    assert log == [{"graph": "segments", "part": 3, "phase": "optimize", "pass": "fuse_ort_transformers",
                    "skipped": True}]


def test_a_pipeline_is_an_onnx_ir_pass_and_nests():
    inner = Pipeline({"canonicalize": [RenamePass(new_name="inner")]}, name="inner_pipeline")
    outer = Pipeline({"finalize": [inner]})
    result = ir.passes.Sequential(outer)(_model())
    assert isinstance(result, ir.passes.PassResult) and result.modified and result.model.graph.name == "inner"
    assert not Pipeline()(_model()).modified


def test_specee_passes_state_their_preconditions():
    model = _model()  # a Relu: no decoder layers
    with pytest.raises(Unmet, match="insert_predictors first") as info:
        InsertEarlyExitPass()(_tiny_decoder_without_predictors())
    assert isinstance(info.value, ir.passes.PreconditionError) and isinstance(info.value, PassError)
    with pytest.raises(Unmet, match="layers.{i}.output"):
        InsertPredictorsPass(layers=(0,))(model)
    with pytest.raises(PassError, match=r"insert_predictors: .*passes that ran before 'insert_predictors': none"):
        Pipeline({"specee": [InsertPredictorsPass(layers=(0,))]}).run(model)


def _tiny_decoder_without_predictors() -> ir.Model:
    from specee_compile.export import export_step
    from specee_compile.testing import make_tiny_model

    return export_step(make_tiny_model("llama"), 16)[0]


def test_dump_ir_and_user_passes_reach_every_family_of_a_specee_compile(tiny_dirs, tiny_llama_calibration, tmp_path):
    seen = []

    def edit(plan):
        for family in plan.pipelines:
            plan[family].append("finalize", RenamePass(name=f"rename_{family}", new_name=family))
        seen.append(sorted(plan.pipelines))

    out = compile_bundle(CompileConfig(
        model=str(tiny_dirs["llama"]), out=tmp_path / "b.onnx", max_context=64, specee=True, tree=True,
        calibration=tiny_llama_calibration, pipeline=edit, dump_ir=tmp_path / "ir",
        skip_passes=("tree_segments:fuse_ort_transformers",)), progress=False)
    assert seen[-1] == sorted(FAMILIES)
    assert ir.load(out / "specee" / "draft.onnx").graph.name == "draft"
    assert ir.load(out / "specee" / "segment_0.onnx").graph.name == "segments"
    assert ir.load(out / "specee" / "tree_segment_1.onnx").graph.name == "tree_segments"
    for family in ("step", "decode", "draft", "tree", "tree_decode", "draft_tree"):
        assert (tmp_path / "ir" / family / "05-finalize.txt").is_file(), family
    assert (tmp_path / "ir" / "segments" / "00" / "03-optimize.txt").is_file()
    from specee_compile.bundle import read_manifest

    passes = read_manifest(out)["passes"]
    skipped = {(e["graph"], e["pass"]) for e in passes if e.get("skipped")}
    assert skipped == {("tree_segments", "fuse_ort_transformers")}
    assert ("segments", "fuse_ort_transformers") in {(e["graph"], e["pass"]) for e in passes if e.get("modified")}
