"""Teacher-forced SpecEE decisions over precomputed hidden states, and the cost model.

Given a dense pass over a sequence (every layer's normed state at every position), replay
the SpecEE step at each position exactly as the reference decoder makes it: the draft is
fed the previous position's exit-layer feature, the schedule follows the exit history, the
predictors and exit rule decide. "Teacher-forced" means every step sees the dense prefix.

A dense pass gives every earlier position the K/V of every layer, where a bundle's exited
position writes its deeper layers' K/V from its exit state (``propagate``), and the later
steps read those. ``propagated_replays`` replays on passes recomputed that way until the
exits they produce are the exits they were computed with: what a decoder does step by step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from specee_compile.reference import DecodeSettings, StepCounts, exit_rule
from specee_compile.schedule import Schedule


@dataclass
class Replay:
    emitted: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    steps: list[StepCounts] = field(default_factory=list)
    draft_hits: list[bool] = field(default_factory=list)  # dense token among the 4 candidates


def replay_window(target, draft, bank, schedule, settings, p, lo: int, end: int | None = None,
                  head_tokens=None) -> Replay:
    """Replay the decode steps at positions lo..end-1 of a dense pass ``p`` (collect.TargetPass);
    positions before ``lo`` are the prompt, run through the draft as its prefill.
    ``head_tokens`` [L, end-lo] are the rule's precomputed head argmaxes, if known (so a sweep
    does not repeat the head products)."""
    return replay_window_many(target, draft, bank, [(schedule, settings)], p, lo, end, head_tokens)[0]


def replay_window_many(target, draft, bank, policies, p, lo: int, end: int | None = None,
                       head_tokens=None) -> list[Replay]:
    """``replay_window`` for several (schedule, settings) policies at once (``replay_windows``)."""
    return replay_windows(target, draft, bank, policies, [(p, lo, end, head_tokens)])[0]


@torch.no_grad()
def replay_windows(target, draft, bank, policies: list[tuple[Schedule, DecodeSettings]], windows,
                   rows: int = 96, progress: bool = False, desc: str = "replay") -> list[list[Replay]]:
    """Every (schedule, settings) policy over every window (p, lo, end, head_tokens) ->
    [window][policy] replays.

    Teacher forcing feeds every policy of a window the same tokens, so all the draft steps at
    the same offset into their windows run as one batch of windows x policies rows (about
    ``rows`` rows per batch): the policies differ only in the features their exits feed the
    draft, and the batch reads the draft's weights once per step for all of them. Windows have prefixes of different lengths; each is left-padded (masked)
    to the longest of its batch and rotated from there, which RoPE's relative positions make
    the same attention."""
    chunk = max(1, rows // len(policies))
    chunks = [windows[first:first + chunk] for first in range(0, len(windows), chunk)]
    lengths = [max((p.ids.numel() if end is None else end) - lo for p, lo, end, _ in c) for c in chunks]
    out = []
    with tqdm(total=sum(lengths), desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for c in chunks:
            out += _replay_chunk(target, draft, bank, policies, c, bar)
    return out


def _replay_chunk(target, draft, bank, policies, windows, bar) -> list[list[Replay]]:
    L = windows[0][0].z.shape[0]
    w = target.lm_head.weight
    P = len(policies)
    spans = [(p, lo, p.ids.numel() if end is None else end, heads) for p, lo, end, heads in windows]
    pad = max(lo for _, lo, _, _ in spans) - 1  # the longest prefix: draft rows 1 .. lo-1
    keys, values, valid = [], [], []
    for p, lo, _, _ in spans:  # each prefix ends at row pad - 1, its positions shifted to match
        shift = pad - (lo - 1)
        _, _, (k, v) = draft(p.ids[None, 1:lo], draft.inputs(p.z[:, : lo - 1], L - 1)[None], None, 1 + shift)
        blank = k.new_zeros(1, k.shape[1], shift, k.shape[3])
        keys.append(torch.cat([blank, k], dim=2).expand(P, -1, -1, -1))
        values.append(torch.cat([blank, v], dim=2).expand(P, -1, -1, -1))
        valid.append((torch.arange(pad) >= shift).expand(P, -1))
    cache = (torch.cat(keys), torch.cat(values))  # [windows * policies, KVH, pad, D]
    valid = torch.cat(valid)  # [rows, pad]: the padding is never attended to
    features = torch.cat([draft.inputs(p.z[:, lo - 1:lo], L - 1).expand(P, -1) for p, lo, _, _ in spans])
    outs = [[Replay() for _ in policies] for _ in spans]
    histories = [[[] for _ in policies] for _ in spans]
    steps = max(end - lo for _, lo, end, _ in spans)
    for t in range(steps):
        tokens = torch.tensor([int(p.ids[min(lo + t, end - 1)]) for p, lo, end, _ in spans]).repeat_interleave(P)
        valid = torch.cat([valid, torch.ones(len(valid), 1, dtype=torch.bool)], dim=1)
        _, logits, cache = draft(tokens[:, None], features[:, None], cache, pad + 1 + t, mask=valid[:, None, None, :])
        proposals = draft.vocab_map[logits[:, -1].topk(4).indices]  # [rows, 4]
        live = [i for i, (_, lo, end, _) in enumerate(spans) if lo + t < end]  # the others run along
        votes = {}  # (window, policy): its active layers and which of their predictors fire
        for i in live:
            p, lo, _, _ = spans[i]
            for j, (schedule, settings) in enumerate(policies):
                active = sorted(schedule.active(histories[i][j]))
                rows = w[proposals[i * P + j]]
                votes[i, j] = active, _fired(bank, active, p.z[:, lo + t], rows, settings.threshold) if active else []
        known = _fired_heads(target, draft, spans, policies, votes, t)
        exits = []
        for i, (p, lo, _, heads) in enumerate(spans):
            if i not in live:  # this window is done; its rows run along until the longest is
                exits += [L - 1] * P
                continue
            given = dict(enumerate(heads[:, t].tolist())) if heads is not None else None
            for j, (_, settings) in enumerate(policies):
                step_heads = given if given is not None else known.get((i, settings.rule), {})
                exits.append(_decide(settings, proposals[i * P + j], p.z[:, lo + t], int(p.next_token[lo + t]),
                                     *votes[i, j], step_heads, w, draft.vocab_map, L, histories[i][j], outs[i][j]))
        z_rows = torch.stack([p.z[:, min(lo + t, end - 1)] for p, lo, end, _ in spans], dim=1)  # [L, windows, d]
        features = draft.inputs(z_rows.repeat_interleave(P, dim=1), torch.tensor(exits))
        bar.update()
    return outs


def _fired_heads(target, draft, spans, policies, votes: dict, t: int) -> dict:
    """The rule's head token at every layer whose predictor fired at step ``t`` in a window
    without precomputed head tokens, {(window, rule): {layer: token}}, in one product per rule
    (one at a time, each product reads the whole head: 12 ms apiece on SmolLM2)."""
    need = {(i, layer, policies[j][1].rule) for (i, j), (active, fired) in votes.items() if spans[i][3] is None
            for layer, f in zip(active, fired) if f and policies[j][1].rule != "draft"}
    out = {}
    for rule in {r for _, _, r in need}:
        keys = sorted(k for k in need if k[2] == rule)
        z = torch.stack([spans[i][0].z[layer, spans[i][1] + t] for i, layer, _ in keys])
        for (i, layer, _), token in zip(keys, rule_tokens(target, draft, z[None], rule)[0].tolist()):
            out.setdefault((i, rule), {})[layer] = token
    return out


def _decide(settings, ids, z_t, dense_next: int, active: list[int], fired: list[bool], heads: dict, w, vocab_map,
            L: int, history: list[int], out: Replay) -> int:
    """One policy's SpecEE step at one position (the reference decoder's decision), given its
    active layers, which of their predictors fired and ``heads`` ({layer: the rule's head token
    there}, where known): append it to ``out`` and ``history`` and return the exit layer."""
    counts = StepCounts()
    emitted, exit_layer = None, L - 1
    for k, layer in enumerate(active):  # the reference decoder's order: first layer whose exit holds
        if not fired[k]:
            continue
        token, c = exit_rule(z_t[layer], ids, settings, w, vocab_map, heads.get(layer))
        counts.full_heads += c.full_heads
        counts.reduced_heads += c.reduced_heads
        if token is not None:
            emitted, exit_layer = token, layer
            counts.predictors = k + 1
            break
    else:
        counts.predictors = len(active)
    if emitted is None:
        emitted = dense_next
        counts.full_heads += 1
    counts.layers = exit_layer + 1
    if settings.kv_policy == "propagate":
        counts.kv_projections = L - 1 - exit_layer
    history.append(exit_layer)
    out.emitted.append(emitted)
    out.exit_layers.append(exit_layer)
    out.steps.append(counts)
    out.draft_hits.append(dense_next in ids.tolist())
    return exit_layer


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


@torch.no_grad()
def dense_prefix(target, ids: torch.Tensor, specs) -> tuple[list, list]:
    """Every layer's K/V ([1, KVH, S, D] each) of a dense pass over ``ids`` [S]: the prefix
    ``propagated_pass`` starts from."""
    from specee_compile.architecture import Architecture
    from specee_compile.functional import layer_step

    arch = Architecture(target)
    h, positions = arch.embed(ids[None]), torch.arange(ids.numel())
    empty = h.new_zeros(1, arch.kv_heads, 0, arch.head_dim)
    keys, values = [], []
    for spec in specs:
        h, k, v = layer_step(spec, h, empty, empty, positions)
        keys.append(k)
        values.append(v)
    return keys, values


@torch.no_grad()
def propagated_pass(target, ids: torch.Tensor, exits: torch.Tensor, specs=None, prefix=None):
    """The teacher-forced pass (``collect.TargetPass``) over ``ids`` [S] when position t leaves at
    layer ``exits[t]`` ([S]; L-1: it runs every layer): in every layer after its exit, t's K/V
    are computed from its exit state, as a bundle propagates them, and later positions attend
    to those. Layers a position skipped still get states here (nothing reads them but its own
    replay, which stops at the exit). ``specs``: ``Architecture.specs`` of at least S positions.

    ``prefix``: ``dense_prefix`` of the first P positions (which must not exit); the pass then
    runs positions P..S-1 only and returns theirs."""
    from specee_compile.architecture import Architecture
    from specee_compile.calibrate.collect import TargetPass
    from specee_compile.functional import layer_step

    arch = Architecture(target)
    specs = specs or arch.specs(ids.numel())
    first = prefix[0][0].shape[2] if prefix else 0
    ids, exits = ids[first:], exits[first:]
    positions = torch.arange(first, first + ids.numel())
    h = arch.embed(ids[None])
    left = torch.zeros_like(h)  # each position's exit state, from its exit layer on
    empty = h.new_zeros(1, arch.kv_heads, 0, arch.head_dim)
    z = []
    for j, spec in enumerate(specs):
        gone = exits < j
        past_k, past_v = (prefix[0][j], prefix[1][j]) if prefix else (empty, empty)
        h, _, _ = layer_step(spec, h, past_k, past_v, positions, kv_from=(gone, left) if gone.any() else None)
        left = torch.where((exits == j)[None, :, None], h, left)
        z.append(target.model.norm(h[0]))
    z = torch.stack(z)
    return TargetPass(ids, z, (z[-1] @ target.lm_head.weight.T).argmax(-1))


@torch.no_grad()
def propagated_replays(target, draft, bank, policy: tuple[Schedule, DecodeSettings], windows, rounds: int = 3,
                       prefixes: dict | None = None, first: list[Replay] | None = None,
                       progress: bool = False) -> tuple[list[Replay], int]:
    """One policy's replays of ``windows`` (p, lo, end) with the K/V a decoder leaves behind an
    exit: replay on the dense passes, recompute each window's pass with the exits it made
    (``propagated_pass``, from the window's start on), replay on that, and so on until a
    window's exits repeat (then its replay is the decoder's, step by step) or ``rounds`` passes
    were made. Emitted tokens at full depth are the recomputed pass's; compare them with the
    dense pass's. ``prefixes`` keeps each window's ``dense_prefix`` across calls (a pass that kept
    its window's, ``TargetPass.prefix``, gives it without a pass); ``first``: the
    policy's replays on the dense passes, if made already. Returns the replays and how many
    windows did not settle."""
    from specee_compile.architecture import Architecture
    from specee_compile.calibrate.collect import TargetPass

    L = windows[0][0].z.shape[0]
    prefixes = {} if prefixes is None else prefixes
    replays = list(first) if first is not None else [
        r[0] for r in replay_windows(target, draft, bank, [policy], [(p, lo, end, None) for p, lo, end in windows])]
    todo = list(range(len(windows)))
    specs = Architecture(target).specs(max(p.ids.numel() for p, _, _ in windows))
    bar = tqdm(total=rounds * len(windows), desc="replays with propagated K/V", unit="pass", disable=not progress,
               leave=False)
    for done_rounds in range(rounds):
        bar.total = bar.n + (rounds - done_rounds) * len(todo)  # settled windows are not passed again
        bar.refresh()
        if not todo:
            break
        passes = []
        for i in todo:
            p, lo, end = windows[i]
            end = p.ids.numel() if end is None else end
            if i not in prefixes:  # the dense pass's own, if it kept this one
                kept = p.prefix is not None and p.prefix[0][0].shape[2] == lo
                prefixes[i] = p.prefix if kept else dense_prefix(target, p.ids[:lo], specs)
            exits = torch.full((end,), L - 1)
            exits[lo:lo + len(replays[i].exit_layers)] = torch.tensor(replays[i].exit_layers)
            q = propagated_pass(target, p.ids[:end], exits, specs, prefixes[i])
            whole = TargetPass(p.ids[:end], torch.cat([p.z[:, :lo], q.z], 1), torch.cat([p.next_token[:lo], q.next_token]))
            passes.append((whole, lo, None, None))
            bar.update()
        again = replay_windows(target, draft, bank, [policy], passes)
        settled = []
        for i, r in zip(todo, again):
            settled.append(r[0].exit_layers == replays[i].exit_layers)
            replays[i] = r[0]
        todo = [i for i, done in zip(todo, settled) if not done]
    bar.close()
    return replays, len(todo)


FEW_ROWS = 64  # rule_tokens: products of this many rows or fewer run in torch


@torch.no_grad()
def rule_tokens(target, draft, z: torch.Tensor, rule: str, rows: int = 1024):
    """The exit rule's head argmax at every layer and position of z [L, N, d] ([L, N] target ids),
    or None for the draft-only rule, which needs no head.

    The calibration's largest product (SmolLM2: 30 layers x 128 positions x 49152 x 576 per
    sequence). It runs as 2-D products of ``rows`` rows through numpy's BLAS: 2.2x faster
    than batched torch matmuls over the layers on the 2-core AMD EPYC this was measured on.
    A few rows (``FEW_ROWS`` or fewer: the replays' heads of one step) go through torch
    instead. Between torch's ops, numpy's BLAS threads spin after each call and take the
    cores from torch's: a replay round of SmolLM2's check (48 windows x 40 steps) took 8.3-8.5 s
    with its step heads in numpy, 5.2-5.5 s in torch, same decisions."""
    if rule == "draft":
        return None
    w = (target.lm_head.weight if rule == "full" else target.lm_head.weight[draft.vocab_map]).detach()
    flat = z.detach().reshape(-1, z.shape[-1])  # [L*N, d]
    if len(flat) <= FEW_ROWS:
        out = torch.mm(w, flat.T).argmax(0)
    else:
        flat, head = flat.contiguous().numpy(), w.numpy().T  # head [d, V]: a transposed view, which BLAS takes as is
        out = np.empty(len(flat), np.int64)
        for start in range(0, len(flat), rows):
            out[start:start + rows] = (flat[start:start + rows] @ head).argmax(-1)
        out = torch.from_numpy(out)
    out = out.view(z.shape[:2])
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
