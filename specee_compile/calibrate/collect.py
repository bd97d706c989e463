"""One teacher-forced pass of the target over a token sequence: what calibration learns from.

For every position t of ``ids`` it yields the normed hidden state after every layer,
z[l, t] = final_norm(h_l[t]) ([L, S, d]; the last layer's is the model's own final
feature), and the target's greedy next token T[t] = argmax(lm_head(z[L-1, t])).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TargetPass:
    ids: torch.Tensor  # [S] input tokens
    z: torch.Tensor  # [L, S, d] normed hidden state after each layer
    next_token: torch.Tensor  # [S] the target's greedy prediction at each position


@torch.no_grad()
def target_pass(model, ids: list[int]) -> TargetPass:
    out = model.model(torch.tensor([ids]), output_hidden_states=True)
    hs = out.hidden_states  # embeddings, then each layer's output; the last is already normed
    norm = model.model.norm
    z = torch.stack([norm(h[0]) for h in hs[1:-1]] + [hs[-1][0]])  # [L, S, d]
    next_token = (z[-1] @ model.lm_head.weight.T).argmax(-1)
    return TargetPass(torch.tensor(ids), z, next_token)
