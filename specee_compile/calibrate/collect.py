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
    # every layer's keys and values ([1, KVH, P, D] each) of the first P positions, if kept:
    # the dense prefix a propagated-K/V replay starts from (``simulate.dense_prefix``)
    prefix: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None


@torch.no_grad()
def target_pass(model, ids: list[int], keep_prefix: int = 0) -> TargetPass:
    """``keep_prefix``: keep the K/V of that many first positions (the pass computes them anyway)."""
    out = model.model(torch.tensor([ids]), output_hidden_states=True, use_cache=keep_prefix > 0)
    hs = out.hidden_states  # embeddings, then each layer's output; the last is already normed
    norm = model.model.norm
    z = torch.stack([norm(h[0]) for h in hs[1:-1]] + [hs[-1][0]])  # [L, S, d]
    next_token = (z[-1] @ model.lm_head.weight.T).argmax(-1)
    prefix = None
    layers = out.cache.layers if keep_prefix > 0 else []
    # post-RoPE, as the cache holds them; cloned so the rest is freed. A sliding-window cache
    # drops old positions: then there is no prefix to keep
    if layers and all(c.keys.shape[2] == len(ids) for c in layers):
        prefix = ([c.keys[:, :, :keep_prefix].clone() for c in layers],
                  [c.values[:, :, :keep_prefix].clone() for c in layers])
    return TargetPass(torch.tensor(ids), z, next_token, prefix)
