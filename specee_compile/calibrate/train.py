"""Draft training that checkpoints and resumes.

Everything random in a training run is a function of the seed, the epoch and the step: the
order of each epoch's examples and, per step, which positions are fed an intermediate
layer's feature. So the state of a run is the draft's weights, the optimizer's and the
learning-rate schedule's state and the step count. A checkpoint (safetensors for the
tensors, JSON for the rest, no pickles) is written to a temporary name and renamed, every
``checkpoint_seconds`` and at the end of every epoch. A run started again with the same
settings and data continues from the last checkpoint and ends with the weights an
uninterrupted run would have (tested by killing one).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from specee_compile.bundle import sha256

CHECKPOINT = "checkpoint.safetensors"
STATE = "checkpoint.json"


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def train_draft(draft, examples, settings, checkpoint_dir: Path | None = None, progress: bool = True,
                checkpoint_seconds: float = 120.0, on_step=None) -> dict:
    """Train ``draft`` on ``examples`` (``store.DraftExample``s) as ``settings`` says.

    With ``checkpoint_dir``, resume from the checkpoint there (if it was made by the same
    settings and data) and checkpoint into it. ``on_step(step)`` is called after every step
    (the tests kill a run there). Returns the training log.
    """
    inverse = torch.full((draft.embed.num_embeddings,), -100, dtype=torch.long)
    inverse[draft.vocab_map] = torch.arange(len(draft.vocab_map))
    names = [n for n, _ in draft.named_parameters() if not n.startswith("embed.")]
    params = [p for n, p in draft.named_parameters() if not n.startswith("embed.")]
    opt = torch.optim.AdamW(params, lr=settings.draft_lr, weight_decay=0.0)
    steps = settings.draft_epochs * len(examples)
    # OneCycle needs a warm-up of more than one step; tiny runs keep a constant rate
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.draft_lr, total_steps=steps, pct_start=0.1)
             if steps >= 30 else None)
    run = _run_key(settings, examples, draft)
    step, log = 0, {"epochs": [], "resumed_at": []}
    if checkpoint_dir is not None:
        resumed = _load(Path(checkpoint_dir), run, draft, names, opt, sched)
        if resumed is not None:
            step, log = resumed
            log["resumed_at"].append(step)
    bar = tqdm(total=steps, initial=step, desc="train draft", unit="step", disable=not progress)
    last_save = time.monotonic()
    draft.train()
    for epoch in range(step // max(len(examples), 1), settings.draft_epochs):
        order = epoch_order(len(examples), settings.seed, epoch)
        totals = log.setdefault("running", {"loss": 0.0, "token_ce": 0.0})
        for k in order[step - epoch * len(examples):]:
            loss, ce = example_loss(draft, examples[k], settings, inverse, step)
            if loss is not None:
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                totals["loss"] += loss.item()
                totals["token_ce"] += ce
            if sched is not None:
                sched.step()
            step += 1
            bar.update()
            if checkpoint_dir is not None and time.monotonic() - last_save > checkpoint_seconds:
                _save(Path(checkpoint_dir), run, step, log, draft, names, opt, sched)
                last_save = time.monotonic()
            if on_step is not None:
                on_step(step)
        n = max(len(examples), 1)
        log["epochs"].append({"epoch": epoch, "mean_loss": totals["loss"] / n, "mean_token_ce": totals["token_ce"] / n})
        del log["running"]
        if checkpoint_dir is not None:
            _save(Path(checkpoint_dir), run, step, log, draft, names, opt, sched)
            last_save = time.monotonic()
    bar.close()
    draft.eval()
    return log


def example_loss(draft, ex, settings, inverse, step: int):
    """The loss of one example, fed the previous position's final or (at a seeded random
    share of positions) intermediate feature, and unrolled ``draft_unroll`` steps."""
    n = ex.ids.numel()
    if n < max(3, settings.draft_unroll + 1):  # every unrolled step needs a position
        return None, 0.0
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    use_exit = torch.rand(n - 1, generator=gen) < settings.exit_feature_rate
    feats = draft.fed_features(ex, use_exit)
    ce = reg = 0.0
    if settings.draft_soft_labels:  # the target's distribution over the draft's vocabulary (EAGLE's loss)
        teacher = torch.softmax(ex.final @ draft.teacher_head.T, dim=-1)  # every unrolled step takes its rows
    for j, (f_hat, logits) in enumerate(draft.unrolled(ex.ids[1:], feats, settings.draft_unroll), start=1):
        if settings.draft_soft_labels:
            ce = ce + torch.nn.functional.cross_entropy(logits, teacher[j:])
        else:  # the target's greedy token
            ce = ce + torch.nn.functional.cross_entropy(logits, inverse[ex.next_token[j:]], ignore_index=-100)
        reg = reg + torch.nn.functional.smooth_l1_loss(f_hat, ex.final[j:])
    return ce + settings.feature_loss_weight * reg, ce.item()


def _run_key(settings, examples, draft) -> str:
    """What makes two runs the same run: the training settings, the data's size and the
    draft's vocabulary (a checkpoint of another run is ignored, not resumed)."""
    fields = {k: getattr(settings, k) for k in ("draft_epochs", "draft_lr", "draft_unroll", "feature_loss_weight",
                                                 "exit_feature_rate", "seed")}
    if settings.draft_soft_labels:  # runs from before the setting keep their keys
        fields["draft_soft_labels"] = True
    # which weights train: a checkpoint of a run that froze others is not this run
    fields["trained"] = sorted(n for n, w in draft.named_parameters() if w.requires_grad)
    blob = json.dumps([fields, len(examples), draft.vocab_map.tolist()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(folder: Path, run: str, step: int, log: dict, draft, names, opt, sched) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = opt.state_dict()
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in zip(names, (dict(draft.named_parameters())[n]
                                                                             for n in names))}
    for i, slots in state["state"].items():
        for k, v in slots.items():
            tensors[f"opt.{i}.{k}"] = v.detach().contiguous().reshape(-1) if v.dim() == 0 else v.detach().contiguous()
    meta = {"run": run, "step": step, "log": log, "param_groups": state["param_groups"],
            "scalars": sorted(f"opt.{i}.{k}" for i, s in state["state"].items() for k, v in s.items() if v.dim() == 0),
            "schedule": sched.state_dict() if sched is not None else None}
    # tensors first, then the JSON that names them: a checkpoint is the pair, and the JSON is written last
    write_atomic(folder / CHECKPOINT, lambda tmp: save_file(tensors, tmp))
    write_atomic(folder / STATE, lambda tmp: Path(tmp).write_text(json.dumps({**meta, "tensors_sha256": sha256(
        folder / CHECKPOINT)}) + "\n"))


def _load(folder: Path, run: str, draft, names, opt, sched):
    """(step, log) of the checkpoint in ``folder`` if it belongs to ``run``; else None."""
    try:
        meta = json.loads((folder / STATE).read_text())
        if meta.get("run") != run or meta.get("tensors_sha256") != sha256(folder / CHECKPOINT):
            return None
        tensors = load_file(folder / CHECKPOINT)
    except (OSError, ValueError):
        return None
    params = dict(draft.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[f"param.{n}"])
    scalars = set(meta["scalars"])
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v.reshape(()) if key in scalars else v
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    if sched is not None and meta["schedule"] is not None:
        sched.load_state_dict(meta["schedule"])
    return meta["step"], meta["log"]


def write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
