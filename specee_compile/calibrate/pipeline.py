"""The calibration pipeline, top to bottom, and the artifact it writes and reads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from specee_compile import load as model_load
from specee_compile import drafts, resources
from specee_compile.bundle import sha256
from specee_compile.calibrate import budget, data
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft, fusion_layers, reduced_vocabulary
from specee_compile.calibrate.predictors import layer_metrics, train_bank
from specee_compile.calibrate.store import FeatureStore
from specee_compile.calibrate.train import train_draft
from specee_compile.predictor import PredictorBank, candidate_features
from specee_compile.calibrate.simulate import (CostModel, measure_costs, propagated_replays, replay_windows,
                                              rule_tokens)
from specee_compile.errors import ConfigError, ModelLoadError
from specee_compile.reference import DecodeSettings
from specee_compile.schedule import Schedule
from specee_compile.tokenizer import chat_ids_many

logger = logging.getLogger(__name__)

ARTIFACT_VERSION = 6  # 2: the draft normalizes before its head; 3: trained without the future-position leak;
# 4: the draft scored on the held-out responses only; 5: the schedule checked with propagated K/V;
# 6: the schedule's agreement holds the target at its lower confidence bound
WEIGHTS = "calibration.safetensors"
CHAT_BATCH = 64  # prompts rendered per chat-template process
# the schedule search's thresholds: on text the draft never read, SmolLM2's stops at 97.2% agreement at 0.8
SCHEDULE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)
COST_TIE = 0.001  # relative costs this close are the same cost to the search's order
PROPAGATED_CHECKS = 2  # policies the schedule search checks with propagated K/V (cheapest first) before its best
META = "calibration.json"


# Settings added after artifacts were made, with the value that trains as before they existed:
# at that value they stay out of the cache key, so those artifacts are still found.
_LATER_SETTINGS = {"draft_unroll": 1, "budget_minutes": None, "shipped_draft": True, "draft_fusion": False,
                   "draft_soft_labels": False, "agreement_confidence": 0.5}


@dataclass(frozen=True)
class CalibrationSettings:
    """What calibration uses and trains. Part of the artifact's cache key."""

    calib_file: str | None = None  # JSONL of prompts/responses; default: ShareGPT
    draft_file: str | None = None  # a trained draft (safetensors, this project's layout) to use as is
    draft_sequences: int = 1280
    predictor_sequences: int = 48
    max_seq_len: int = 384
    generate_tokens: int = 96  # continuation length for examples without a response
    draft_vocab: int = 6144
    draft_epochs: int = 2
    draft_lr: float = 1e-3
    draft_unroll: int = 2  # steps the draft is trained ahead on its own guesses (2+: EAGLE-3's training-time test)
    feature_loss_weight: float = 0.1  # EAGLE's weighting of feature regression against token CE
    exit_feature_rate: float = 0.5  # share of draft inputs fed an intermediate layer's feature
    predictor_hidden: int = 512
    predictor_epochs: int = 100
    positions_per_sequence: int = 128
    rule: str = "full"
    target_agreement: float = 0.98
    # the schedule search's agreement must reach the target at this one-sided confidence over its
    # held-out windows (0.5: the point estimate); docs/benchmarks/agreement-gap
    agreement_confidence: float = 0.95
    history: int = 5
    offsets: tuple[int, ...] = (-2, 0, 2)
    seed: int = 0
    budget_minutes: float | None = None  # size draft_sequences to fit this many minutes (calibrate/budget.py)
    shipped_draft: bool = True  # use the package's draft for this model when there is one (specee_compile.drafts)
    draft_fusion: bool = True  # EAGLE-3's multi-layer draft input (calibrate/draft.py; docs/benchmarks/draft-recipes)
    # the draft learns the target's distribution over its vocabulary, not only its greedy token
    draft_soft_labels: bool = True

    def __post_init__(self):
        DecodeSettings(rule=self.rule)
        for name in ("draft_sequences", "predictor_sequences", "max_seq_len", "draft_vocab", "draft_epochs",
                     "draft_unroll", "predictor_hidden", "predictor_epochs", "positions_per_sequence"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"calibration setting {name} must be positive, got {getattr(self, name)}.")
        if self.budget_minutes is not None and not 0 < self.budget_minutes < 1e6:
            raise ConfigError(f"--budget must be a positive number of minutes, got {self.budget_minutes}.")
        if not 0 < self.target_agreement <= 1:
            raise ConfigError("target_agreement must be in (0, 1].")
        if not 0.5 <= self.agreement_confidence < 1:
            raise ConfigError(f"agreement_confidence must be in [0.5, 1), got {self.agreement_confidence}.")
        for name, flag, what in (("calib_file", "--calib", "a JSONL file"), ("draft_file", "--draft", "a safetensors file")):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                kind = "a folder" if Path(value).is_dir() else "missing"
                raise ConfigError(f"{flag} {value} is {kind}; pass {what} that exists.")

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        for name, before in _LATER_SETTINGS.items():
            if fields[name] == before:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True)
        for f in (self.calib_file, self.draft_file):
            if f:
                try:
                    blob += sha256(Path(f))
                except OSError as e:
                    raise ConfigError(f"{f} cannot be read ({e}); check that it exists and its permissions.") from e
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Calibration:
    draft: EagleDraft
    bank: PredictorBank
    schedule: Schedule
    threshold: float
    meta: dict


def model_key(model_dir: Path) -> str:
    """A hash of a model directory's weights."""
    h = hashlib.sha256()
    for w in sorted(model_dir.glob("*.safetensors")):
        with open(w, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def artifact_dir(model_dir: Path, settings: CalibrationSettings, key: str | None = None) -> Path:
    return resources.cache_dir() / "calibration" / f"{key or model_key(model_dir)}-{settings.key()}"


def calibrate(model: str | Path, settings: CalibrationSettings = CalibrationSettings(),
              force: bool = False, progress: bool = True) -> Path:
    """Calibrate ``model`` (as ``specee-compile`` accepts it) once; return the artifact folder."""
    model_dir = model_load.resolve(model)
    model_load.inspect(model_dir)
    mkey = model_key(model_dir)
    if settings.shipped_draft and not settings.draft_file and (shipped := drafts.find(model_dir)):
        settings = dataclasses.replace(settings, draft_file=str(shipped), budget_minutes=None)
        if progress:
            print(f"draft: the one shipped for this model ({shipped.parent.name}); --set shipped_draft=false "
                  "trains one instead", file=sys.stderr)
    budget_key = f"{mkey}-{settings.key()}"
    remembered = budget.remembered(budget_key) if settings.budget_minutes is not None and not force else None
    if remembered:
        settings = _sized(settings, remembered)
    out = artifact_dir(model_dir, settings, mkey)
    if _reusable(out, force):
        return out
    # Two runs that calibrate the same model with the same settings at once calibrate it once:
    # the second waits, then reuses the first's artifact (or, with force, makes its own after it).
    waiting = "calibration: waiting for another run that is calibrating this model with the same settings"
    with resources.cache_lock(f"calibration-{budget_key}", waiting if progress else ""):
        if _reusable(out, force):  # the run this one waited for made it
            return out
        return _calibrate(model_dir, settings, mkey, budget_key, out, force, progress)


def _calibrate(model_dir: Path, settings: CalibrationSettings, mkey: str, budget_key: str, out: Path, force: bool,
               progress: bool) -> Path:
    plan = None
    torch.manual_seed(settings.seed)
    clock = _Clock()
    target, tokenizer = model_load.load(model_dir)
    for p in target.parameters():
        p.requires_grad_(False)
    L = target.config.num_hidden_layers
    if settings.budget_minutes is not None:
        plan = _plan(target, tokenizer, model_dir, settings, mkey)
        budget.remember(budget_key, plan, settings.budget_minutes)
        if progress:
            print(plan.describe(settings.budget_minutes), file=sys.stderr)
        settings = _sized(settings, plan.draft_sequences)
        out = artifact_dir(model_dir, settings, mkey)
        if _reusable(out, force):
            return out

    if settings.draft_file:  # no draft text; the predictors' text is text the draft never trained on
        text_from = _unseen_from(settings)
        texts = calibration_examples(target, tokenizer, settings, progress, text_from, settings.predictor_sequences)
        split = 0
    else:
        text_from = 0
        texts = calibration_examples(target, tokenizer, settings, progress)
        split = min(settings.draft_sequences, max(1, len(texts) - 2))
    sequences = [ids for ids, _ in texts]
    clock.lap("data")
    draft_seqs, pred_seqs = sequences[:split], sequences[split:]

    exit_lo = L // 2
    if settings.draft_file:
        draft = load_draft(Path(settings.draft_file), target)
        train_log = {"supplied": settings.draft_file}
    else:
        store = feature_store(mkey, settings, exit_lo, L)
        store.fill(target, draft_seqs, exit_lo, settings.seed, progress)
        examples = store.read(len(draft_seqs))
        vocab_map = reduced_vocabulary(examples.next_tokens(), settings.draft_vocab, target.config.vocab_size)
        draft = EagleDraft(target, vocab_map, fusion=settings.draft_fusion)
        clock.lap("target passes (draft)")
        checkpoints = out.parent / f".{out.name}.training"
        train_log = train_draft(draft, examples, settings, checkpoints, progress)
        clock.lap("draft training")

    # each keeps its window's dense prefix K/V, which the schedule search's propagated checks start from
    pred_passes = [target_pass(target, ids, _window_start(len(ids), settings))
                   for ids in tqdm(pred_seqs, desc="target passes (predictors)", disable=not progress)]
    scores = draft_metrics(draft, pred_passes, exit_lo, [start for _, start in texts[split:]])
    feats, labels, windows = _predictor_data(target, draft, pred_passes, settings, progress)
    clock.lap("predictor data")
    n = feats.shape[1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    train_idx, test_idx = order[: int(0.8 * n)], order[int(0.8 * n):]
    bank = PredictorBank(L, settings.predictor_hidden)
    bar = tqdm(total=settings.predictor_epochs, desc="train predictors", unit="epoch", disable=not progress)
    train_bank(bank, feats[:, train_idx], labels[:, train_idx], epochs=settings.predictor_epochs, progress=bar)
    bar.close()
    metrics = layer_metrics(bank, feats[:, test_idx], labels[:, test_idx])
    clock.lap("predictor training")
    costs = measure_costs(target, draft, bank)
    choice, sweep = _choose_schedule(target, draft, bank, windows, settings, costs, L, progress)
    clock.lap("schedule search")
    meta = {
        "artifact_version": ARTIFACT_VERSION,
        "model_dir": str(model_dir),
        "num_layers": L,
        "settings": dataclasses.asdict(settings),
        "text": {"from": text_from, "draft": split, "predictors": len(texts) - split},  # examples read, in order
        "budget": dataclasses.asdict(plan) if plan else None,
        "schedule": choice["schedule"].to_dict(),
        "threshold": choice["threshold"],
        "rule": settings.rule,
        "draft": {"vocab_size": len(draft.vocab_map), "hidden_size": target.config.hidden_size, **scores,
                  "training": train_log},
        "predictors": {"hidden": settings.predictor_hidden, "samples": n, "test_samples": len(test_idx),
                       "per_layer": metrics},
        "cost_model": dataclasses.asdict(costs),
        "schedule_search": sweep,
        "chosen": {k: v for k, v in choice.items() if k != "schedule"},
        "seconds": clock.laps,
    }
    _save(out, draft, bank, meta)
    if not settings.draft_file:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the artifact holds the trained draft
    return out


def feature_store(mkey: str, settings: CalibrationSettings, exit_lo: int, num_layers: int) -> FeatureStore:
    """The store of the target passes over this calibration's text (shared by every
    calibration of the same model and text, whatever it trains; a fusion draft's also keeps
    the layers it fuses)."""
    source = sha256(Path(settings.calib_file)) if settings.calib_file else "sharegpt"
    return FeatureStore.locate(mkey, [source, settings.max_seq_len, settings.generate_tokens], exit_lo, settings.seed,
                               fusion_layers(num_layers) if settings.draft_fusion else ())


def _reusable(out: Path, force: bool) -> bool:
    if (out / META).is_file() and not force:
        if _version(out) == ARTIFACT_VERSION:
            logger.info("reusing calibration %s", out)
            return True
        logger.info("calibration %s was made by another version (%s); calibrating again", out, _version(out))
    return False


def _sized(settings: CalibrationSettings, draft_sequences: int) -> CalibrationSettings:
    return dataclasses.replace(settings, draft_sequences=draft_sequences, budget_minutes=None)


def _plan(target, tokenizer, model_dir: Path, settings: CalibrationSettings, mkey: str) -> budget.Plan:
    """How many draft conversations fit ``settings.budget_minutes`` (measured here)."""
    exit_lo = target.config.num_hidden_layers // 2
    if settings.calib_file:
        available = len(data.jsonl(settings.calib_file)) - settings.predictor_sequences
    else:
        available = len(data.sharegpt(1 << 30)) - settings.predictor_sequences  # 11128 in the shipped file

    def sequences_of(n: int) -> list[list[int]]:
        return calibration_sequences(target, tokenizer, dataclasses.replace(_sized(settings, n), predictor_sequences=1), False)[:n]

    return budget.fit(settings.budget_minutes, target, sequences_of,
                      feature_store(mkey, settings, exit_lo, target.config.num_hidden_layers), settings,
                      exit_lo, available)


def _version(artifact: Path):
    try:
        return json.loads((artifact / META).read_text()).get("artifact_version")
    except (OSError, ValueError):
        return None


class _Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 1)
        self.laps["total"] = round(now - self.start, 1)
        self.last = now


def load_calibration(path: Path, target) -> Calibration:
    """Rebuild the draft, predictors and schedule of an artifact for ``target``."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(path / WEIGHTS)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"calibration artifact {path} cannot be read ({e}); recalibrate with --recalibrate.") from e
    if meta.get("artifact_version") != ARTIFACT_VERSION:
        raise ModelLoadError(f"calibration artifact {path} has version {meta.get('artifact_version')}; "
                             f"this specee-compile reads version {ARTIFACT_VERSION}. Recalibrate.")
    draft = EagleDraft(target, tensors["draft.vocab_map"], fusion="draft.fuse.weight" in tensors)
    draft.load_state_dict({k[len("draft."):]: v for k, v in tensors.items() if k.startswith("draft.")}, strict=False)
    draft.eval()
    bank = PredictorBank(meta["num_layers"], meta["predictors"]["hidden"])
    bank.load_state_dict({k[len("predictors."):]: v for k, v in tensors.items() if k.startswith("predictors.")})
    return Calibration(draft.eval(), bank, Schedule.from_dict(meta["schedule"]), meta["threshold"], meta)


def save_draft(draft: EagleDraft, path: Path) -> None:
    """Write a draft alone (``--draft`` reads it back): its weights and vocabulary map."""
    save_file({k: v.contiguous() for k, v in draft.trainable_state().items()}, path)


def load_draft(path: Path, target) -> EagleDraft:
    """A user-supplied draft: safetensors with this project's draft keys (fc.*, layer.*, head.weight,
    vocab_map), e.g. written by ``save_draft`` or taken from an artifact's ``draft.*`` tensors."""
    try:
        tensors = load_file(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"draft file {path} cannot be read as safetensors ({e}).") from e
    tensors = {k[len("draft."):] if k.startswith("draft.") else k: v for k, v in tensors.items()}
    if "vocab_map" not in tensors or "head.weight" not in tensors:
        raise ConfigError(f"draft file {path} has no 'vocab_map'/'head.weight'; it is not a specee-compile draft.")
    draft = EagleDraft(target, tensors["vocab_map"], fusion="fuse.weight" in tensors)
    try:
        missing, unexpected = draft.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        missing, unexpected = [str(e).splitlines()[-1].strip()], []
    missing = [k for k in missing if not k.startswith("embed.")]
    if missing or unexpected:
        raise ConfigError(f"draft file {path} does not fit this model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); it was trained for another architecture.")
    return draft.eval()


def _save(out: Path, draft: EagleDraft, bank: PredictorBank, meta: dict) -> None:
    """Write to a temporary sibling, then rename: the cache never holds a half-written artifact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        tensors = {f"draft.{k}": v.contiguous() for k, v in draft.trainable_state().items()}
        tensors.update({f"predictors.{k}": v.detach().contiguous() for k, v in bank.state_dict().items()})
        save_file(tensors, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unseen_from(settings: CalibrationSettings) -> int:
    """Where a supplied draft's unseen text begins: after every ShareGPT conversation its
    record says it trained on (``drafts.train`` writes one next to it; the predictors fit a
    draft's guesses on text it memorized, and their agreement then promises too much), else
    after the text a calibration would have trained it on. A calibration file is the user's
    own text: read from its start."""
    if settings.calib_file:
        return 0
    folder = Path(settings.draft_file).parent
    try:
        ends = [int(b) for _, b in drafts.record(folder).get("conversations_trained") or []]
    except (OSError, ValueError, TypeError, AttributeError):  # no record, or not one drafts.train wrote
        ends = []
    return max(ends) if ends else settings.draft_sequences


def calibration_sequences(target, tokenizer, settings: CalibrationSettings, progress: bool,
                          skip: int = 0) -> list[list[int]]:
    """Token sequences (chat-formatted prompt + response), truncated to max_seq_len: the
    text's examples ``skip .. skip + draft_sequences + predictor_sequences``."""
    return [ids for ids, _ in calibration_examples(target, tokenizer, settings, progress, skip)]


def calibration_examples(target, tokenizer, settings: CalibrationSettings, progress: bool,
                         skip: int = 0, count: int | None = None,
                         examples: list[data.Example] | None = None) -> list[tuple[list[int], int]]:
    """``calibration_sequences`` (``count`` of them if given), each with the length of its
    prompt (where its response begins); of ``examples`` instead of the settings' text when
    given."""
    wanted = count or (len(examples) if examples is not None
                       else settings.draft_sequences + settings.predictor_sequences)
    if examples is None:
        examples = (data.jsonl(settings.calib_file)[skip:] if settings.calib_file
                    else data.sharegpt(wanted, skip=skip))
    if len(examples) < 3:
        raise ConfigError(f"calibration needs at least 3 examples, got {len(examples)}.")
    examples = examples[:wanted]
    prompts = []
    for k in range(0, len(examples), CHAT_BATCH):  # one template process per batch of prompts
        prompts += _chat_ids(tokenizer, [ex.prompt for ex in examples[k:k + CHAT_BATCH]])
    out = []
    for ex, prompt in zip(tqdm(examples, desc="tokenize", disable=not progress), prompts):
        prompt = prompt[: settings.max_seq_len // 2]
        if ex.response is not None:
            reply = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
            ids = prompt + reply
        else:
            with torch.no_grad():
                gen = target.generate(torch.tensor([prompt]), max_new_tokens=settings.generate_tokens,
                                      do_sample=False, pad_token_id=tokenizer.eos_token_id)
            ids = gen[0].tolist()
        out.append((ids[: settings.max_seq_len], min(len(prompt), settings.max_seq_len)))
    return out


def _chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text as a user turn in the model's chat template (plain tokens without one)."""
    if getattr(tokenizer, "chat_template", None):
        return chat_ids_many(tokenizer, [[{"role": "user", "content": t}] for t in texts], "the model",
                             ModelLoadError, "Fix the model's chat template, or calibrate from a JSONL file whose "
                             "examples have responses")
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def _draft_inputs(draft: EagleDraft, p, exit_lo: int, rate: float, gen: torch.Generator):
    """Features fed at positions 1..S-1: the previous position's final or intermediate feature."""
    L, S, _ = p.z.shape
    use_exit = torch.rand(S - 1, generator=gen) < rate
    layers = torch.randint(exit_lo, L - 1, (S - 1,), generator=gen)
    return draft.inputs(p.z[:, :-1], torch.where(use_exit, layers, L - 1))


@torch.no_grad()
def draft_metrics(draft: EagleDraft, passes, exit_lo: int, starts: list[int] | None = None) -> dict:
    """Top-1 / top-4 hit rate of the target's next token on held-out sequences, fed the
    previous position's final feature ("after a full-depth step") or an intermediate
    layer's ("after an exit", layers L/2 .. L-2); and the top-1 hit rate one step deeper, fed
    its own predicted feature, where its first guess was the target's token.

    ``starts``: each sequence's prompt length. Only the positions from there on are scored:
    at decode time the draft drafts the response, whose tokens are far harder to guess than
    a chat template's (SmolLM2's shipped draft: 36% top-1 on its own answers, 60% on their
    prompts). Without it every position is."""
    hits = {"full": [0, 0], "exit": [0, 0]}
    total = deep_hits = deep_total = 0
    gen = torch.Generator().manual_seed(123)
    for i, p in enumerate(passes):
        lo = 0 if starts is None else max(starts[i] - 1, 0)  # row j drafts the token after position j + 1
        if p.ids.numel() < 3 or p.ids.numel() - 1 <= lo:
            continue
        target = p.next_token[1:]
        for kind, rate in (("full", 0.0), ("exit", 1.0)):
            feats = _draft_inputs(draft, p, exit_lo, rate, gen)
            _, logits, _ = draft(p.ids[None, 1:], feats[None], None, 1)
            top = draft.vocab_map[logits[0].topk(4).indices][lo:]  # [S-1-lo, 4]
            hits[kind][0] += (top[:, 0] == target[lo:]).sum().item()
            hits[kind][1] += (top == target[lo:, None]).any(-1).sum().item()
        total += target.numel() - lo
        (_, first), (_, second) = draft.unrolled(p.ids[1:], draft.inputs(p.z[:, :-1], p.z.shape[0] - 1), 2)
        # depth 2 where depth 1 drafted the target's token and the text goes on with it
        reached = (draft.vocab_map[first[:-1].argmax(-1)] == target[:-1]) & (p.ids[2:] == target[:-1])
        deep = reached & (draft.vocab_map[second.argmax(-1)] == target[1:])
        deep_hits += deep[lo:].sum().item()
        deep_total += reached[lo:].sum().item()
    in_vocab = sum(torch.isin(p.next_token, draft.vocab_map).sum().item() for p in passes)
    return {
        "top1_after_full": hits["full"][0] / max(total, 1), "top4_after_full": hits["full"][1] / max(total, 1),
        "top1_after_exit": hits["exit"][0] / max(total, 1), "top4_after_exit": hits["exit"][1] / max(total, 1),
        "top1_depth2": deep_hits / max(deep_total, 1), "depth2_positions": deep_total,
        "target_tokens_in_vocab": in_vocab / sum(p.ids.numel() for p in passes), "positions": total,
    }


def _window_start(length: int, settings: CalibrationSettings) -> int:
    """The first position of a sequence's predictor window (its last positions_per_sequence)."""
    return max(1, length - settings.positions_per_sequence)


@torch.no_grad()
def _predictor_data(target, draft, passes, settings, progress):
    """Features [L, N, 12] and labels [L, N] at a window of positions of every sequence,
    plus the windows themselves for the schedule search."""
    w = target.lm_head.weight
    feats, labels, windows = [], [], []
    for p in tqdm(passes, desc="predictor features", disable=not progress):
        S = p.ids.numel()
        if S < 8:
            continue
        lo = _window_start(S, settings)
        _, logits, _ = draft(p.ids[None, 1:], draft.inputs(p.z[:, :-1], p.z.shape[0] - 1)[None], None, 1)
        ids = draft.vocab_map[logits[0].topk(4).indices][lo - 1:]  # candidates at positions lo..S-1
        z = p.z[:, lo:]  # [L, N, d]
        rows = w[ids]  # [N, 4, d]
        prev = None
        layer_feats = []
        for layer in range(z.shape[0]):
            f, prev = candidate_features(z[layer], rows, prev)
            layer_feats.append(f)
        argmax = rule_tokens(target, draft, z, "full")
        feats.append(torch.stack(layer_feats))
        labels.append(argmax == p.next_token[lo:][None, :])
        heads = argmax if settings.rule == "full" else rule_tokens(target, draft, z, settings.rule)
        windows.append((p, lo, heads))
    if not feats:
        raise ConfigError("no calibration sequence left for the predictors has 8 tokens or more; give longer "
                          "examples (or a larger max_seq_len).")
    return torch.cat(feats, dim=1), torch.cat(labels, dim=1), windows


@torch.no_grad()
def _choose_schedule(target, draft, bank, windows, settings, costs: CostModel, L: int, progress):
    """Rank layers by exit frequency with every predictor on, then pick the top-N and the
    threshold with the lowest mean step cost whose teacher-forced agreement on held-out
    windows reaches the target with the K/V a bundle propagates (or the highest agreement of
    those checked if none does). An agreement reaches the target when its lower confidence
    bound over the windows does (``settings.agreement_confidence``)."""
    every = Schedule(L, tuple(range(L - 1)), settings.history, settings.offsets, online=False)
    counts = torch.zeros(L, dtype=torch.long)
    runs = _replay_all(target, draft, bank, every, DecodeSettings(rule=settings.rule, threshold=0.5), windows,
                       progress, "exits with every predictor on")
    for r in runs:
        for e in r.exit_layers:
            counts[e] += 1
    ranked = [int(i) for i in counts[: L - 1].argsort(descending=True) if counts[i] > 0]
    ranked += [i for i in range(L - 1) if i not in ranked]
    candidates = sorted({n for n in (4, 8, L - 1) if n <= L - 1})
    sweep = []
    dense = costs.dense_cost(L)
    combos = [(Schedule(L, tuple(sorted(ranked[:n])), settings.history, settings.offsets, online=True),
               DecodeSettings(rule=settings.rule, threshold=threshold), n)
              for n in candidates for threshold in SCHEDULE_THRESHOLDS]
    per_window = replay_windows(target, draft, bank, [c[:2] for c in combos],
                                [(p, lo, None, heads) for p, lo, heads in windows], progress=progress,
                                desc="schedule search")
    for i, (schedule, decode, n) in enumerate(combos):
        row = _summarize([runs[i] for runs in per_window], windows, costs, dense, settings.agreement_confidence)
        row.update(top_n=n, threshold=decode.threshold)
        sweep.append(row)
    # The replay gave every step the dense K/V; a bundle's exits write their deeper K/V from the
    # exit state, which costs later steps agreement (docs/benchmarks/agreement-gap).
    prefixes = {}

    def check(i: int) -> dict:
        schedule, decode, _ = combos[i]
        policy = (schedule, dataclasses.replace(decode, kv_policy="propagate"))
        runs, unsettled = propagated_replays(target, draft, bank, policy, [(p, lo, None) for p, lo, _ in windows],
                                             prefixes=prefixes, first=[replays[i] for replays in per_window],
                                             progress=progress)
        return {**_summarize(runs, windows, costs, dense, settings.agreement_confidence),
                "unsettled_windows": unsettled}

    i = _check_policies([(n, decode.threshold) for _, decode, n in combos], sweep, settings.target_agreement, check)
    row = sweep[i]
    chosen = {**row["propagated"], "top_n": row["top_n"], "threshold": row["threshold"],
              "dense_kv_replay": {k: row[k] for k in ("agreement", "agreement_low", "relative_cost", "mean_layers")}}
    return {**chosen, "schedule": combos[i][0]}, {"exit_counts_all_on": counts.tolist(), "ranked_layers": ranked,
                                                        "rows": sweep}


def _check_policies(policies: list[tuple[int, float]], sweep: list[dict], goal: float, check) -> int:
    """Check the policies ((top-N, threshold), their dense-K/V replay rows in ``sweep``) with
    ``check`` (propagated K/V; its row goes into ``sweep[i]["propagated"]``), cheapest first
    among those whose replay reaches ``goal``, until one holds: at most PROPAGATED_CHECKS that
    fail, then the replay's most agreeing policy. A policy with the predictors of one that
    failed and more, at a threshold no higher, exits wherever that one does and more, so it
    is passed over (so of policies that cost the same, the one with fewer predictors goes first).
    Returns the index chosen: the cheapest that holds, else the most agreeing
    checked."""
    # costs within COST_TIE of dense are a tie, which the fewer predictors go first in: their failure
    # passes over the others (SmolLM2: top-8 and top-4 at 0.9 predicted 1.04458 and 1.04462 of dense)
    order = sorted(range(len(policies)), key=lambda i: (sweep[i]["agreement_low"] < goal,
                                                        round(sweep[i]["relative_cost"] / COST_TIE), policies[i][0]))
    top = max(order, key=lambda i: sweep[i]["agreement"])

    def dominated(i: int, failed: int) -> bool:
        return policies[i][0] >= policies[failed][0] and policies[i][1] <= policies[failed][1]

    best, failed = None, []
    for i in order + [top]:
        if "propagated" in sweep[i] or any(dominated(i, f) for f in failed):
            continue
        if len(failed) >= PROPAGATED_CHECKS and i != top:
            continue
        sweep[i]["propagated"] = check(i)
        ok = sweep[i]["propagated"]["agreement_low"] >= goal
        key = (ok, -sweep[i]["propagated"]["relative_cost"] if ok else sweep[i]["propagated"]["agreement"])
        if best is None or key > best[0]:
            best = (key, i)
        if ok:
            break
        failed.append(i)
    return best[1]


def _replay_all(target, draft, bank, schedule, settings, windows, progress=False, desc=""):
    runs = replay_windows(target, draft, bank, [(schedule, settings)], [(p, lo, None, heads) for p, lo, heads in windows],
                          progress=progress, desc=desc)
    return [r[0] for r in runs]


def _summarize(runs, windows, costs: CostModel, dense: float, confidence: float) -> dict:
    per_window = []  # (agreeing positions, positions) of each window
    cost = layers = 0.0
    hits = 0
    for r, (p, lo, _) in zip(runs, windows):
        dense_tokens = p.next_token[lo:].tolist()
        per_window.append((sum(a == b for a, b in zip(r.emitted, dense_tokens)), len(dense_tokens)))
        cost += sum(costs.step_cost(s) for s in r.steps)
        layers += sum(s.layers for s in r.steps)
        hits += sum(r.draft_hits)
    total = sum(n for _, n in per_window)
    agreement = sum(a for a, _ in per_window) / total
    return {"agreement": agreement, "agreement_low": agreement_bound(per_window, confidence),
            "relative_cost": cost / total / dense, "mean_layers": layers / total, "draft_top4_hit": hits / total,
            "positions": total}


def agreement_bound(per_window: list[tuple[int, int]], confidence: float) -> float:
    """The one-sided lower confidence bound of the pooled agreement over windows, each given as
    (agreeing positions, positions). A window's positions are not independent draws (a wrong
    exit sends later steps' K/V astray), so the standard error is the windows' own: the ratio
    estimator's, clustered by window."""
    n = len(per_window)
    total = sum(t for _, t in per_window)
    p = sum(a for a, _ in per_window) / total
    if n < 2 or confidence <= 0.5:
        return p
    var = n / (n - 1) * sum((a - p * t) ** 2 for a, t in per_window) / total ** 2
    return p - statistics.NormalDist().inv_cdf(confidence) * var ** 0.5
