"""The predictor and exit passes over many query tokens (per_node), on the tiny tree
verification graph, against PyTorch: a chain tree is an ordinary causal sequence, so node s
must score and decide exactly like position s with its own row of candidates."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from specee_compile.predictor import PredictorBank, candidate_features
from specee_compile.export import export_tree
from specee_compile.passes.fuse_draft_gathers import FuseDraftGathersPass
from specee_compile.passes.insert_early_exit import InsertEarlyExitPass
from specee_compile.passes.insert_predictors import InsertPredictorsPass
from specee_compile.testing import FAMILIES, TINY_VOCAB, make_tiny_model

CAP = 32
IDS = [1, 5, 9, 33, 7]
VOCAB = np.arange(0, TINY_VOCAB, 2, dtype=np.int64)


@functools.cache
def _exported(family: str) -> bytes:
    return ir.to_proto(export_tree(make_tiny_model(family), CAP)).SerializeToString()


def _graph(family, bank, rule, fuse):
    model = ir.from_proto(onnx.load_from_string(_exported(family)))  # a fresh copy of one export per family
    arrays = {k: v.detach().numpy() for k, v in bank.state_dict().items()}
    InsertPredictorsPass(layers=(0, 1), per_node=True, **arrays)(model)
    InsertEarlyExitPass(rule=rule, vocab_map=VOCAB, per_node=True)(model)
    if fuse:
        FuseDraftGathersPass()(model)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _run(sess, num_layers, draft_ids, active, threshold):
    s = len(IDS)
    feeds = {i.name: np.zeros(i.shape, np.float32) for i in sess.get_inputs() if i.name.startswith("past_key")}
    bias = np.triu(np.full((s, s), -1e9, np.float32), 1)[None, None]
    feeds.update(input_ids=np.array([IDS]), past_sequence_length=np.array([0]), position_ids=np.arange(s)[None],
                 attention_bias=bias, draft_ids=draft_ids, active_layers=np.array(active),
                 exit_threshold=np.array([threshold], np.float32))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["full", "draft"])
def test_every_node_scores_and_exits_like_its_own_position(family, rule):
    torch_model = make_tiny_model(family)
    num_layers = torch_model.config.num_hidden_layers
    torch.manual_seed(0)
    bank = PredictorBank(num_layers, hidden=16)
    with torch.no_grad():
        bank.b2.fill_(1.0)
        hs = torch_model.model(torch.tensor([IDS]), output_hidden_states=True).hidden_states
    head = torch_model.lm_head.weight.detach()
    rng = np.random.default_rng(1)
    draft_ids = rng.integers(0, TINY_VOCAB, (len(IDS), 4))
    with torch.no_grad():  # give nodes 0 and 3 their layer-0 argmax among the candidates
        for s in (0, 3):
            draft_ids[s, 2] = int((head @ torch_model.model.norm(hs[1][0, s])).argmax())
    for fuse in (False, True):
        sess = _graph(family, bank, rule, fuse)
        for active, threshold in (([True, True, True], 0.5), ([False, True, True], 0.5), ([True, True, True], 0.99)):
            got = _run(sess, num_layers, draft_ids, active, threshold)
            prev = None
            for i in (0, 1):
                if not active[i]:
                    assert not got[f"exit_score.{i}"].any() and not got[f"exit_flag.{i}"].any()
                    continue
                with torch.no_grad():
                    z = torch_model.model.norm(hs[i + 1][0])  # [S, d]
                    rows = head[torch.as_tensor(draft_ids)]  # [S, 4, d]
                    feats, prev = candidate_features(z, rows, prev)
                    score = torch.sigmoid(bank.logits_all(feats[None].expand(num_layers, -1, -1))[i]).numpy()
                    full = (z @ head.T).argmax(-1).numpy()
                    local = draft_ids[np.arange(len(IDS)), torch.einsum("sd,skd->sk", z, rows).argmax(-1).numpy()]
                np.testing.assert_allclose(got[f"exit_score.{i}"], score, atol=1e-5)
                if not (score > threshold).any():
                    assert not got[f"exit_flag.{i}"].any()
                    continue
                token = full if rule == "full" else local
                ok = (draft_ids == token[:, None]).any(1) if rule == "full" else np.ones(len(IDS), bool)
                np.testing.assert_array_equal(got[f"exit_token.{i}"], token)
                np.testing.assert_array_equal(got[f"exit_flag.{i}"], ok & (score > threshold))
                np.testing.assert_allclose(got[f"exit_feature.{i}"], z.numpy(), atol=1e-5)


def test_a_head_multiplied_by_a_transposed_weight_is_found():
    """Exported over many query tokens, a large LM head becomes MatMul(x, Transpose(W [V, d]))
    (SmolLM2's tree step): the passes must find W and use it untransposed."""
    from specee_compile.passes.analysis import find_decoder, scope

    torch_model = make_tiny_model("llama")
    model = export_tree(torch_model, CAP)
    head = next(n for n in model.graph if len(scope(n)) >= 2 and scope(n)[1] == "lm_head"
                and n.op_type in ("Gemm", "MatMul"))
    weight = torch_model.lm_head.weight.detach().numpy()  # [V, d]
    rows = ir.Value(name="lm_head.weight_vd", shape=ir.Shape(weight.shape), type=ir.TensorType(ir.DataType.FLOAT),
                    const_value=ir.tensor(weight.copy()))
    model.graph.register_initializer(rows)
    transpose = ir.node("Transpose", [rows], {"perm": [1, 0]})
    model.graph.insert_before(head, transpose)
    transposed = transpose.outputs[0]
    if head.op_type == "Gemm":  # make it the MatMul the large export has
        matmul = ir.node("MatMul", [head.inputs[0], transposed], metadata_props=dict(head.metadata_props))
        model.graph.insert_before(head, matmul)
        head.outputs[0].replace_all_uses_with(matmul.outputs[0])
        model.graph.remove(head, safe=True)
    else:
        head.replace_input_with(1, transposed)
    dec = find_decoder(model, "test")
    assert dec.head_weight is rows and not dec.head_transposed
