"""What a benchmark computes from its runs: speed, exits, time shares and quality.

Every ratio is between two systems timed on the same prompts in the same run (paired per
prompt, then the median), never between numbers of different runs.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np

from specee_compile.bench.systems import Run


def speed(runs: list[Run]) -> dict:
    tps = [r.decode_tps for r in runs if math.isfinite(r.decode_tps)]
    # "inclusive": quartiles of the measured values; the default extrapolates past them on a few runs
    q1, _, q3 = statistics.quantiles(tps, n=4, method="inclusive") if len(tps) > 1 else (tps[0],) * 3
    return {"decode_tps_median": statistics.median(tps), "decode_tps_q1": q1, "decode_tps_q3": q3,
            "decode_tps_min": min(tps), "decode_tps_max": max(tps),
            "ttft_ms_median": 1000 * statistics.median(r.ttft for r in runs),
            "generated_tokens": sum(len(r.token_ids) for r in runs), "runs": len(runs)}


def paired_ratio(runs: list[Run], base: list[Run]) -> float:
    """Median over prompts of (this system's tok/s) / (the base's tok/s) on the same prompt."""
    ratios = [a.decode_tps / b.decode_tps for a, b in zip(runs, base)
              if math.isfinite(a.decode_tps) and math.isfinite(b.decode_tps) and b.decode_tps > 0]
    return statistics.median(ratios) if ratios else float("nan")


def agreement_free_running(runs: list[Run], reference: list[list[int]]) -> dict:
    """Exact-match rate and mean first-divergence position of free-running outputs."""
    exact, first = 0, []
    for run, ref in zip(runs, reference):
        exact += run.token_ids == ref
        first.append(next((k for k, (a, b) in enumerate(zip(run.token_ids, ref)) if a != b),
                          min(len(run.token_ids), len(ref))))
    return {"exact_match": exact / len(reference), "mean_first_divergence": statistics.mean(first)}


def exits(runs: list[Run], num_layers: int) -> dict:
    """Mean executed layers per decode step and the exit-layer histogram."""
    layers = [e for r in runs for e in r.exit_layers[1:]]  # [0] is the prefill's token
    return {"mean_executed_layers": statistics.mean(e + 1 for e in layers) if layers else float(num_layers),
            "exit_rate": sum(e < num_layers - 1 for e in layers) / max(len(layers), 1),
            "exit_histogram": {str(k): v for k, v in sorted(Counter(layers).items())}}


def tree(runs: list[Run]) -> dict:
    """Tokens emitted per target forward (the accepted path's draft tokens plus the target's
    own next one), and how deep the accepted paths reach: ``accepted_depth[d - 1]`` is the
    share of forwards accepting at least d draft tokens, ``depth_acceptance[d - 1]`` the
    share of those reaching depth d - 1 that also accept at depth d (the draft's hit rate
    at that depth, given the path so far)."""
    accepted = [a - 1 for r in runs for a in r.accepted_lengths]
    deepest = max(accepted, default=0)
    reach = [sum(a >= d for a in accepted) / max(len(accepted), 1) for d in range(1, deepest + 1)]
    given = [reach[0]] + [reach[d] / reach[d - 1] for d in range(1, len(reach))] if reach else []
    return {"tokens_per_forward": statistics.mean(accepted) + 1 if accepted else float("nan"),
            "acceptance_rate": reach[0] if reach else 0.0, "forwards": len(accepted),
            "accepted_depth": reach, "depth_acceptance": given}


def forward_cost(runs: list[Run], dense: list[Run]) -> float:
    """The median over prompts of one target forward's decode time (draft and host loop
    included) over one dense decode step's: tree speculation's speed-up over the dense bundle
    is its tokens per forward divided by this, the break-even tokens per forward."""
    ratios = [(r.decode_seconds / len(r.accepted_lengths)) / (d.decode_seconds / len(d.step_seconds))
              for r, d in zip(runs, dense) if r.accepted_lengths and d.step_seconds and d.decode_seconds > 0]
    return statistics.median(ratios) if ratios else float("nan")


def step_parts(runs: list[Run], dense: list[Run], shares: dict, active_layers, num_layers: int, rule: str,
               head_seconds: float, reduced_head_seconds: float) -> dict:
    """The measured step time at each exit layer against the sum of its parts, each measured
    on its own: a decoder layer (the dense bundle's median step minus the LM head, over L), the
    draft (runtime timer), a predictor with its exit check (their ONNX Runtime profile share
    over the predictor runs), the exit rule's head product and the final head (``*_seconds``,
    timed alone) and K/V propagation per skipped layer (runtime timer). Whatever the parts
    leave over (session calls, copies, the host loop) shows as a ratio above 1.

    ``active_layers(history)`` replays the engine's schedule, so each step is charged for the
    predictors that really ran before its exit.
    """
    L = num_layers
    layer = (statistics.median(t for r in dense for t in r.step_seconds) - head_seconds) / L
    steps, predictor_runs, skipped = [], 0, 0
    for r in runs:
        history: list[int] = []
        for e, t in zip(r.exit_layers[1:], r.step_seconds):
            n = int(active_layers(history)[: e + 1].sum())
            steps.append((e, t, n))
            predictor_runs += n
            skipped += L - 1 - e
            history.append(e)
    decode = sum(r.decode_seconds for r in runs)
    draft = sum(r.breakdown.get("draft", 0.0) for r in runs) / max(len(steps), 1)
    predictor = (shares.get("predictors_share", 0.0) + shares.get("exit_checks_share", 0.0)) * decode \
        / max(predictor_runs, 1)
    kv = shares.get("kv_propagation_share", 0.0) * decode / max(skipped, 1)
    exit_head = {"full": head_seconds, "reduced": reduced_head_seconds}.get(rule, 0.0)
    by_layer: dict[int, tuple[list, list]] = {}
    for e, t, n in steps:
        parts = layer * (e + 1) + draft + n * predictor + (head_seconds if e == L - 1 else exit_head + kv * (L - 1 - e))
        measured, predicted = by_layer.setdefault(e, ([], []))
        measured.append(t)
        predicted.append(parts)
    rows = {}
    for e, (measured, predicted) in sorted(by_layer.items()):
        m, p = statistics.median(measured), statistics.median(predicted)
        rows[str(e)] = {"measured_ms": 1000 * m, "parts_ms": 1000 * p, "ratio": m / p, "steps": len(measured)}
    return {"part_ms": {"layer": 1000 * layer, "head": 1000 * head_seconds, "exit_head": 1000 * exit_head,
                        "draft": 1000 * draft, "predictor_and_check": 1000 * predictor, "kv_per_layer": 1000 * kv},
            "step_vs_parts": rows}


def time_shares(runs: list[Run], node_shares: dict[str, float] | None = None) -> dict:
    """Share of decode time per engine part (draft, segments, K/V propagation, host loop), and of
    the predictors and exit checks inside the segments when an ORT profile gave ``node_shares``."""
    total = sum(r.decode_seconds for r in runs)
    parts: Counter = Counter()
    for r in runs:
        parts.update(r.breakdown)
    shares = {f"{k}_share": v / total for k, v in parts.items()}
    shares["host_loop_share"] = max(0.0, 1 - sum(shares.values()))
    for k, v in (node_shares or {}).items():
        shares[f"{k}_share"] = v * shares.get("segments_share", 0.0)
    return shares


# top-level nodes the SpecEE passes add: predictors, exit checks, the shared draft-row gather
_PREDICTOR = re.compile(r"^(predictor\.\d+|specee\..*|node_(Greater|And)_\d+)_kernel_time$")
_EXIT = re.compile(r"^exit\.\d+_kernel_time$")
_SUBGRAPH = re.compile(r"^(fused )?(predictor|exit|skip_predictor|stay|node_FusedMatMul)_")
_CONTAINER = re.compile(r"^exit_or_continue\.\d+_kernel_time$")  # graph mode: an If around the rest of the step


def profile_node_shares(segment_traces: list[Path]) -> dict[str, float]:
    """From ONNX Runtime profiles of the segment sessions (or graph mode's one decode graph): the
    share of node time spent in predictors and in exit checks. Predictor and exit ``If`` nodes
    are timed with their branches, so the nodes inside those branches are left out of the total,
    and graph mode's ``If`` around the rest of the step is left out for the nodes it contains."""
    total = predictor = exit_check = 0.0
    for f in segment_traces:
        for e in json.loads(Path(f).read_text()):
            name = e.get("name", "")
            if e.get("cat") != "Node" or not name.endswith("_kernel_time") or _SUBGRAPH.match(name) \
                    or _CONTAINER.match(name):
                continue
            total += e["dur"]
            if _PREDICTOR.match(name):
                predictor += e["dur"]
            elif _EXIT.match(name):
                exit_check += e["dur"]
    if total == 0:
        return {}
    return {"predictors": predictor / total, "exit_checks": exit_check / total}


def operator_times(trace: Path) -> list[Counter]:
    """Per run of an ONNX Runtime profile (Chrome trace), in order: ms per operator type of the
    nodes that ran inside it."""
    events = json.loads(Path(trace).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    out, i = [], 0
    for run in runs:
        ops: Counter = Counter()
        while i < len(nodes) and nodes[i]["ts"] < run["ts"]:
            i += 1
        while i < len(nodes) and nodes[i]["ts"] <= run["ts"] + run["dur"]:
            ops[nodes[i]["args"]["op_name"]] += nodes[i]["dur"] / 1000
            i += 1
        ops["(run)"] = run["dur"] / 1000
        out.append(ops)
    return out


def mean_operators(runs: list[Counter]) -> dict[str, float]:
    """The mean ms per run of each operator type (and of the whole run, "(run)"), largest first."""
    total: Counter = Counter()
    for r in runs:
        total.update(r)
    return {k: round(v / max(len(runs), 1), 3) for k, v in total.most_common()}


def nll(features: np.ndarray, head: np.ndarray, targets: list[int]) -> list[float]:
    """Negative log-likelihood of each target under logits = features @ head.T."""
    logits = features.astype(np.float64) @ head.T.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits).sum(-1))
    return (logz - logits[np.arange(len(targets)), targets]).tolist()


def perplexity(nlls: list[float]) -> float:
    return math.exp(statistics.mean(nlls))
