"""The pass pipeline: editing by name, errors naming passes, skipping, IR dumps."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from specee_compile.errors import PassError
from specee_compile.passes import FuseOrtTransformersPass, Pipeline, default_pipeline


def _model() -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@dataclasses.dataclass
class RenamePass(ir.passes.InPlacePass):
    """Rename the graph (a stand-in user pass)."""

    name: str = "rename_graph"
    new_name: str = "renamed"

    def call(self, model):
        modified = model.graph.name != self.new_name
        model.graph.name = self.new_name
        return ir.passes.PassResult(model, modified)


class Boom(ir.passes.InPlacePass):
    name = "boom"

    def call(self, model):
        raise RuntimeError("kaput")


def test_insert_after_remove_and_replace_by_name():
    p = default_pipeline("O1")
    p.insert_after("fuse_ort_transformers", RenamePass())
    assert p.names() == ["fuse_ort_transformers", "rename_graph"]
    p.replace("rename_graph", RenamePass(new_name="other"))
    p.insert_before("fuse_ort_transformers", RenamePass(name="first"))
    assert p.names() == ["first", "fuse_ort_transformers", "rename_graph"]
    p.remove("first")
    assert p.names() == ["fuse_ort_transformers", "rename_graph"]


def test_unknown_pass_name_lists_the_valid_ones():
    with pytest.raises(PassError, match="no pass named 'nope'; the passes are: fuse_ort_transformers"):
        default_pipeline().remove("nope")


def test_unknown_phase_lists_the_phases():
    with pytest.raises(PassError, match="canonicalize, specee, optimize, quantize, finalize"):
        Pipeline().append("later", RenamePass())


def test_duplicate_or_missing_name_is_refused():
    p = Pipeline().append("finalize", RenamePass())
    with pytest.raises(PassError, match="already in the pipeline"):
        p.append("finalize", RenamePass())
    with pytest.raises(PassError, match="has no name"):
        p.append("finalize", object())


def test_failing_pass_is_named_with_the_passes_before_it():
    p = Pipeline({"canonicalize": [RenamePass()], "finalize": [Boom()]})
    with pytest.raises(PassError, match=r"pass 'boom' failed .*before it: rename_graph"):
        p.run(_model())


def test_run_logs_modified_honestly_and_skips_by_name():
    p = Pipeline({"canonicalize": [RenamePass()], "optimize": [FuseOrtTransformersPass()]})
    model, log = p.run(_model())
    assert model.graph.name == "renamed"
    assert log == [{"phase": "canonicalize", "pass": "rename_graph", "modified": True},
                   {"phase": "optimize", "pass": "fuse_ort_transformers", "modified": False}]
    _, log = p.run(_model(), skip=("rename_graph",))
    assert log[0] == {"phase": "canonicalize", "pass": "rename_graph", "skipped": True}
    with pytest.raises(PassError, match="cannot skip unknown"):
        p.run(_model(), skip=("other",))


def test_dump_ir_writes_one_file_per_phase(tmp_path):
    Pipeline({"canonicalize": [RenamePass()]}).run(_model(), dump_dir=tmp_path / "ir")
    files = sorted(f.name for f in (tmp_path / "ir").iterdir())
    assert files == ["00-exported.txt", "01-canonicalize.txt", "02-specee.txt", "03-optimize.txt", "04-quantize.txt", "05-finalize.txt"]
    assert "Relu" in (tmp_path / "ir" / "01-canonicalize.txt").read_text()


def test_list_passes_prints_the_pipeline(capsys):
    from specee_compile import cli

    assert cli.compile_main(["--list-passes"]) == 0
    out = capsys.readouterr().out
    assert "optimize:" in out and "fuse_ort_transformers" in out
