"""The supported families beyond the three most tests run on (Qwen3, Gemma 2, Gemma 3, Phi-3,
Granite, SmolLM3, OLMo 2), each on a tiny random model built from its transformers config with
what sets it apart switched on (testing.tiny_config): the step against eager PyTorch past the
sliding window in both graph targets (the TensorRT-ready one passing the TensorRT check), K/V
propagation, then one SpecEE + tree bundle against transformers' ``generate``, the eager
reference decoder, dense greedy decoding and the standalone example."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from specee_compile.architecture import Architecture
from specee_compile.calibrate import CalibrationSettings, calibrate, load_calibration
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.errors import ExportError
from specee_compile.export import export_step, export_tree, kv_fill, rms_eps, step_shapes
from specee_compile.functional import key_value
from specee_compile.lower.trt_check import CheckTensorRTPass
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from specee_compile.runtimes import load
from specee_compile.runtimes.propagation import propagated_kv, rope_rows
from specee_compile.testing import (
    FAMILIES,
    MORE_FAMILIES,
    TINY_CALIBRATION,
    TINY_WINDOW,
    make_tiny_model,
    tiny_tokenizer,
    write_calibration_jsonl,
)
from tests.test_examples import _standalone
from tests.test_export import CAPACITY, _run_steps

PROMPT = [1, 17, 42, 99, 5, 8, 9, 10, 11, 12, 13]  # longer than the window, and decoding goes on past it
CONTINUATION = [7, 250, 3, 64, 18, 19, 20, 21]
PROMPTS = ([1, 40, 41, 42], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15])
NEW = 16
THRESHOLD = 0.1  # with exit rule "draft", low enough for every tiny model's predictors to exit
assert len(PROMPT) > TINY_WINDOW and len(PROMPTS[0]) + NEW > TINY_WINDOW


def _eager_logits(model) -> np.ndarray:
    """transformers' logits at the positions a prefill of PROMPT and decode steps of CONTINUATION emit."""
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT + CONTINUATION])).logits[0].numpy()
    return ref[len(PROMPT) - 1:]


def _step_logits(path, shapes, capacity: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.stack(_run_steps(session, shapes, PROMPT, CONTINUATION, capacity))


# the families whose attention lowers differently to standard ONNX (windows, soft-caps, two RoPE
# tables, partial rotation, no RoPE); the others differ outside the attention op, in the same
# module code both targets export, and their attention is Llama's (tests/test_tensorrt.py)
TRT_ATTENTION = ("gemma2", "gemma3_text", "phi3", "smollm3")
STANDALONE = ("gemma3_text", "olmo2", "smollm3")  # every kv_fill variant: key norms, no input norm, no RoPE


@pytest.mark.parametrize("family", TRT_ATTENTION)
def test_tensorrt_ready_step_passes_the_check_and_equals_eager_pytorch_past_the_window(family, tmp_path):
    """The standard-ONNX step (the ONNX Runtime one is the bundle's, tested below)."""
    model = make_tiny_model(family)
    onnx_model, shapes = export_step(model, CAPACITY, "trt")
    CheckTensorRTPass(graph_name=f"{family} step")(onnx_model)  # raises on what TensorRT's parser refuses
    ir.save(onnx_model, tmp_path / "step.onnx")
    np.testing.assert_allclose(_step_logits(tmp_path / "step.onnx", shapes, CAPACITY), _eager_logits(model),
                               atol=1e-4, rtol=0)


def test_tree_graph_windows_count_positions_in_both_targets(tmp_path):
    """A tree node at depth k sits at cache row past + s but position past + k: its window is
    measured from its position, as dense decoding of its path would (Gemma 2: windows and
    soft-capped scores under the tree's bias)."""
    family = "gemma2"
    model = make_tiny_model(family)
    step, shapes = export_step(model, CAPACITY)
    ir.save(step, tmp_path / "step.onnx")
    dense = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    _, cache = _prefill(dense, shapes, PROMPT)
    # a root and two children of it, then a grandchild under the second child: rows 0..3, depths 0,1,1,2
    tokens, parents, depths = [5, 6, 7, 8], [-1, 0, 0, 2], [0, 1, 1, 2]
    past = len(PROMPT)
    bias = np.full((1, 1, 4, past + 4), -1e9, np.float32)
    bias[..., :past] = 0.0
    for s in range(4):
        a = s
        while a >= 0:
            bias[0, 0, s, past + a] = 0.0
            a = parents[a]
    # what dense decoding of the path root -> 2 -> 3 gives at the grandchild
    _, path_cache = _prefill(dense, shapes, PROMPT + [5, 7])
    want = _step(dense, shapes, [8], past + 2, path_cache)[0]
    for target in ("ort", "trt"):
        graph = export_tree(model, CAPACITY, target)
        if target == "trt":
            CheckTensorRTPass(graph_name=f"{family} tree")(graph)
        ir.save(graph, tmp_path / f"tree-{target}.onnx")
        tree = ort.InferenceSession(str(tmp_path / f"tree-{target}.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.array([tokens]), "past_sequence_length": np.array([past]),
                 "position_ids": np.array([[past + d for d in depths]]), "attention_bias": bias}
        feeds.update(zip(_names(shapes), cache))
        out = dict(zip([o.name for o in tree.get_outputs()], tree.run(None, feeds)))
        np.testing.assert_allclose(out["features"][0, 3], want[0, -1], atol=1e-4, rtol=0, err_msg=target)


def _names(shapes):
    return [f"past_key_values.{i}.{k}" for i in range(shapes.num_layers) for k in ("key", "value")]


def _step(session, shapes, chunk, past, cache):
    """(features [1, S, d], the cache after it)"""
    feeds = {"input_ids": np.array([chunk], np.int64), "past_sequence_length": np.array([past], np.int64)}
    feeds.update(zip(_names(shapes), cache))
    out = session.run(None, feeds)
    return out[1], out[2:]


def _prefill(session, shapes, prompt):
    cache = [np.zeros((1, shapes.num_kv_heads, CAPACITY, shapes.head_dim), np.float32)
             for _ in range(2 * shapes.num_layers)]
    return _step(session, shapes, prompt, 0, cache)


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_propagated_kv_is_what_the_skipped_layer_would_write(family):
    """State propagation (numpy, from kv_fill) against the layer's own K/V, for every layer: input
    norm or none, fused projections, key norms, RoPE tables, partial rotation or none."""
    model = make_tiny_model(family)
    arch = Architecture(model)
    kv, eps = kv_fill(model, CAPACITY), rms_eps(model)
    h = torch.randn(model.config.hidden_size)
    position = CAPACITY - 3
    for j in range(arch.num_layers):
        with torch.no_grad():
            want_k, want_v = key_value(arch.spec(j, CAPACITY), h[None, None], torch.tensor([position]))
        k, v = propagated_kv(np, kv, j, h.numpy(), *rope_rows(kv, j, position), eps, arch.kv_heads)
        np.testing.assert_allclose(k, want_k[0, :, 0].numpy(), atol=1e-5, rtol=0, err_msg=f"layer {j} keys")
        np.testing.assert_allclose(v, want_v[0, :, 0].numpy(), atol=1e-5, rtol=0, err_msg=f"layer {j} values")


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_a_specee_bundle_decodes_as_transformers_the_reference_decoder_and_dense_greedy(family, tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    settings = CalibrationSettings(calib_file=str(write_calibration_jsonl(tmp_path / "c.jsonl")), **TINY_CALIBRATION)
    calibration = calibrate(model_dir, settings, progress=False)
    # exit mode "graph": the segments nested into one decode graph, so the K/V propagation runs in
    # ONNX (the segments themselves are the same graphs; how a runtime drives them is not per family)
    config = CompileConfig(model=str(model_dir), out=tmp_path / "b.onnx", max_context=64, specee=True,
                           calibration=calibration, threshold=THRESHOLD, exit_rule="draft", exit_mode="graph",
                           tree=True, tree_shape="2x2x3+4")
    out = compile_bundle(config, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shapes = step_shapes(hf, 64)  # the bundle's step graph against eager PyTorch, past the window
    np.testing.assert_allclose(_step_logits(out / "model.onnx", shapes, 64), _eager_logits(hf), atol=1e-4, rtol=0)
    dense, engine, trees = load(out, dense=True), load(out), load(out, tree=True)
    cal = load_calibration(calibration, hf)
    reference = ReferenceDecoder(hf, cal.draft, cal.bank, cal.schedule,
                                 DecodeSettings(rule="draft", kv_policy="propagate", threshold=THRESHOLD), capacity=64)
    exits = []
    for prompt in PROMPTS:
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                           eos_token_id=list(dense.eos_token_ids), pad_token_id=0)[0, len(prompt):].tolist()
        want = [t for t in want if t not in dense.eos_token_ids]
        assert dense.generate(prompt, max_new_tokens=NEW).token_ids == want
        got, ref = engine.generate(prompt, max_new_tokens=NEW), reference.generate(prompt, NEW, dense.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (ref.tokens, ref.exit_layers)
        exits += got.exit_layers[1:]
        for shape in ("2x2x3+4", "3x3x8"):
            assert trees.generate(prompt, max_new_tokens=NEW, tree=shape).token_ids == want, shape
    assert type(engine.decoder).__name__ == "GraphExitDecoder"
    assert min(exits) < engine.num_layers - 1  # exits happened, so the skipped layers' K/V was propagated
    if family not in STANDALONE:
        return
    # the standalone example (onnxruntime and numpy only) decodes the bundle as the engine does
    want = engine.generate("the lazy dog", max_new_tokens=NEW)
    assert _standalone(out, "the lazy dog", NEW) == {"token_ids": want.token_ids, "exit_layers": want.exit_layers,
                                                     "stop_reason": want.stop_reason}


def test_a_rope_groupqueryattention_cannot_rotate_is_refused_before_export_and_compiles_for_tensorrt(tmp_path):
    """Phi-3 with 16-dimension heads half rotated: ONNX Runtime's kernel turns multiples of 16."""
    from transformers import Phi3Config

    torch.manual_seed(0)
    config = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=320, partial_rotary_factor=0.5, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    with pytest.raises(ExportError, match=r"rotates 8 dimensions.*--check trt"):
        compile_bundle(CompileConfig(model=str(tmp_path / "model"), out=tmp_path / "b.onnx", max_context=32),
                       progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing half-written
    onnx_model, shapes = export_step(model, CAPACITY, "trt")
    ir.save(onnx_model, tmp_path / "step.onnx")
    np.testing.assert_allclose(_step_logits(tmp_path / "step.onnx", shapes, CAPACITY), _eager_logits(model),
                               atol=1e-4, rtol=0)
