"""Run: .venv/bin/python docs/benchmarks/families/window_cache.py [WORKDIR]

Decode-step cost of sliding-window layers kept as masks inside a full-capacity cache:
a SmolLM2-sized Gemma 2 layout (random weights) with windows of 512 on every other layer,
against the same weights with every layer global: at each context, the median decode step of
33 generated tokens through the dense bundle, the second of two interleaved passes."""
import json, sys, pathlib, shutil, statistics
import numpy as np, torch, transformers
from specee_compile.compiler import compile as cb
from specee_compile.config import CompileConfig
from specee_compile.testing import tiny_tokenizer

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "window-cache-work")  # models, bundles, result.json
root.mkdir(parents=True, exist_ok=True)
CAP, WINDOW = 4096, 512
common = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, head_dim=64, vocab_size=8192, max_position_embeddings=CAP,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, query_pre_attn_scalar=64)
bundles = {}
for name, types in (("windowed", ["sliding_attention", "full_attention"] * 15), ("global", ["full_attention"] * 30)):
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(**common, sliding_window=WINDOW, layer_types=types)
    d = root / name
    if not (d / "b.onnx" / "manifest.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "m")
        tiny_tokenizer().save_pretrained(d / "m")
        cb(CompileConfig(model=str(d / "m"), out=d / "b.onnx", max_context=CAP, force=True), progress=False)
    bundles[name] = d / "b.onnx"
from specee_compile.runtimes import load
engines = {n: load(b, dense=True) for n, b in bundles.items()}
rng = np.random.default_rng(0)
results = {}
for context in (256, 1024, 2048, 4000):
    prompt = [int(t) for t in rng.integers(3, 8192, size=context)]
    row = {}
    for rep in range(2):  # interleaved, the second pass kept
        for n, e in engines.items():
            got = e.generate(prompt, max_new_tokens=33)
            steps = got.step_seconds[1:] if got.step_seconds else None
            row[n] = (statistics.median(steps) if steps else got.decode_seconds / got.decode_steps) * 1e3
            row[n + "_steps"] = len(got.token_ids)
    row["windowed/global"] = row["windowed"] / row["global"]
    results[context] = row
    print(context, {k: round(v, 3) for k, v in row.items()}, flush=True)
json.dump({"setup": __doc__, "capacity": CAP, "window": WINDOW, "ms_per_decode_step": results,
           "threads": "the runtime default (2 cores)", "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")},
          open(root / "result.json", "w"), indent=1)
