"""Logits of a token computed in a 1-row decode step vs as the last row of a 2-row chunk, per
dense SmolLM2 bundle: 3 MT-Bench prompts, 40 greedy steps each.

    python rows.py BUNDLE_A BUNDLE_B .../llm_judge/data/mt_bench/question.jsonl

Feeds the caches by copying present into past (no binding), as the protocol allows."""
import sys, numpy as np, onnxruntime as ort, json
from tokenizers import Tokenizer
L, CAP = 30, 2048
def sess(path):
    o = ort.SessionOptions(); o.intra_op_num_threads = 2
    return ort.InferenceSession(path, o)
def run(s, ids, past_len, cache):
    feed = {"input_ids": np.array([ids], np.int64), "past_sequence_length": np.array([past_len], np.int64)}
    for i in range(L):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = cache[i]
    outs = s.run(None, feed)
    names = [o.name for o in s.get_outputs()]
    new = [(outs[names.index(f"present.{i}.key")], outs[names.index(f"present.{i}.value")]) for i in range(L)]
    return outs[0][0], new
tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
qs = [json.loads(l)["turns"][0] for l in open(sys.argv[3])][:3]
for path in sys.argv[1:3]:
    s = sess(path + "/model.onnx")
    diffs, flips, n = [], 0, 0
    for q in qs:
        prompt = tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids
        cache = [(np.zeros((1, 3, CAP, 64), np.float32),) * 2 for _ in range(L)]
        logits, cache = run(s, prompt, 0, cache)
        toks = [int(logits.argmax())]
        states = []
        for k in range(40):
            states.append(cache)
            logits, cache = run(s, [toks[-1]], len(prompt) + k, cache)
            seq_logits = logits
            # the same token's logits as the last row of a 2-row chunk from the state one step earlier
            if k >= 1:
                chunk, _ = run(s, toks[-2:], len(prompt) + k - 1, states[-2])
                diffs.append(np.abs(chunk - seq_logits).max())
                flips += int(chunk.argmax() != seq_logits.argmax()); n += 1
            toks.append(int(logits.argmax()))
    print(path, f"max|logit diff| median {np.median(diffs):.3g} max {np.max(diffs):.3g}; argmax differs {flips}/{n}")
