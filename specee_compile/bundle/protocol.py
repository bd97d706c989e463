"""The decoding protocol a bundle's manifest spells out for runtimes outside this package."""

from __future__ import annotations

_IN_PLACE = """\
Greedy decoding with graph `step` and a preallocated KV cache:
1. Allocate, per layer i, two float32 buffers past_key_values.{i}.key / .value of shape
   [1, kv_heads, capacity, head_dim] (zeros are fine).
2. Prefill: run `step` with input_ids = the prompt ids [1, S] and past_sequence_length = [0].
   Bind each present.{i}.key|value output to the SAME buffer as the matching past input:
   ONNX Runtime's GroupQueryAttention then writes the new positions in place.
   (Without binding, copy present.* into the buffers yourself before the next call.)
3. The next token is argmax(logits[0]). Stop at any of eos_token_ids.
4. Decode: run `step` with input_ids = [[token]] and past_sequence_length = [tokens so far
   in the cache], the same buffers bound as before. Repeat from 3.
5. The cache holds `capacity` positions: prompt + generated tokens must not exceed it.
"""
_SWAP = """\
Greedy decoding with graph `step` and a preallocated KV cache:
1. Allocate, per layer i, TWO pairs of float32 buffers of shape [1, kv_heads, capacity, head_dim]
   (zeros are fine): A and B for the key, A and B for the value.
2. Prefill: run `step` with input_ids = the prompt ids [1, S], past_sequence_length = [0],
   past_key_values.{i}.* = the A buffers and present.{i}.* = the B buffers. The graph writes
   the whole cache, with the new positions scattered in, into present.
3. The next token is argmax(logits[0]). Stop at any of eos_token_ids.
4. Decode: swap A and B (the last present is the next past) and run `step` with
   input_ids = [[token]] and past_sequence_length = [tokens so far in the cache]. Repeat from 3.
   (ONNX Runtime on CPU may instead bind present to the same buffer as past: its
   ScatterElements then writes in place.)
5. The cache holds `capacity` positions: prompt + generated tokens must not exceed it.
"""
PROTOCOL = {"ort": _IN_PLACE, "trt": _SWAP}  # per graph target
CACHE_UPDATE = {
    "ort": "in place when present.* is bound to the past buffer (shared buffer)",
    "trt": "ScatterElements at past_sequence_length into a copy of past (swap two buffers), or in place "
           "on ONNX Runtime when present.* is bound to the past buffer",
}
