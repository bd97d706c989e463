"""InsertPredictorsPass and FuseDraftGathersPass on tiny exported models, against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from specee_compile.predictor import PredictorBank, candidate_features
from specee_compile.errors import PassError
from specee_compile.export import export_step
from specee_compile.passes.fuse_draft_gathers import FuseDraftGathersPass
from specee_compile.passes.insert_predictors import ROLE, InsertPredictorsPass
from specee_compile.testing import FAMILIES, make_tiny_model

CAP = 32
IDS = [1, 5, 9, 33]
DRAFT = np.array([3, 9, 44, 100], np.int64)


def _bank(L):
    torch.manual_seed(0)
    bank = PredictorBank(L, hidden=16)
    with torch.no_grad():
        bank.b2.fill_(0.3)
    return bank


def _pass(bank, layers):
    arrays = {k: v.detach().numpy() for k, v in bank.state_dict().items()}
    return InsertPredictorsPass(layers=layers, **arrays)


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _run(sess, L, active):
    feeds = {f"past_key_values.{i}.{k}": np.zeros((1, 2, CAP, 16), np.float32) for i in range(L) for k in ("key", "value")}
    feeds.update(input_ids=np.array([IDS]), past_sequence_length=np.array([0]), draft_ids=DRAFT,
                 active_layers=np.array(active))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _reference(model, bank, layers, active):
    with torch.no_grad():
        hs = model.model(torch.tensor([IDS]), output_hidden_states=True).hidden_states
        rows = model.lm_head.weight[torch.tensor(DRAFT)]
        prev, out = None, {}
        for i in layers:
            if not active[i]:
                out[i] = 0.0
                continue
            feats, prev = candidate_features(model.model.norm(hs[i + 1][0, -1]), rows, prev)
            out[i] = bank.score(i, feats).item()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_predictor_scores_match_pytorch_for_every_active_mask(family):
    torch_model = make_tiny_model(family)
    model, shapes = export_step(torch_model, CAP)
    bank = _bank(shapes.num_layers)
    result = _pass(bank, (0, 1))(model)
    assert result.modified
    sess = _session(result.model)
    for active in ([True, True, True], [False, True, True], [True, False, True], [False, False, False]):
        got = _run(sess, shapes.num_layers, active)
        ref = _reference(torch_model, bank, (0, 1), active)
        for i in (0, 1):
            assert got[f"exit_score.{i}"].shape == (1,)
            assert got[f"exit_score.{i}"][0] == pytest.approx(ref[i], abs=1e-5), (active, i)


def test_predictor_work_lives_inside_the_gated_branch():
    model, shapes = export_step(make_tiny_model("llama"), CAP)
    _pass(_bank(shapes.num_layers), (1,))(model)
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert [n.name for n in ifs] == ["predictor.1"]
    main_roles = {n.metadata_props.get(ROLE) for n in model.graph}
    assert "candidate_logits" not in main_roles  # nothing of the predictor runs when inactive
    inner = {n.metadata_props.get(ROLE) for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    assert {"candidate_logits", "draft_rows", "norm_weight"} <= inner
    assert [v.name for v in model.graph.inputs][-2:] == ["draft_ids", "active_layers"]


@pytest.mark.parametrize("layers", [(2,), (5,), (-1,), ()])
def test_predictor_layer_out_of_range_raises(layers):
    model, shapes = export_step(make_tiny_model("llama"), CAP)
    with pytest.raises(PassError, match=r"insert_predictors: predictor layers .* must be in \[0, 1\]"):
        _pass(_bank(shapes.num_layers), layers)(model)


def test_graph_without_layer_names_raises():
    graph = ir.Graph([], [], nodes=[], name="empty")
    with pytest.raises(PassError, match="layers.{i}.output"):
        _pass(_bank(3), (0,))(ir.Model(graph, ir_version=10))


def test_fused_gathers_share_one_gather_and_keep_outputs():
    torch_model = make_tiny_model("qwen2")
    model, shapes = export_step(torch_model, CAP)
    _pass(_bank(shapes.num_layers), (0, 1))(model)
    before = _session(model)

    def draft_gathers(where):
        return [n for n in where if n.op_type == "Gather" and n.inputs[1] is not None
                and n.inputs[1].name == "draft_ids"]

    assert len(draft_gathers(ir.traversal.RecursiveGraphIterator(model.graph))) == 2
    assert draft_gathers(model.graph) == []
    fuse = FuseDraftGathersPass()
    result = fuse(model)
    assert result.modified and fuse.fired == {"draft_gathers": 2}
    assert len(draft_gathers(model.graph)) == 1
    assert len(draft_gathers(ir.traversal.RecursiveGraphIterator(model.graph))) == 1
    assert not [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
                if n.metadata_props.get(ROLE) == "norm_weight"]
    after = _session(model)
    for active in ([True, True, True], [False, True, True]):
        a, b = _run(before, shapes.num_layers, active), _run(after, shapes.num_layers, active)
        for name in a:
            np.testing.assert_allclose(b[name], a[name], atol=1e-6, err_msg=name)


def test_fusing_a_graph_without_predictors_changes_nothing():
    model, _ = export_step(make_tiny_model("llama"), CAP)
    fuse = FuseDraftGathersPass()
    assert not fuse(model).modified and fuse.fired == {}
