"""``--budget MINUTES``: how much calibration text fits the time a user is willing to spend.

The draft's share of a calibration grows with its text: one target pass per conversation
(skipped where the feature store holds it already) and ``draft_epochs`` training steps. The
predictors' share does not. Both are measured here on the first conversations of the text,
on this machine, before anything is trained:

    minutes ~ missing * pass + N * epochs * step + predictor_sequences * pass * PREDICTOR_STAGE

and the largest N that fits becomes ``draft_sequences``. PREDICTOR_STAGE is the predictor
stage's cost per predictor conversation in target passes (its passes, features, training and
schedule search). It was measured on SmolLM2 in one compile (2026-12-02, AMD EPYC, 2 cores):
589.7 s for the 48 predictor conversations, about 1.0 s per target pass. The choice is
remembered next to the artifacts, so the same budget finds the same artifact again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from specee_compile import resources
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft
from specee_compile.calibrate.store import SHARD, FeatureStore, example
from specee_compile.calibrate.train import example_loss
from specee_compile.errors import ConfigError

logger = logging.getLogger(__name__)

PREDICTOR_STAGE = 12.0
PROBE = 4  # conversations timed
MIN_SEQUENCES = 16
_now = time.perf_counter  # the clock the measurements read


@dataclasses.dataclass(frozen=True)
class Plan:
    draft_sequences: int
    pass_seconds: float  # per conversation
    step_seconds: float  # per conversation and epoch
    stored: int  # conversations whose passes are in the store already
    predicted_minutes: float

    def describe(self, budget: float) -> str:
        return (f"budget {budget:g} min: {self.draft_sequences} draft conversations (measured {self.pass_seconds:.2f} s "
                f"a target pass, {self.step_seconds:.2f} s a training step; {self.stored} passes stored), "
                f"predicted {self.predicted_minutes:.1f} min")


def fit(budget_minutes: float, target, sequences_of, store: FeatureStore, settings, exit_lo: int,
        available: int) -> Plan:
    """The plan for ``budget_minutes``. ``sequences_of(n)`` gives the first n token sequences;
    ``available`` caps the draft conversations (the text's size minus the predictors')."""
    probe = sequences_of(PROBE)
    start = _now()
    passes = [target_pass(target, ids) for ids in probe]
    pass_seconds = (_now() - start) / len(probe)
    examples = [example(p, k, exit_lo, settings.seed) for k, p in enumerate(passes)]
    # a training step's cost grows with the head's width: time one of the draft's full width
    vocab = torch.arange(min(settings.draft_vocab, target.config.vocab_size))
    draft = EagleDraft(target, vocab)
    inverse = torch.arange(draft.embed.num_embeddings).clamp(max=len(vocab) - 1)  # every label a class
    start = _now()
    for k, e in enumerate(examples):
        loss, _ = example_loss(draft, e, settings, inverse, k)
        if loss is not None:
            loss.backward()
    step_seconds = (_now() - start) / len(examples)
    stored = _stored_prefix(store)
    fixed = settings.predictor_sequences * pass_seconds * PREDICTOR_STAGE
    per_new = pass_seconds + settings.draft_epochs * step_seconds
    per_stored = settings.draft_epochs * step_seconds
    seconds = budget_minutes * 60 - fixed
    if seconds <= stored * per_stored:
        n = int(seconds / per_stored) if seconds > 0 else 0
    else:
        n = stored + int((seconds - stored * per_stored) / per_new)
    n = min(n, available)
    if n < MIN_SEQUENCES:
        need = math.ceil((fixed + MIN_SEQUENCES * per_new) / 60)
        raise ConfigError(f"a budget of {budget_minutes:g} minutes fits {max(n, 0)} draft conversations on this "
                          f"machine, fewer than the {MIN_SEQUENCES} a draft needs (a target pass takes "
                          f"{pass_seconds:.2f} s; the predictors about {fixed / 60:.1f} min); give --budget {need} "
                          "or more.")
    predicted = (fixed + max(0, n - stored) * pass_seconds + n * settings.draft_epochs * step_seconds) / 60
    return Plan(n, pass_seconds, step_seconds, min(stored, n), predicted)


def _stored_prefix(store: FeatureStore) -> int:
    """Conversations in the store's unbroken run of full shards from the first (checked
    against the text when they are read; this count only sizes the plan)."""
    i = 0
    while store.shard(i).is_file():
        i += 1
    return i * SHARD


def remembered(key: str) -> int | None:
    path = _memory(key)
    try:
        return int(json.loads(path.read_text())["draft_sequences"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(key: str, plan: Plan, budget: float) -> None:
    path = _memory(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"budget_minutes": budget, **dataclasses.asdict(plan)}) + "\n")


def _memory(key: str) -> Path:
    return resources.cache_dir() / "calibration" / "budgets" / f"{key}.json"
