"""Teacher-forced SpecEE decisions over precomputed hidden states, and the cost model.

Given a dense pass over a sequence (every layer's normed state at every position), replay
the SpecEE step at each position exactly as the reference decoder makes it: the draft is
fed the previous position's exit-layer feature, the schedule follows the exit history, the
predictors and exit rule decide. "Teacher-forced" means every step sees the dense prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specee_compile.reference import DecodeSettings, StepCounts, exit_rule
from specee_compile.schedule import Schedule


@dataclass
class Replay:
    emitted: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    steps: list[StepCounts] = field(default_factory=list)
    draft_hits: list[bool] = field(default_factory=list)  # dense token among the 4 candidates


@torch.no_grad()
def replay(target, draft, bank, schedule: Schedule, settings: DecodeSettings, z, tokens_in, dense_next,
           feature_before, draft_cache, start_position: int, head_tokens=None) -> Replay:
    """z [L, N, d] at consecutive positions; tokens_in [N] fed at them; dense_next [N] the dense tokens.

    ``head_tokens`` [L, N], if given, holds the exit rule's head argmax at every layer and
    position (precomputed once, so a sweep does not repeat the head products)."""
    return replay_many(target, draft, bank, [(schedule, settings)], z, tokens_in, dense_next, feature_before,
                       draft_cache, start_position, head_tokens)[0]


@torch.no_grad()
def replay_many(target, draft, bank, policies: list[tuple[Schedule, DecodeSettings]], z, tokens_in, dense_next,
                feature_before, draft_cache, start_position: int, head_tokens=None) -> list[Replay]:
    """``replay`` of several (schedule, settings) policies over the same positions in lockstep.
    Teacher forcing feeds every policy the same tokens, so their draft steps run as one batch
    (the policies differ only in the features their exits feed the draft)."""
    L = z.shape[0]
    w = target.lm_head.weight
    outs = [Replay() for _ in policies]
    histories: list[list[int]] = [[] for _ in policies]
    features = feature_before.expand(len(policies), -1)
    cache = tuple(c.expand(len(policies), -1, -1, -1) for c in draft_cache)
    for t in range(z.shape[1]):
        proposals, cache = draft.propose_rows(int(tokens_in[t]), features, cache, start_position + t)
        exits = []
        for (schedule, settings), ids, history, out in zip(policies, proposals, histories, outs):
            rows = w[ids]
            counts = StepCounts()
            emitted, exit_layer = None, L - 1
            active = sorted(schedule.active(history))
            fired = _fired(bank, active, z[:, t], rows, settings.threshold) if active else []
            for k, layer in enumerate(active):  # the reference decoder's order: first layer whose exit holds
                if not fired[k]:
                    continue
                known = int(head_tokens[layer, t]) if head_tokens is not None else None
                token, c = exit_rule(z[layer, t], ids, settings, w, draft.vocab_map, known)
                counts.full_heads += c.full_heads
                counts.reduced_heads += c.reduced_heads
                if token is not None:
                    emitted, exit_layer = token, layer
                    counts.predictors = k + 1
                    break
            else:
                counts.predictors = len(active)
            if emitted is None:
                emitted = int(dense_next[t])
                counts.full_heads += 1
            counts.layers = exit_layer + 1
            if settings.kv_policy == "propagate":
                counts.kv_projections = L - 1 - exit_layer
            exits.append(exit_layer)
            history.append(exit_layer)
            out.emitted.append(emitted)
            out.exit_layers.append(exit_layer)
            out.steps.append(counts)
            out.draft_hits.append(int(dense_next[t]) in ids.tolist())
        features = draft.inputs(z[:, t, None].expand(-1, len(exits), -1), torch.tensor(exits))
    return outs


def _fired(bank, active: list[int], z_t: torch.Tensor, rows: torch.Tensor, threshold: float) -> list[bool]:
    """Whether each active layer's predictor fires at this position, all layers at once (what
    ``reference.exit_decision`` computes one layer at a time: ``dp`` is the change from the
    previous active layer's probabilities)."""
    idx = torch.tensor(active)
    logits = z_t[idx] @ rows.T  # [A, 4]
    p = logits.softmax(-1)
    dp = torch.cat([p[:1], p[1:] - p[:-1]])
    feats = torch.cat([logits, p, dp], dim=-1)  # [A, 12]
    return (bank.score_layers(idx, feats) > threshold).tolist()


def replay_window(target, draft, bank, schedule, settings, p, lo: int, end: int | None = None,
                  head_tokens=None) -> Replay:
    """Replay the decode steps at positions lo..end-1 of a dense pass ``p`` (collect.TargetPass);
    positions before ``lo`` are the prompt, run through the draft as its prefill.
    ``head_tokens`` [L, end-lo] are the rule's precomputed head argmaxes, if known."""
    return replay_window_many(target, draft, bank, [(schedule, settings)], p, lo, end, head_tokens)[0]


def replay_window_many(target, draft, bank, policies, p, lo: int, end: int | None = None,
                       head_tokens=None) -> list[Replay]:
    """``replay_window`` for several (schedule, settings) policies at once (``replay_many``)."""
    end = p.ids.numel() if end is None else end
    L = p.z.shape[0]
    _, _, cache = draft(p.ids[None, 1:lo], draft.inputs(p.z[:, : lo - 1], L - 1)[None], None, 1)
    return replay_many(target, draft, bank, policies, p.z[:, lo:end], p.ids[lo:end], p.next_token[lo:end],
                       draft.inputs(p.z[:, lo - 1:lo], L - 1)[0], cache, lo, head_tokens)


@torch.no_grad()
def rule_tokens(target, draft, z: torch.Tensor, rule: str, chunk: int = 64):
    """The exit rule's head argmax at every layer and position of z [L, N, d] ([L, N] target ids),
    or None for the draft-only rule, which needs no head."""
    if rule == "draft":
        return None
    w = target.lm_head.weight if rule == "full" else target.lm_head.weight[draft.vocab_map]
    out = torch.empty(z.shape[:2], dtype=torch.long)
    for start in range(0, z.shape[1], chunk):
        out[:, start:start + chunk] = (z[:, start:start + chunk] @ w.T).argmax(-1)
    return out if rule == "full" else draft.vocab_map[out]


@dataclass(frozen=True)
class CostModel:
    """Measured time of each part of a decode step, in units of one decoder layer."""

    layer: float = 1.0
    full_head: float = 0.0
    reduced_head: float = 0.0
    draft: float = 0.0
    predictor: float = 0.0
    kv_projection: float = 0.0
    seconds_per_layer: float = 0.0

    def step_cost(self, c: StepCounts, with_draft: bool = True) -> float:
        return (c.layers + c.full_heads * self.full_head + c.reduced_heads * self.reduced_head
                + c.predictors * self.predictor + c.kv_projections * self.kv_projection
                + (self.draft if with_draft else 0.0))

    def dense_cost(self, num_layers: int) -> float:
        return num_layers + self.full_head


def _time(fn, repeats: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


@torch.no_grad()
def measure_costs(target, draft, bank, context: int = 256) -> CostModel:
    """Time each part at batch 1 in eager PyTorch on this machine, relative to one layer."""
    from specee_compile.architecture import Architecture
    from specee_compile.functional import key_value, layer_step

    cfg = target.config
    spec = Architecture(target).spec(0, context + 8)
    past = torch.randn(1, spec.kv_heads, context, spec.head_dim)
    h = torch.randn(1, 1, cfg.hidden_size)
    pos = torch.tensor([context])
    w = target.lm_head.weight
    z = torch.randn(cfg.hidden_size)
    reduced = w[draft.vocab_map]
    feats = torch.randn(12)
    t_layer = _time(lambda: layer_step(spec, h, past, past, pos))
    dcache = (past[:, :, :64], past[:, :, :64])
    return CostModel(
        layer=1.0,
        full_head=_time(lambda: (w @ z).argmax()) / t_layer,
        reduced_head=_time(lambda: (reduced @ z).argmax()) / t_layer,
        draft=_time(lambda: draft.propose(5, z, dcache, 64)) / t_layer,
        predictor=_time(lambda: bank.score(0, feats)) / t_layer,
        kv_projection=_time(lambda: key_value(spec, h, pos)) / t_layer,
        seconds_per_layer=t_layer,
    )
