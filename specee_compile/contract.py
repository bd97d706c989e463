"""The contract between the stages and the runtimes: every graph I/O name, value name,
node-metadata key and role, the graph families, and the choices a manifest may hold.

Export names the values, passes find and add them by these names, lowering cuts at them
and the runtimes bind them; none of those modules spells a name itself. The bundle's
manifest (:mod:`specee_compile.bundle.manifest`) records the same names per graph.
"""

from __future__ import annotations

import onnx_ir as ir

# ---- graph inputs -----------------------------------------------------------------------------
INPUT_IDS = "input_ids"  # int64 [1, S]
PAST_LENGTH = "past_sequence_length"  # int64 [1]: valid positions in the cache
POSITION_IDS = "position_ids"  # int64 [1, S]: tree graphs, a node's position is the root's + its depth
ATTENTION_BIAS = "attention_bias"  # float32 [1, 1, S, past + S]: tree graphs, 0 where a node sees
DRAFT_IDS = "draft_ids"  # int64 [K]: the draft's candidate target ids (an output of the draft graphs)
ACTIVE_LAYERS = "active_layers"  # bool [L]: the predictors that run this step
EXIT_THRESHOLD = "exit_threshold"  # float32 [1]: the score a predictor must exceed
FEATURES = "features"  # float32 [1, S, d]: final-normed hidden states (the draft takes them as input)
# with a fusion draft, ``features`` is the draft's fused input and this output the final-normed states
NORMED_FEATURES = "normed_features"

# ---- graph outputs ----------------------------------------------------------------------------
LOGITS = "logits"  # float32 [1, V]: the last position's
TOKENS = "tokens"  # int64 [1, S]: the tree graph's greedy token per node
DRAFT_LOGPROBS = "draft_logprobs"  # float32 [S, K]: the tree draft's
DRAFT_FEATURES = "draft_features"  # float32 [1, S, d]: the tree draft's estimate of the target features
GRAPH_EXIT_OUTPUTS = ("token", "feature", "exit_layer", "normed_feature")  # exit mode "graph": the decode graph's results

# ---- the KV cache -----------------------------------------------------------------------------
PAST = "past_key_values."
PRESENT = "present."
KINDS = ("key", "value")


def past(layer: int, kind: str) -> str:
    return f"{PAST}{layer}.{kind}"


def present(layer: int, kind: str) -> str:
    return f"{PRESENT}{layer}.{kind}"


def is_cache(name: str) -> bool:
    """A KV-cache input or output: runtimes bind these to their buffers in place."""
    return name.startswith((PAST, PRESENT))


def cache_layers(names) -> list[int]:
    """The layers whose past key a graph with these input names takes, in order."""
    return [int(n[len(PAST):].split(".")[0]) for n in names if n.startswith(PAST) and n.endswith(".key")]


# ---- named values inside graphs and the SpecEE outputs ----------------------------------------
def layer_output(layer: int) -> str:
    """A decoder layer's output hidden state [1, S, d]: where passes attach and lowering cuts."""
    return f"layers.{layer}.output"


LAYER_OUTPUT_PATTERN = r"^layers\.(\d+)\.output$"  # layer_output's names, the layer as group 1


def exit_flag(layer: int) -> str:
    return f"exit_flag.{layer}"  # bool [1] ([S] per tree node): the step may exit here


def exit_token(layer: int) -> str:
    return f"exit_token.{layer}"  # int64 [1] ([S])


def exit_feature(layer: int) -> str:
    return f"exit_feature.{layer}"  # float32 [1, d] ([S, d]): the exit layer's normed hidden state


def normed_exit_feature(layer: int) -> str:
    return f"normed_{exit_feature(layer)}"  # with a fusion draft: the normed state (exit_feature is the draft's input)


# ---- node metadata ----------------------------------------------------------------------------
ROLE = "specee.role"  # what a node inserted by a SpecEE pass does, one of:
ROLE_DRAFT_ROWS = "draft_rows"  # gathers the draft candidates' LM-head rows (FuseDraftGathersPass shares one)
ROLE_NORM_WEIGHT = "norm_weight"  # multiplies by the final norm's weight (folded into the shared rows)
ROLE_CANDIDATE_LOGITS = "candidate_logits"  # the candidates' logits from the rows
SEGMENT = "specee.segment_layer"  # the predictor layer whose segment a node belongs to

# ---- graph families: what the exporter emits, each with a pass pipeline of its own ------------
FAMILIES = {
    "step": "the dense decoder step: prefill and decode (model.onnx)",
    "decode": "the SpecEE decode step before the cut: predictors and exits inserted",
    "segments": "the decode step cut after every predictor layer, each cut graph",
    "draft": "the draft head's step",
    "tree": "the tree verification step",
    "tree_decode": "the tree step with per-node predictors and exits, before the cut",
    "tree_segments": "the tree step with per-node exits, each cut graph",
    "draft_tree": "the draft over a token tree's nodes",
}

TREE_MAX_WIDTH = 8  # the tree draft graph's top-K children per node: the widest a tree can branch

# ---- choices ----------------------------------------------------------------------------------
EXIT_RULES = ("full", "reduced", "draft")  # the check at an exit: LM head, reduced vocabulary, none
EXIT_MODES = ("segments", "graph")  # one graph per block of layers, or one decode graph with If exits
TARGETS = ("ort", "trt")  # graphs for ONNX Runtime (com.microsoft ops) or standard ONNX (TensorRT)


def rope_table(kv: dict, j: int) -> str | None:
    """The suffix of layer j's RoPE table (``cos{suffix}``), None when the layer has no RoPE."""
    index = int(kv[f"{j}.rope"][0]) if f"{j}.rope" in kv else 0  # bundles before per-layer tables: one
    return None if index < 0 else ("" if index == 0 else f".{index}")


def io_contract(model: ir.Model) -> dict:
    """A graph's manifest entry: names, dtypes and shapes (symbolic dims as strings) of its
    inputs and outputs."""

    def describe(v: ir.Value) -> dict:
        dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        dtype = str(v.dtype.numpy()) if v.dtype is not None else None
        return {"name": v.name, "dtype": dtype, "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.inputs], "outputs": [describe(v) for v in model.graph.outputs]}
