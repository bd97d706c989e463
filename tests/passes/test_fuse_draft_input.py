"""FuseDraftInputPass on a tiny exported model: the graph's features and exit features are
what the fusion draft computes from the layers in PyTorch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft
from specee_compile.contract import FEATURES, exit_feature, exit_flag
from specee_compile.errors import PassError
from specee_compile.export import export_step
from specee_compile.passes.fuse_draft_input import FuseDraftInputPass
from specee_compile.passes.insert_early_exit import InsertEarlyExitPass
from specee_compile.passes.insert_predictors import InsertPredictorsPass
from specee_compile.predictor import PredictorBank
from specee_compile.testing import TINY_VOCAB, make_tiny_model

CAP = 32
IDS = [1, 5, 9, 33, 70]


@pytest.fixture(scope="module")
def setup():
    target = make_tiny_model("llama")
    draft = EagleDraft(target, torch.arange(TINY_VOCAB), fusion=True)
    torch.manual_seed(0)
    with torch.no_grad():
        draft.fuse.weight.normal_(0, 0.2)  # every slot counts
        bank = PredictorBank(3, hidden=16)
        bank.b2.fill_(3.0)  # confident predictors: every active exit fires
    return target, draft, bank


def _run(model, shapes, draft_ids):
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {f"past_key_values.{i}.{k}": np.zeros((1, 2, CAP, 16), np.float32)
             for i in range(shapes.num_layers) for k in ("key", "value")}
    feeds.update(input_ids=np.array([IDS]), past_sequence_length=np.array([0]))
    names = {i.name for i in sess.get_inputs()}
    if "draft_ids" in names:
        feeds.update(draft_ids=draft_ids, active_layers=np.array([True, True, True]),
                     exit_threshold=np.array([0.5], np.float32))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_features_of_every_position_are_the_drafts_fused_input(setup):
    target, draft, _ = setup
    model, shapes = export_step(target, CAP)
    FuseDraftInputPass(draft.fusion, draft.fuse.weight.detach().numpy())(model)
    got = _run(model, shapes, None)
    z = target_pass(target, IDS).z  # [L, S, d]
    with torch.no_grad():
        want = draft.inputs(z, z.shape[0] - 1)
    np.testing.assert_allclose(got[FEATURES][0], want.numpy(), rtol=1e-4, atol=1e-4)


def test_an_exit_hands_over_its_fused_feature_shallow_exits_filling_the_deeper_slots(setup):
    target, draft, bank = setup
    model, shapes = export_step(target, CAP)
    InsertPredictorsPass(layers=(0, 1), **{k: v.detach().numpy() for k, v in bank.state_dict().items()})(model)
    InsertEarlyExitPass(rule="draft")(model)  # the draft-only rule: a firing predictor exits
    FuseDraftInputPass(draft.fusion, draft.fuse.weight.detach().numpy())(model)
    got = _run(model, shapes, np.array([3, 4, 5, 6], np.int64))
    z = target_pass(target, IDS).z[:, -1:]  # [L, 1, d]: the last position
    assert draft.fusion == (0, 1)
    with torch.no_grad():
        for layer in (0, 1):  # layer 0 exits above the middle slot's layer
            assert bool(got[exit_flag(layer)][0])
            np.testing.assert_allclose(got[exit_feature(layer)].reshape(-1), draft.inputs(z, layer)[0].numpy(),
                                       rtol=1e-4, atol=1e-4)
            normed = {i: z[i, 0] for i in range(layer + 1)}
            torch.testing.assert_close(draft.handed(normed, layer), draft.inputs(z, layer)[0])


def test_a_weight_of_another_model_is_refused(setup):
    target, draft, _ = setup
    model, _ = export_step(target, CAP)
    with pytest.raises(PassError, match="belongs to a draft of another model"):
        FuseDraftInputPass((0, 1), np.zeros((8, 24), np.float32))(model)
