"""ONNX Runtime GenAI's view of a bundle: ``genai.onnx`` and ``genai_config.json``, so that
``onnxruntime_genai.Model(BUNDLE)`` and its ``Generator`` decode the bundle's step graph unchanged.

GenAI feeds a decoder ``input_ids``, an all-ones ``attention_mask`` [1, total tokens] and the
cache, and reads ``logits`` of rank 3. ``genai.onnx`` is the step graph (``model.onnx``) with
that I/O, and the same weights: its initializers point into ``model.onnx.data``.

    inputs   input_ids int64 [1, S], attention_mask int64 [1, T] (T = past + S),
             past_key_values.{i}.key|value float32 [1, KVH, CAP, D]
    outputs  logits float32 [1, 1, V] (last position), present.{i}.key|value (the same
             buffers, written in place), features [1, S, d]

The cache keeps its fixed capacity CAP: GenAI allocates it at that size and shares it
between past and present; ``context_length`` and ``max_length`` are CAP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from specee_compile.contract import INPUT_IDS, LOGITS, PAST_LENGTH, past, present

GENAI_GRAPH = "genai.onnx"
GENAI_CONFIG = "genai_config.json"
ATTENTION_MASK = "attention_mask"


def write_genai(folder: Path, step_file: str, shapes, bos: int | None, eos: list[int], pad: int | None
                ) -> dict | None:
    """Write ``genai.onnx`` (from ``folder/step_file``) and ``genai_config.json``; the manifest's
    entry (None, nothing written, for a model without an end-of-text token: GenAI needs one)."""
    if not eos:
        return None
    model = ir.load(folder / step_file)
    _genai_io(model)
    ir.save(model, folder / GENAI_GRAPH)
    config = {
        "model": {
            "type": "decoder", "vocab_size": shapes.vocab_size, "context_length": shapes.capacity,
            "bos_token_id": bos if bos is not None else eos[0], "eos_token_id": list(eos),
            "pad_token_id": pad if pad is not None else eos[0],
            "decoder": {
                "filename": GENAI_GRAPH, "head_size": shapes.head_dim, "hidden_size": shapes.hidden_size,
                "num_attention_heads": shapes.num_heads, "num_hidden_layers": shapes.num_layers,
                "num_key_value_heads": shapes.num_kv_heads,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                           "past_key_names": past(0, "key").replace(".0.", ".%d."),
                           "past_value_names": past(0, "value").replace(".0.", ".%d.")},
                "outputs": {"logits": LOGITS, "present_key_names": present(0, "key").replace(".0.", ".%d."),
                            "present_value_names": present(0, "value").replace(".0.", ".%d.")},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": shapes.capacity,
                   "past_present_share_buffer": True},
    }
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2))
    return {"config": GENAI_CONFIG, "graph": GENAI_GRAPH}


def _genai_io(model: ir.Model) -> None:
    """past_sequence_length -> attention_mask (past = sum(mask) - S); logits [1, V] -> [1, 1, V]."""
    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    ids, past_length = by_name[INPUT_IDS], by_name[PAST_LENGTH]
    mask = ir.Value(name=ATTENTION_MASK, shape=ir.Shape([1, "total_sequence_length"]),
                    type=ir.TensorType(ir.DataType.INT64))
    tape = ir.tape.Tape(graph)  # adds its nodes and initializers to the graph
    one = tape.initializer(ir.tensor(np.array([1], np.int64)), name="genai.axis_1")
    total = tape.op("ReduceSum", [mask, one], {"keepdims": 0})  # [1]
    new = tape.op("Shape", [ids], {"start": 1, "end": 2})  # [1]: S
    past_value = tape.op("Sub", [total, new])
    past_length.replace_all_uses_with(past_value)
    graph.inputs[graph.inputs.index(past_length)] = mask
    k = [v.name for v in graph.outputs].index(LOGITS)
    last = graph.outputs[k]
    logits = tape.op("Unsqueeze", [last, one])
    last.name = "last_logits"
    logits.name = LOGITS
    logits.type = last.type
    graph.outputs[k] = logits
    graph.sort()
