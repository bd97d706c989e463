"""The eager reference decoder: SpecEE's decode loop in plain PyTorch.

It is the executable statement of the decode semantics the compiled engine must match,
and the tool that measures quality. Batch 1, greedy; prefill is dense. Per request it keeps
its own exit history (no global state). At each decode step:

    draft_ids = draft.propose(token, feature of the previous step)      # 4 target ids
    for layer i: h = layer_i(h)
        if i is active and i < L-1:
            z = final_norm(h); features = [z @ W_c.T, softmax, change]; s = predictor_i(features)
            if s > threshold and the exit rule passes: emit its token, exit at i
    otherwise emit argmax(lm_head(final_norm(h))) after the last layer

Exit rules: ``full`` (the paper: argmax of the full LM head must be a draft token),
``reduced`` (argmax over the draft's reduced vocabulary must be a draft token), ``draft``
(emit the best of the 4 draft logits, no head product). KV policies for the layers a token
skipped: ``mask`` (their K/V stay missing and are masked out forever, as the authors' code)
and ``propagate`` (their K/V are computed from the exit hidden state, CALM-style).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specee_compile.architecture import Architecture
from specee_compile.functional import key_value, layer_step
from specee_compile.predictor import PredictorBank, candidate_features
from specee_compile.schedule import Schedule

RULES = ("full", "reduced", "draft")
KV_POLICIES = ("mask", "propagate")


@dataclass(frozen=True)
class DecodeSettings:
    rule: str = "full"
    kv_policy: str = "mask"
    threshold: float = 0.5

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"exit rule '{self.rule}' is unknown; choose one of {RULES}")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"KV policy '{self.kv_policy}' is unknown; choose one of {KV_POLICIES}")


@dataclass
class StepCounts:
    """What one decode step executed, for the cost model."""

    layers: int = 0
    predictors: int = 0
    full_heads: int = 0
    reduced_heads: int = 0
    kv_projections: int = 0


@dataclass
class ReferenceResult:
    tokens: list[int]
    exit_layers: list[int]  # one per token; the prefill token and full-depth tokens get L-1
    steps: list[StepCounts] = field(default_factory=list)


@dataclass
class DecodeState:
    """One request's decoding state: per-layer caches with validity, the exit history."""

    n: int  # positions in the cache
    keys: list = field(default_factory=list)  # per layer [1, KVH, n, D]
    values: list = field(default_factory=list)
    valid: list = field(default_factory=list)  # per layer [n] bool
    token: int = -1  # the token to feed next
    feature: torch.Tensor | None = None  # normed hidden state the last token left from
    history: list[int] = field(default_factory=list)  # exit layer of every decode step
    draft_cache: tuple | None = None


def exit_decision(z, rows, draft_ids, prev_p, bank, layer, settings, head_weight, vocab_map, head_token=None):
    """Run the predictor at ``layer`` and the exit rule. Returns (token or None, p, counts).

    ``head_token``, when given, is the rule's head argmax already known for this z (the
    calibration replay precomputes them); the counts still charge the head product.
    """
    feats, p = candidate_features(z, rows, prev_p)
    if bank.score(layer, feats).item() <= settings.threshold:
        return None, p, StepCounts(predictors=1)
    token, counts = exit_rule(z, draft_ids, settings, head_weight, vocab_map, head_token, logits=feats[:4])
    counts.predictors = 1
    return token, p, counts


def exit_rule(z, draft_ids, settings, head_weight, vocab_map, head_token=None, logits=None):
    """The exit rule once the predictor fired: (token or None, counts of heads run). The draft
    rule emits the best candidate by ``logits`` (z . rows, computed here when not given)."""
    counts = StepCounts()
    if settings.rule == "draft":
        if logits is None:
            logits = head_weight[draft_ids] @ z
        return int(draft_ids[logits.argmax()]), counts
    if settings.rule == "full":
        counts.full_heads = 1
        token = head_token if head_token is not None else int((head_weight @ z).argmax())
    else:
        counts.reduced_heads = 1
        token = head_token if head_token is not None else int(vocab_map[(head_weight[vocab_map] @ z).argmax()])
    return (token if token in draft_ids.tolist() else None), counts


class ReferenceDecoder:
    """SpecEE greedy decoding over a Hugging Face Llama-layout model."""

    def __init__(self, target, draft, bank: PredictorBank, schedule: Schedule,
                 settings: DecodeSettings = DecodeSettings(), capacity: int = 4096):
        self.target = target.eval()
        self.draft = draft.eval() if draft is not None else None
        self._fused = set(draft.fusion) if draft is not None and draft.fusion is not None else set()
        self.bank = bank
        self.schedule = schedule
        self.settings = settings
        cfg = target.config
        self.layers = target.model.layers
        self.norm = target.model.norm
        self.head_weight = target.lm_head.weight  # [V, d]
        self.num_heads = cfg.num_attention_heads
        self.arch = Architecture(target)
        self.kv_heads = self.arch.kv_heads
        self.specs = self.arch.specs(capacity)
        self.capacity = capacity

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids=(), force_exit_layer: int | None = None):
        """Greedy SpecEE decoding; ``force_exit_layer`` exits every decode step at that layer."""
        state = self.prefill(prompt)
        result = ReferenceResult([state.token], [len(self.layers) - 1])
        while len(result.tokens) < max_new_tokens and state.token not in eos_ids and state.n < self.capacity:
            counts = self.step(state, force_exit_layer)
            result.tokens.append(state.token)
            result.exit_layers.append(state.history[-1])
            result.steps.append(counts)
        if result.tokens and result.tokens[-1] in eos_ids:
            result.tokens.pop()
            result.exit_layers.pop()
        return result

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> "DecodeState":
        """Dense prefill: caches of every layer, the first token, the draft's cache."""
        n = len(prompt)
        positions = torch.arange(n)
        h = self.arch.embed(torch.tensor([prompt]))
        state = DecodeState(n=n)
        empty = torch.zeros(1, self.kv_heads, 0, self.arch.head_dim)
        normed = {}  # the layers the draft's input reads, normed: [n, d]
        for i, spec in enumerate(self.specs):
            h, k, v = layer_step(spec, h, empty, empty, positions)
            state.keys.append(k)
            state.values.append(v)
            state.valid.append(torch.ones(n, dtype=torch.bool))
            if i in self._fused:
                normed[i] = self.norm(h)[0]
        normed[len(self.specs) - 1] = features = self.norm(h)[0]  # [n, d]
        state.token = int((self.head_weight @ features[-1]).argmax())
        state.feature = features[-1]
        if self.draft is not None:
            handed = self.draft.handed(normed, len(self.specs) - 1)  # [n, d]
            state.feature = handed[-1]
            if n > 1:
                _, _, state.draft_cache = self.draft(torch.tensor([prompt[1:]]), handed[None, :-1], None, 1)
        return state

    @torch.no_grad()
    def step(self, state: "DecodeState", force_exit_layer: int | None = None) -> StepCounts:
        """One decode step: feeds ``state.token``, leaves the emitted token in ``state.token``."""
        L = len(self.layers)
        counts = StepCounts()
        keys, values, valid = state.keys, state.values, state.valid
        pos = torch.tensor([state.n])
        draft_ids = None
        if self.draft is not None and force_exit_layer is None:
            draft_ids, state.draft_cache = self.draft.propose(state.token, state.feature, state.draft_cache, state.n)
            rows = self.head_weight[draft_ids]  # the one gather of the step
        active = self.schedule.active(state.history) if draft_ids is not None else frozenset()
        h = self.arch.embed(torch.tensor([[state.token]]))
        prev_p = None
        emitted = None
        exit_layer = L - 1
        normed = {}
        for i, spec in enumerate(self.specs):
            key_valid = torch.cat([valid[i], torch.ones(1, dtype=torch.bool)])
            h, keys[i], values[i] = layer_step(spec, h, keys[i], values[i], pos, key_valid)
            valid[i] = key_valid
            counts.layers += 1
            if i in self._fused:
                normed[i] = self.norm(h[0, -1])
            if i == L - 1:
                break
            if force_exit_layer is not None:
                if i == force_exit_layer:
                    z = self.norm(h[0, -1])
                    emitted, exit_layer = int((self.head_weight @ z).argmax()), i
                    counts.full_heads += 1
                    break
                continue
            if i in active:
                z = self.norm(h[0, -1])
                emitted, prev_p, c = exit_decision(z, rows, draft_ids, prev_p, self.bank, i, self.settings,
                                                   self.head_weight, self.draft.vocab_map)
                counts.predictors += c.predictors
                counts.full_heads += c.full_heads
                counts.reduced_heads += c.reduced_heads
                if emitted is not None:
                    exit_layer = i
                    break
        z = self.norm(h[0, -1])
        if emitted is None:
            emitted = int((self.head_weight @ z).argmax())
            counts.full_heads += 1
        for j in range(exit_layer + 1, L):  # the layers this token skipped
            if self.settings.kv_policy == "propagate":
                k, v = key_value(self.specs[j], h, pos)
                ok = True
                counts.kv_projections += 1
            else:
                k = torch.zeros_like(keys[j][:, :, :1])
                v = k
                ok = False
            keys[j] = torch.cat([keys[j], k], dim=2)
            values[j] = torch.cat([values[j], v], dim=2)
            valid[j] = torch.cat([valid[j], torch.tensor([ok])])
        normed[exit_layer] = z
        state.token = emitted
        state.feature = self.draft.handed(normed, exit_layer) if self.draft is not None else z
        state.history.append(exit_layer)
        state.n += 1
        return counts
