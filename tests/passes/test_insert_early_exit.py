"""InsertEarlyExitPass on tiny exported models: flags, tokens and features equal the reference rule."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from specee_compile.predictor import PredictorBank
from specee_compile.errors import PassError
from specee_compile.export import export_step
from specee_compile.passes.fuse_draft_gathers import FuseDraftGathersPass
from specee_compile.passes.insert_early_exit import InsertEarlyExitPass
from specee_compile.passes.insert_predictors import InsertPredictorsPass
from specee_compile.reference import DecodeSettings, exit_decision
from specee_compile.testing import TINY_VOCAB, make_tiny_model

CAP = 32
IDS = [1, 5, 9, 33]
VOCAB = np.arange(0, TINY_VOCAB, 2, dtype=np.int64)  # a reduced vocabulary: the even ids


def _graph(torch_model, bank, rule, fuse):
    model, shapes = export_step(torch_model, CAP)
    arrays = {k: v.detach().numpy() for k, v in bank.state_dict().items()}
    InsertPredictorsPass(layers=(0, 1), **arrays)(model)
    InsertEarlyExitPass(rule=rule, vocab_map=VOCAB)(model)
    if fuse:
        FuseDraftGathersPass()(model)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess, shapes


def _run(sess, shapes, draft_ids, active, threshold=0.5):
    feeds = {f"past_key_values.{i}.{k}": np.zeros((1, 2, CAP, 16), np.float32)
             for i in range(shapes.num_layers) for k in ("key", "value")}
    feeds.update(input_ids=np.array([IDS]), past_sequence_length=np.array([0]), draft_ids=draft_ids,
                 active_layers=np.array(active), exit_threshold=np.array([threshold], np.float32))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("rule", ["full", "reduced", "draft"])
@pytest.mark.parametrize("fuse", [False, True])
def test_exit_outputs_equal_the_reference_decision(rule, fuse):
    torch_model = make_tiny_model("llama")
    torch.manual_seed(0)
    bank = PredictorBank(3, hidden=16)
    with torch.no_grad():
        bank.b2.fill_(3.0)  # confident predictors, so the rule decides
    sess, shapes = _graph(torch_model, bank, rule, fuse)
    with torch.no_grad():
        hs = torch_model.model(torch.tensor([IDS]), output_hidden_states=True).hidden_states
        z0 = torch_model.model.norm(hs[1][0, -1])
        top0 = int((torch_model.lm_head.weight @ z0).argmax())
    other = [t for t in range(2, 300, 2) if t != top0][:3]
    for draft_ids in (np.array([top0, *other], np.int64), np.array([1, 3, 5, 7], np.int64)):
        for active, threshold in (([True, True, True], 0.5), ([False, True, True], 0.5), ([True, True, True], 0.99)):
            got = _run(sess, shapes, draft_ids, active, threshold)
            prev = None
            rows = torch_model.lm_head.weight[torch.tensor(draft_ids)]
            for i in (0, 1):
                flag, token = bool(got[f"exit_flag.{i}"][0]), int(got[f"exit_token.{i}"][0])
                if not active[i]:
                    assert not flag
                    continue
                with torch.no_grad():
                    z = torch_model.model.norm(hs[i + 1][0, -1])
                    ref, prev, _ = exit_decision(z, rows, torch.tensor(draft_ids), prev, bank, i,
                                                 DecodeSettings(rule=rule, threshold=threshold),
                                                 torch_model.lm_head.weight, torch.tensor(VOCAB))
                assert flag == (ref is not None), (rule, draft_ids, active, i)
                if flag:
                    assert token == ref
                    np.testing.assert_allclose(got[f"exit_feature.{i}"][0], z.numpy(), atol=1e-5)


def test_unknown_rule_raises():
    with pytest.raises(PassError, match="exit rule 'sometimes'"):
        InsertEarlyExitPass(rule="sometimes")


def test_exit_without_predictors_raises():
    model, _ = export_step(make_tiny_model("llama"), CAP)
    with pytest.raises(PassError, match="run insert_predictors first"):
        InsertEarlyExitPass()(model)
