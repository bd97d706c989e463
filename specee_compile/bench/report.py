"""The benchmark's outputs: report.json (everything), report.md (tables) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

JSON, MARKDOWN = "report.json", "report.md"
PLOTS = {"speed": "speed.png", "exits": "exits.png", "frontier": "frontier.png"}


def write(report: dict, out: Path) -> None:
    plots = _plots(report, out)
    report["plots"] = plots
    _atomic(out / JSON, json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    _atomic(out / MARKDOWN, markdown(report))


def markdown(r: dict) -> str:
    systems = r["systems"]
    # the × columns: each baseline in the run, with the row key holding the ratio against it
    against = [(title, key) for title, kind, key in (("transformers", "transformers", "speedup_vs_transformers"),
                                                     ("GenAI", "genai", "speedup_vs_genai"),
                                                     ("GenAI int4", "genai-int4", "speedup_vs_genai_int4"),
                                                     ("llama.cpp", "llama-cpp", "speedup_vs_llama_cpp"))
               if any(s["kind"] == kind for s in systems.values())]
    own = any("speedup_vs_own_dense" in s for s in systems.values())  # quantized SpecEE bundles
    lines = [f"# specee-bench report: {r['model']['source']}", "",
             f"`{r['command']}`", "",
             f"{r['date']} · {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['memory_gib']} GiB, "
             f"{r['machine']['threads']} threads ({r['machine'].get('thread_pool', 'per-session')} ONNX Runtime thread pool) · "
             f"{r['machine']['platform']} · load average "
             f"{r['machine']['load_average_start']} at the start, {r['machine']['load_average_end']} at the end", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), "",
             f"{r['model']['prompts']} {r['model']['prompt_set']} prompts × {r['settings']['new_tokens']} new tokens, "
             f"batch 1, greedy, {r['settings']['repeats']} repeat(s) after {r['settings']['warmup']} warm-up prompt(s); "
             "the systems run interleaved prompt by prompt in a rotating order. Ratios are medians over prompts of "
             "per-prompt ratios between systems timed in this run.", "",
             "## Speed", "",
             "| system | decode tok/s (median) | IQR | TTFT ms | × dense bundle |"
             + " × own dense graph |" * own + "".join(f" × {title} |" for title, _ in against),
             "|---|---|---|---|---|" + "---|" * (own + len(against))]
    for name, s in systems.items():
        lines.append(f"| {name} | {s['decode_tps_median']:.1f} | {s['decode_tps_q1']:.1f}–{s['decode_tps_q3']:.1f} | "
                     f"{s['ttft_ms_median']:.0f} | {_x(s['speedup_vs_dense'])} |"
                     + f" {_x(s.get('speedup_vs_own_dense'))} |" * own
                     + "".join(f" {_x(s[key])} |" for _, key in against))
    if own:
        lines += ["", "× own dense graph: a quantized SpecEE bundle's early exit and trees against that bundle's own "
                  "dense graph (its row `dense@NAME`, timed in the same run), whose weights they share."]
    lines += ["", "## Quality against dense greedy (the dense bundle's tokens)", "",
              "Exact match and first divergence: free-running outputs of the timed runs. Teacher-forced agreement: "
              "fed the dense prefix, the share of positions where the system emits the dense token. Perplexity: "
              f"{r['model']['perplexity_samples']} held-out ShareGPT responses ({r['model']['perplexity_tokens']} "
              "tokens) scored from the normed hidden state each token's prediction came from (its exit layer).", "",
              "| system | exact match | mean first divergence | teacher-forced agreement | perplexity |",
              "|---|---|---|---|---|"]
    for name, s in systems.items():
        lines.append(f"| {name} | {s['exact_match']:.0%} | {s['mean_first_divergence']:.1f} | "
                     f"{_pct(s.get('teacher_forced_agreement'))} | {_num(s.get('perplexity'), 3)} |")
    spec = {n: s for n, s in systems.items() if s["kind"] == "specee"}
    if spec:
        lines += ["", "## Exits and where the time goes", "",
                  "Shares of decode time: draft, segments (decoder layers, predictors, exit checks, head) and K/V "
                  "propagation are timed by the runtime; predictors and exit checks are their share of segment node "
                  "time in an ONNX Runtime profile of the first "
                  f"{r['settings']['profile_prompts']} prompt(s), scaled by the segments' share.", "",
                  "| system | rule | threshold | mean executed layers | exit rate | draft | predictors | exit checks "
                  "| K/V propagation | host loop |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in spec.items():
            lines.append(f"| {name} | {s.get('rule', '')} | {s['threshold']:.3f} | {s['mean_executed_layers']:.2f} "
                         f"of {r['model']['num_layers']} | {s['exit_rate']:.0%} | {_pct(s.get('draft_share'))} | "
                         f"{_pct(s.get('predictors_share'))} | {_pct(s.get('exit_checks_share'))} | "
                         f"{_pct(s.get('kv_propagation_share'))} | {_pct(s.get('host_loop_share'))} |")
        for name, s in spec.items():
            if "step_vs_parts" not in s:
                lines += ["", f"Step time by exit layer, {name}: not computed, {s['step_parts_skipped']}."]
                continue
            rows, part = s["step_vs_parts"], s["part_ms"]
            lines += ["", f"Step time by exit layer, {name}, against the sum of its parts, each measured on its own "
                      f"(ms: decoder layer {part['layer']:.3f} = the dense step less the head, over "
                      f"{r['model']['num_layers']}; LM head {part['head']:.2f}; exit-rule head {part['exit_head']:.2f}; "
                      f"draft {part['draft']:.2f}; predictor + exit check {part['predictor_and_check']:.3f} per "
                      f"predictor run; K/V propagation {part['kv_per_layer']:.3f} per skipped layer). Medians; a ratio "
                      "above 1 is time no part accounts for (session calls, copies, the host loop).", "",
                      *_wide_table("exit layer", rows, {
                          "measured ms": lambda v: f"{v['measured_ms']:.1f}",
                          "sum of parts ms": lambda v: f"{v['parts_ms']:.1f}",
                          "measured / parts": lambda v: f"{v['ratio']:.2f}",
                          "steps": lambda v: str(v["steps"])})]
    checked = {n: s["reference"] for n, s in spec.items() if "reference" in s}
    if checked:
        lines += ["", "## Compiled engine against the eager reference decoder", "",
                  "Same prompts, the reference decoder in eager PyTorch with the bundle's calibration, rule, K/V policy "
                  "and threshold. A step agrees when both emit the same token from the same exit layer; after a "
                  "prompt's first difference the rest of it counts as different.", "",
                  "| system | steps agreeing | identical prompts | first differences (prompt, step: compiled vs "
                  "reference (token, exit layer)) |", "|---|---|---|---|"]
        for name, c in checked.items():
            shown = "; ".join(f"{d['prompt']}, {d['step']}: {d['compiled']} vs {d['reference']}"
                              for d in c["differences"][:5]) or "none"
            lines.append(f"| {name} | {c['step_agreement']:.2%} of {c['steps']} | {c['identical_prompts']} of "
                         f"{c['prompts']} | {shown} |")
    trees = {n: s for n, s in systems.items() if s["kind"] == "tree"}
    if trees:
        lines += ["", "## Tree speculation", "",
                  "Tree shape WxDxN: the draft grows a tree of its tokens for D depths, expanding the W best nodes "
                  "of each depth into their W best children, and the N best nodes by path probability are verified "
                  "in one target forward after the newest token; the longest path of the target's greedy tokens "
                  "and one more token are emitted; +L adds up to L nodes from the context (the tokens that followed "
                  "the latest earlier occurrence of the newest 1-3 tokens, at most k after a k-token match shorter "
                  "than 3). Without :exit it is lossless; with "
                  ":exit (merged mapping) the verification forward stops at the first active predictor layer where "
                  "every node on the walk from the newest token is settled (its predictor passes the threshold and "
                  "its exit token is one of its own draft candidates), and the path's deeper K/V is propagated. "
                  "Shares of decode time come from the runtime's timers. Forward cost: one target forward's decode "
                  "time (draft and host loop included) in dense decode steps, the median over prompts; the speed-up "
                  "over the dense bundle is about tokens per forward ÷ forward cost, so the forward cost is the "
                  "tokens per forward a shape needs to break even. A quantized bundle's forward cost and exact "
                  "match are against its own dense graph (`dense@NAME`), the decoding its trees reproduce.", "",
                  "| system | shape | tokens per target forward | forward cost | forwards accepting a tree token | draft "
                  "| verification | mean executed layers | exit rate | exact match vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in trees.items():
            layers = f"{s['mean_executed_layers']:.2f}" if "mean_executed_layers" in s else "–"
            lines.append(f"| {name} | {s['shape']} | {s['tokens_per_forward']:.3f} | {_num(s.get('forward_cost'), 2)} | "
                         f"{s['acceptance_rate']:.1%} | "
                         f"{_pct(s.get('draft_share'))} | {_pct(s.get('verify_share'))} | {layers} | "
                         f"{_pct(s.get('exit_rate'))} | {s.get('exact_match_vs_own_dense', s['exact_match']):.0%} |")
        inexact = {n: s["inexact"] for n, s in trees.items() if s.get("inexact")}
        if inexact:
            lines += ["", "Not token-exact: " + "; ".join(f"{n}: {why}" for n, why in inexact.items())]
        drafts = {s["path"]: s["draft"] for s in trees.values() if s.get("draft")}
        if drafts:
            lines += ["", "Drafts: how each tree bundle's draft was trained (calibration sequences x epochs, steps "
                      "unrolled on its own guesses) and its hit rate of the target's next token on the responses of "
                      "the calibration's held-out text: top-1/top-4 after a full-depth step, and top-1 one step deeper fed its own "
                      "predicted feature where its first guess was right.", "",
                      "| bundle | training | depth 1 top-1 | depth 1 top-4 | depth 2 top-1 |", "|---|---|---|---|---|"]
            for path, d in drafts.items():
                training = "supplied" if d["supplied"] else f"{d['sequences']} x {d['epochs']}, unroll {d['unroll']}"
                lines.append(f"| {Path(path).stem} | {training} | {_pct(d['top1_after_full'])} | "
                             f"{_pct(d['top4_after_full'])} | {_pct(d['top1_depth2'])} |")
        deepest = max(len(s["depth_acceptance"]) for s in trees.values())
        if deepest:
            lines += ["", "Hit rate by depth: of the target forwards whose accepted path reached depth d - 1, the share "
                      "accepting a tree token at depth d as well (from the draft, or with +L from the context "
                      "lookup).", "",
                      "| system | " + " | ".join(f"depth {d}" for d in range(1, deepest + 1)) + " |",
                      "|---|" + "---|" * deepest]
            for name, s in trees.items():
                cells = [_pct(v) for v in s["depth_acceptance"]] + ["–"] * (deepest - len(s["depth_acceptance"]))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        cost = next(iter(trees.values()))["verification_ms"]
        base = cost.get("1")
        lines += ["", "Verification cost by tree size (nodes, the newest token included; median ms of one forward "
                  "after the first prompt):", "",
                  *_wide_table("nodes", cost, {"ms": lambda v: f"{v:.1f}", "× one node": lambda v: f"{v / base:.2f}"})]
        lines += _context_lines(next((s["context_costs"] for s in trees.values() if s.get("context_costs")), None))
    if r["sweep"]:
        lines += ["", "## Threshold sweep", "",
                  f"{r['sweep'][0]['system']} on the first {r['settings']['sweep_prompts']} prompts, each threshold "
                  "interleaved with the dense bundle; agreement is teacher-forced.", "",
                  "| threshold | decode tok/s | × dense bundle | teacher-forced agreement | exact match | "
                  "mean executed layers |", "|---|---|---|---|---|---|"]
        for row in r["sweep"]:
            lines.append(f"| {row['threshold']:.2f} | {row['decode_tps_median']:.1f} | {_x(row['speedup_vs_dense'])} | "
                         f"{_pct(row['teacher_forced_agreement'])} | {row['exact_match']:.0%} | "
                         f"{row['mean_executed_layers']:.2f} |")
    if r.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in r["plots"].items()]
    return "\n".join(lines) + "\n"


def _context_lines(costs: dict | None) -> list[str]:
    """The tree forward's cost against the context length, and where it goes (--verify-contexts)."""
    if not costs:
        return []
    measured = {n: c for n, c in costs.items() if n != "operators" and "dense_steps" in c}
    sizes = sorted({int(k) for c in measured.values() for k in c["dense_steps"]})
    lines = ["", "Verification cost by context length: one tree forward of each size, in dense steps at the same "
             "context (the prompts run together, cut to that many tokens; medians):", "",
             "| context | dense step ms | " + " | ".join(f"{k} nodes" for k in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for n, c in measured.items():
        cells = [f"{c['dense_steps'][str(k)]:.2f}" if str(k) in c["dense_steps"] else "–" for k in sizes]
        lines.append(f"| {n} | {c['dense_step_ms']:.1f} | " + " | ".join(cells) + " |")
    operators = costs.get("operators")
    if operators:
        first = next(iter(operators.values()))
        names = [k for k in first["tree_forward"] if k != "(run)"][:6]
        lines += ["", f"Where it goes: ONNX Runtime's profile, ms per forward by operator type (the profiler's own cost "
                  f"included), dense step and a tree of {first['tree_nodes']} nodes:", "",
                  "| context | forward | run | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for n, o in operators.items():
            for label, ops in (("dense step", o["dense_step"]), (f"tree, {o['tree_nodes']} nodes", o["tree_forward"])):
                lines.append(f"| {n} | {label} | {ops.get('(run)', 0):.1f} | "
                             + " | ".join(f"{ops.get(k, 0):.1f}" for k in names) + " |")
    return lines


def _wide_table(label: str, columns: dict, rows: dict) -> list[str]:
    """A table with one column per key of ``columns`` and one row per ``rows`` entry, whose
    function formats a column's value."""
    lines = [f"| {label} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    return lines + [f"| {name} | " + " | ".join(cell(v) for v in columns.values()) + " |"
                    for name, cell in rows.items()]


def _plots(r: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    systems = r["systems"]
    names = list(systems)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    med = [systems[n]["decode_tps_median"] for n in names]
    err = [[m - systems[n]["decode_tps_q1"] for n, m in zip(names, med)],
           [systems[n]["decode_tps_q3"] - m for n, m in zip(names, med)]]
    ax.bar(names, med, yerr=err, capsize=4, color=["C0" if systems[n]["kind"] != "specee" else "C2" for n in names])
    for k, n in enumerate(names):
        ax.annotate(_x(systems[n]["speedup_vs_dense"]), (k, systems[n]["decode_tps_q3"]), ha="center", va="bottom",
                    xytext=(0, 6), textcoords="offset points")
    ax.set_ylabel("decode tokens/s (median, IQR)")
    ax.set_title(f"{r['model']['source']}: decode speed, × dense bundle")
    fig.autofmt_xdate(rotation=15)
    written["speed"] = _save(fig, out / PLOTS["speed"])

    spec = [n for n in names if systems[n]["kind"] == "specee"]
    if spec:
        L = r["model"]["num_layers"]
        fig, axes = plt.subplots(len(spec), 1, figsize=(8, 2.6 * len(spec)), squeeze=False)
        for ax, n in zip(axes[:, 0], spec):
            hist = systems[n]["exit_histogram"]
            ax.bar([int(k) for k in hist], list(hist.values()), color="C2")
            ax.set_xlim(-0.5, L - 0.5)
            ax.set_title(f"{n}: exit layer per decode step (mean executed {systems[n]['mean_executed_layers']:.2f} "
                         f"of {L})")
            ax.set_ylabel("steps")
        axes[-1, 0].set_xlabel("exit layer (the last one is full depth)")
        written["exits"] = _save(fig, out / PLOTS["exits"])
    if r["sweep"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [row["teacher_forced_agreement"] for row in r["sweep"]]
        ys = [row["speedup_vs_dense"] for row in r["sweep"]]
        ax.plot(xs, ys, "o-", color="C2")
        for row, x, y in zip(r["sweep"], xs, ys):
            ax.annotate(f"{row['threshold']:.2f}", (x, y), xytext=(4, 4), textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("teacher-forced agreement with dense greedy")
        ax.set_ylabel("decode speed × dense bundle")
        ax.set_title(f"{r['sweep'][0]['system']}: threshold sweep")
        written["frontier"] = _save(fig, out / PLOTS["frontier"])
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.partial")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finite_or_null(x):
    """NaN and infinities become null: report.json stays standard JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x


def _x(v) -> str:
    return f"{v:.2f}×" if _finite(v) else "–"


def _pct(v) -> str:
    return f"{v:.1%}" if _finite(v) else "–"


def _num(v, digits: int) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "–"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
