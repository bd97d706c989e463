"""Quality and cost of SpecEE decisions against dense greedy decoding on a prompt set.

- teacher-forced agreement: at every dense-greedy position, does the SpecEE step (given the
  dense prefix) emit the dense token? Replayed from one dense pass per prompt, for every
  exit rule and threshold: cheap, so it draws the frontier.
- free-running: the reference decoder generates on its own; exact-match rate and mean
  first-divergence position against dense greedy, for every rule and KV policy.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch
from tqdm.auto import tqdm

from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.pipeline import Calibration
from specee_compile.calibrate.simulate import CostModel, replay_window, rule_tokens
from specee_compile.reference import KV_POLICIES, RULES, DecodeSettings, ReferenceDecoder


@torch.no_grad()
def dense_greedy(target, prompts: list[list[int]], new_tokens: int, eos_ids, progress=True) -> list[list[int]]:
    out = []
    for ids in tqdm(prompts, desc="dense greedy", disable=not progress):
        gen = target.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=list(eos_ids), pad_token_id=list(eos_ids)[0])
        out.append([t for t in gen[0, len(ids):].tolist() if t not in eos_ids])
    return out


@torch.no_grad()
def teacher_forced(target, cal: Calibration, costs: CostModel, prompts, dense, thresholds, rules=RULES,
                   progress=True) -> list[dict]:
    """Agreement / cost / executed layers for every (rule, threshold), from one dense pass per prompt."""
    L = target.config.num_hidden_layers
    windows = []
    for ids, cont in zip(prompts, dense):
        if len(cont) < 2:
            continue
        p = target_pass(target, ids + cont)
        windows.append((p, len(ids)))
    rows = [_bounds(target, cal, costs, windows)]
    heads = {rule: [rule_tokens(target, cal.draft, p.z[:, lo:-1], rule) for p, lo in windows] for rule in rules}
    combos = [(r, t) for r in rules for t in thresholds]
    for rule, threshold in tqdm(combos, desc="teacher-forced sweep", disable=not progress):
        settings = DecodeSettings(rule=rule, threshold=threshold)
        agree = total = 0
        cost = {policy: 0.0 for policy in KV_POLICIES}
        layers = hits = 0
        for (p, lo), known in zip(windows, heads[rule]):
            end = p.ids.numel() - 1  # the last position predicts past the dense continuation
            r = replay_window(target, cal.draft, cal.bank, cal.schedule, settings, p, lo, end, known)
            dense_tokens = p.next_token[lo:end].tolist()
            agree += sum(a == b for a, b in zip(r.emitted, dense_tokens))
            total += len(dense_tokens)
            layers += sum(s.layers for s in r.steps)
            hits += sum(r.draft_hits)
            for policy in KV_POLICIES:
                for s in r.steps:
                    c = dataclasses.replace(s, kv_projections=(L - s.layers) if policy == "propagate" else 0)
                    cost[policy] += costs.step_cost(c)
        dense_cost = costs.dense_cost(L)
        rows.append({"rule": rule, "threshold": threshold, "agreement": agree / total,
                     "mean_layers": layers / total, "draft_top4_hit": hits / total, "positions": total,
                     **{f"relative_cost_{k}": v / total / dense_cost for k, v in cost.items()}})
    return rows


@torch.no_grad()
def _bounds(target, cal: Calibration, costs: CostModel, windows) -> dict:
    """The ideal bound (every token stops for free at its first layer whose full-head argmax
    is the dense token) and the draft oracle (a perfect predictor with this draft: it stops
    there only when the dense token is among the draft's 4 candidates)."""
    L = target.config.num_hidden_layers
    ideal, oracle, hits, n = [], [], 0, 0
    for p, lo in windows:
        argmax = rule_tokens(target, cal.draft, p.z[:, lo:-1], "full")  # [L, N]
        dense = p.next_token[lo:-1]
        correct = argmax == dense[None, :]
        first = correct.float().argmax(0)  # the last layer is always correct
        _, logits, _ = cal.draft(p.ids[None, 1:-1], cal.draft.inputs(p.z[:, :-2], L - 1)[None], None, 1)
        top = cal.draft.vocab_map[logits[0].topk(4).indices][lo - 1:]  # candidates at positions lo..
        hit = (top == dense[:, None]).any(-1)
        ideal += first.tolist()
        oracle += torch.where(hit, first, torch.full_like(first, L - 1)).tolist()
        hits += int(hit.sum())
        n += dense.numel()
    dense_cost = costs.dense_cost(L)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"rule": "bounds", "ideal_mean_layers": mean(ideal) + 1,
            "ideal_relative_cost": (mean(ideal) + 1 + costs.full_head) / dense_cost,
            "oracle_mean_layers": mean(oracle) + 1,
            "oracle_relative_cost": (mean(oracle) + 1 + costs.full_head + costs.draft) / dense_cost,
            "draft_top4_hit_full_depth": hits / n, "positions": n}


@torch.no_grad()
def free_running(target, cal: Calibration, prompts, dense, new_tokens, eos_ids, threshold, rules=RULES,
                 policies=KV_POLICIES, progress=True) -> list[dict]:
    """Exact-match rate and mean first-divergence position of the reference decoder."""
    rows = []
    for rule in rules:
        for policy in policies:
            dec = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                                   DecodeSettings(rule=rule, kv_policy=policy, threshold=threshold))
            exact, diverge, layers = 0, [], []
            for ids, ref in tqdm(list(zip(prompts, dense)), desc=f"free-running {rule}/{policy}",
                                 disable=not progress):
                got = dec.generate(ids, new_tokens, eos_ids=set(eos_ids))
                exact += got.tokens == ref
                first = next((k for k, (a, b) in enumerate(zip(got.tokens, ref)) if a != b), min(len(got.tokens),
                                                                                               len(ref)))
                diverge.append(first)
                layers += [s.layers for s in got.steps]
            rows.append({"rule": rule, "kv_policy": policy, "threshold": threshold,
                         "exact_match": exact / len(prompts), "mean_first_divergence": statistics.mean(diverge),
                         "mean_layers": statistics.mean(layers) if layers else float("nan")})
    return rows
