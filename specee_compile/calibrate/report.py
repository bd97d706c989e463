"""The calibration report, printed from an artifact's JSON."""

from __future__ import annotations

import json
from pathlib import Path

from specee_compile.calibrate.pipeline import META


def format_report(artifact: Path) -> str:
    meta = json.loads((Path(artifact) / META).read_text())
    d, c, cost = meta["draft"], meta["chosen"], meta["cost_model"]
    lines = [
        f"calibration of {meta['model_dir']} ({meta['num_layers']} layers), seconds: {meta.get('seconds')}",
        f"draft: {_draft_source(d.get('training', {}), meta.get('budget'))}, vocabulary {d['vocab_size']} "
        f"({d['target_tokens_in_vocab']:.1%} of target tokens inside), "
        f"top-1/top-4 hit of the target's next token after a full-depth step "
        f"{d['top1_after_full']:.1%}/{d['top4_after_full']:.1%}, after an exit "
        f"{d['top1_after_exit']:.1%}/{d['top4_after_exit']:.1%} ({d['positions']} held-out positions)"
        + (f"; one step deeper on its own guess, top-1 {d['top1_depth2']:.1%} ({d['depth2_positions']} positions)"
           if "top1_depth2" in d else ""),
        "cost model (layer-equivalents, measured): "
        + ", ".join(f"{k} {cost[k]:.2f}" for k in ("full_head", "reduced_head", "draft", "predictor", "kv_projection")),
        "predictors on held-out samples (layer: accuracy / precision / recall, positive rate):",
    ]
    per = meta["predictors"]["per_layer"]
    for row in per:
        lines.append(f"  {row['layer']:>3}: {row['accuracy']:.3f} / {row['precision']:.3f} / {row['recall']:.3f}"
                     f"  ({row['positive_rate']:.1%})")
    search = meta["schedule_search"]
    lines += [
        f"exit counts with every predictor on: {search['exit_counts_all_on']}",
        f"chosen: rule {meta['rule']}, threshold {meta['threshold']}, offline layers "
        f"{meta['schedule']['offline_layers']} (top-{c['top_n']}), online window history "
        f"{meta['schedule']['history']} offsets {meta['schedule']['offsets']}",
        f"teacher-forced on held-out windows{' with propagated K/V' * ('dense_kv_replay' in c)}: agreement "
        f"{c['agreement']:.2%}{_bound(c, meta)}, mean executed layers {c['mean_layers']:.2f}, mean step cost "
        f"{c['relative_cost']:.1%} of dense, draft top-4 hit {c['draft_top4_hit']:.1%}",
        "schedule search (top-N, threshold: agreement (its lower bound), cost with dense K/V; checked with "
        "propagated K/V):",
    ]
    for row in search["rows"]:
        checked = row.get("propagated")
        lines.append(f"  N={row['top_n']:>2} t={row['threshold']:.2f}: {row['agreement']:.2%}{_bound(row)}, "
                     f"{row['relative_cost']:.1%}, {row['mean_layers']:.2f} layers"
                     + (f"; propagated {checked['agreement']:.2%}{_bound(checked)}, {checked['relative_cost']:.1%}"
                        if checked else ""))
    return "\n".join(lines)


def _bound(row: dict, meta: dict | None = None) -> str:
    """The agreement's lower confidence bound, for artifacts that record it."""
    if "agreement_low" not in row:
        return ""
    confidence = f" at {meta['settings']['agreement_confidence']:.0%} confidence" if meta else ""
    return f" (lower bound{confidence} {row['agreement_low']:.2%})"


def _draft_source(training: dict, budget: dict | None) -> str:
    if "supplied" in training:
        return f"given ({training['supplied']})"
    epochs = len(training.get("epochs", []))
    sized = f", sized by a {budget['predicted_minutes']:.0f}-minute plan" if budget else ""
    return f"trained here ({epochs} epochs{sized})"


def evaluate_and_report(model, artifact: Path, questions: int, free: int, new_tokens: int,
                        dense_bundle: str | None = None, progress: bool = True) -> str:
    """Run the MT-Bench evaluation, write evaluation.json next to the artifact, return a table."""
    from specee_compile import load as model_load
    from specee_compile import resources
    from specee_compile.calibrate.evaluate import dense_greedy, free_running, teacher_forced
    from specee_compile.calibrate.pipeline import load_calibration
    from specee_compile.calibrate.simulate import CostModel

    model_dir = model_load.resolve(model)
    target, tokenizer = model_load.load(model_dir)
    cal = load_calibration(artifact, target)
    costs = CostModel(**cal.meta["cost_model"])
    eos = {tokenizer.eos_token_id} | set(_as_list(target.generation_config.eos_token_id))
    eos.discard(None)
    chat = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            for q in resources.mtbench_questions(questions)]
    if dense_bundle:
        from specee_compile.runtimes import load

        engine = load(dense_bundle, dense=True)  # a SpecEE bundle holds its dense graph too
        dense = [engine.generate(ids, max_new_tokens=new_tokens).token_ids for ids in chat]
    else:
        dense = dense_greedy(target, chat, new_tokens, eos, progress)
    thresholds = sorted({0.3, 0.5, 0.7, 0.8, 0.9, 0.95, cal.threshold})
    tf = teacher_forced(target, cal, costs, chat, dense, thresholds, progress=progress)
    fr = free_running(target, cal, chat[:free], dense[:free], new_tokens, eos, cal.threshold,
                      progress=progress) if free else []
    result = {"questions": questions, "new_tokens": new_tokens, "default_threshold": cal.threshold,
              "bounds": tf[0], "teacher_forced": tf[1:], "free_running": fr}
    (Path(artifact) / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"MT-Bench first {questions} questions x {new_tokens} tokens, teacher-forced "
             "(cost in layer-equivalents relative to dense; mask / propagate):",
             "| rule | threshold | agreement | cost mask | cost propagate | mean layers | draft top-4 hit |",
             "|---|---|---|---|---|---|---|"]
    bounds, tf = tf[0], tf[1:]
    lines.insert(1, f"ideal bound (stop for free at the first correct layer): {bounds['ideal_mean_layers']:.2f} layers, "
                    f"cost {bounds['ideal_relative_cost']:.1%}; perfect predictor with this draft: "
                    f"{bounds['oracle_mean_layers']:.2f} layers, cost {bounds['oracle_relative_cost']:.1%}; "
                    f"draft top-4 hit {bounds['draft_top4_hit_full_depth']:.1%}")
    for r in tf:
        lines.append(f"| {r['rule']} | {r['threshold']} | {r['agreement']:.2%} | {r['relative_cost_mask']:.1%} "
                     f"| {r['relative_cost_propagate']:.1%} | {r['mean_layers']:.2f} | {r['draft_top4_hit']:.1%} |")
    if fr:
        lines += ["", f"free-running, first {free} questions, threshold {cal.threshold}:",
                  "| rule | KV policy | exact match | mean first divergence | mean layers |", "|---|---|---|---|---|"]
        for r in fr:
            lines.append(f"| {r['rule']} | {r['kv_policy']} | {r['exact_match']:.1%} | "
                         f"{r['mean_first_divergence']:.1f} | {r['mean_layers']:.2f} |")
    return "\n".join(lines)


def _as_list(x):
    return [] if x is None else [x] if isinstance(x, int) else list(x)
