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
) -> None:
    """BCE + Adam, every layer's MLP on its own samples, all layers in one batched step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(bank.parameters(), lr=lr)
    n = features.shape[1]
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            loss = loss_fn(bank.logits_all(features[:, idx]), labels[:, idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update()


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
