"""Training the SpecEE exit predictors (the model is :mod:`specee_compile.predictor`)."""

from __future__ import annotations

import torch
from torch import nn

from specee_compile.predictor import PredictorBank


def train_bank(
    bank: PredictorBank,
    features: torch.Tensor,  # [L, N, 12]
    labels: torch.Tensor,  # [L, N] in {0, 1}
    epochs: int = 100,
    batch: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    progress=None,
    layer_group: int = 1,
) -> None:
    """BCE + Adam, every layer's MLP on its own samples, all layers in one optimizer step.

    The loss is the mean over layers and samples; each batch's gradient is accumulated
    ``layer_group`` layers at a time (the layers' MLPs are independent, so the sum of the
    groups' gradients is the whole batch's), which keeps the [group, batch, hidden]
    activations in cache. SmolLM2's bank (30 layers, 4915 samples, hidden 512) on 2 cores,
    seconds per epoch: 0.46 one layer at a time, 0.55 two, 0.75 three, 0.81-1.1 six, 0.98 all."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(bank.parameters(), lr=lr)
    n = features.shape[1]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            opt.zero_grad()
            accumulate_gradients(bank, features[:, idx], labels[:, idx].float(), layer_group)
            opt.step()
        if progress is not None:
            progress.update()


def accumulate_gradients(bank: PredictorBank, features: torch.Tensor, labels: torch.Tensor, layer_group: int) -> None:
    """Add the gradient of the mean BCE over all layers and samples (features [L, B, 12],
    labels [L, B]) to the bank's parameters, ``layer_group`` layers per backward pass."""
    L = features.shape[0]
    for first in range(0, L, layer_group):
        layers = slice(first, first + layer_group)
        h = torch.baddbmm(bank.b1[layers, None, :], features[layers], bank.w1[layers]).relu_()
        logits = torch.bmm(h, bank.w2[layers, :, None])[..., 0] + bank.b2[layers, None]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels[layers], reduction="sum")
        (loss / labels.numel()).backward()


@torch.no_grad()
def layer_metrics(bank: PredictorBank, features: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5):
    """Per-layer accuracy, precision, recall and positive rate on held-out samples."""
    pred = torch.sigmoid(bank.logits_all(features)) > threshold
    y = labels.bool()
    out = []
    for layer in range(bank.num_layers):
        p, t = pred[layer], y[layer]
        tp = (p & t).sum().item()
        out.append({
            "layer": layer,
            "accuracy": (p == t).float().mean().item(),
            "precision": tp / max(p.sum().item(), 1),
            "recall": tp / max(t.sum().item(), 1),
            "positive_rate": t.float().mean().item(),
        })
    return out
