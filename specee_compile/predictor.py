"""SpecEE exit predictors: one tiny MLP per layer over 12 features of the draft candidates.

Features (in this order) at a layer whose normed hidden state is z [.., d], for the draft
candidates' LM-head rows W_c [4, d]:

    l  = z @ W_c.T          # the 4 candidate logits
    p  = softmax(l)         # over the 4 only
    dp = p - p_prev         # change since the previous layer that ran a predictor (p at the first)

Each MLP is Linear(12, H) -> ReLU -> Linear(H, 1) -> sigmoid (H = 512 by default); the
bank stores all layers' weights stacked so they train together.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_FEATURES = 12


def candidate_features(z: torch.Tensor, rows: torch.Tensor, prev_p: torch.Tensor | None):
    """z [..., d], rows [..., 4, d] -> (features [..., 12], p [..., 4])."""
    logits = torch.einsum("...d,...kd->...k", z, rows)
    p = logits.softmax(-1)
    dp = p if prev_p is None else p - prev_p
    return torch.cat([logits, p, dp], dim=-1), p


class PredictorBank(nn.Module):
    """Per-layer predictors with weights stacked over layers: w1 [L, 12, H], w2 [L, H]."""

    def __init__(self, num_layers: int, hidden: int = 512):
        super().__init__()
        self.num_layers = num_layers
        self.hidden = hidden
        bound1 = 1 / NUM_FEATURES**0.5
        bound2 = 1 / hidden**0.5
        self.w1 = nn.Parameter(torch.empty(num_layers, NUM_FEATURES, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.zeros(num_layers, hidden))
        self.w2 = nn.Parameter(torch.empty(num_layers, hidden).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.zeros(num_layers))

    def logits_all(self, features: torch.Tensor) -> torch.Tensor:
        """features [L, N, 12] -> pre-sigmoid scores [L, N], each layer with its own MLP."""
        h = torch.relu(torch.bmm(features, self.w1) + self.b1[:, None, :])
        return torch.einsum("lnh,lh->ln", h, self.w2) + self.b2[:, None]

    def score(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Exit probability at ``layer`` for features [..., 12]."""
        h = torch.relu(features @ self.w1[layer] + self.b1[layer])
        return torch.sigmoid(h @ self.w2[layer] + self.b2[layer])

    def score_layers(self, layers: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Exit probabilities [A] of features [A, 12], row k scored by layer ``layers[k]``'s MLP."""
        h = torch.relu(torch.bmm(features[:, None, :], self.w1[layers])[:, 0] + self.b1[layers])
        return torch.sigmoid((h * self.w2[layers]).sum(-1) + self.b2[layers])
