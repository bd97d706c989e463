"""Tiny random-weight models of each supported family, for tests and runnable examples."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral")  # the families most tests run on
# the other supported families, each differing from Llama where its family does (architecture.py)
MORE_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "granite", "smollm3", "olmo2")
TINY_VOCAB = 320
TINY_WINDOW = 8  # the sliding window of the tiny Gemmas: tests decode past it


def tiny_config(family: str):
    import transformers

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    gemma = dict(head_dim=32, sliding_window=TINY_WINDOW, tie_word_embeddings=True,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    made = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=False),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=TINY_WINDOW),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16, use_sliding_window=False),
        "gemma2": lambda: transformers.Gemma2Config(**{**common, **gemma}, query_pre_attn_scalar=24,
                                                    attn_logit_softcapping=20.0, final_logit_softcapping=30.0),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(
            **{**common, **gemma}, query_pre_attn_scalar=32,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        # two heads of 32 with half of each rotated (Phi-3's partial rotary)
        "phi3": lambda: transformers.Phi3Config(**{**common, "num_attention_heads": 2, "num_key_value_heads": 1},
                                                partial_rotary_factor=0.5),
        "granite": lambda: transformers.GraniteConfig(**common, embedding_multiplier=6.0, residual_multiplier=0.5,
                                                      attention_multiplier=0.1, logits_scaling=2.0),
        "smollm3": lambda: transformers.SmolLM3Config(**common, no_rope_layers=[1, 0, 1], use_sliding_window=False),
        "olmo2": lambda: transformers.Olmo2Config(**common),
    }
    if family not in made:
        raise ValueError(family)
    return made[family]()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory, with the tiny models' vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, compile me fast"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    # Random init makes near-uniform logits; scale up so greedy tokens are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random model directory (config, safetensors, tokenizer) and return it."""
    path = Path(path)
    make_tiny_model(family, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_gguf_model(folder: str | Path, family: str, formats: dict[str, str]) -> tuple[Path, Path]:
    """A tiny model whose weights are a GGUF's dequantized blocks: returns (its directory, that
    GGUF), both under ``folder``. ``formats`` maps a projection's name (``q_proj``...) to its GGUF
    format; the rest are Q8_0."""
    import gguf

    folder = Path(folder)
    model = make_tiny_model(family)
    writer = gguf.GGUFWriter(folder / "tiny.gguf", "llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                fmt = gguf.GGMLQuantizationType[formats.get(name.rsplit(".", 1)[-1], "Q8_0")]
                raw = gguf.quants.quantize(module.weight.numpy(), fmt)
                module.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, fmt)))
                writer.add_tensor(name, raw, raw_dtype=fmt)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    model.save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    return folder / "model", folder / "tiny.gguf"


def write_calibration_jsonl(path: str | Path, examples: int = 12) -> Path:
    """A tiny calibration JSONL (prompt + response per line) for tests."""
    import json

    path = Path(path)
    path.write_text("\n".join(json.dumps({"prompt": f"hello world {i}",
                                          "response": "the quick brown fox jumps over the lazy dog " * 3})
                              for i in range(examples)))
    return path


# Commands called inside the test process keep a thread pool per session: the shared pool the
# commands default to is process-wide, and ONNX Runtime would then refuse the per-session
# sessions later tests make. The shared pool itself is tested in a subprocess.
IN_PROCESS = ["--thread-pool", "per-session"]
# Calibration settings small enough for tiny models and tests (seconds, not minutes).
TINY_CALIBRATION = dict(draft_sequences=8, predictor_sequences=4, draft_vocab=64, predictor_hidden=16,
                        predictor_epochs=3, positions_per_sequence=16, draft_epochs=1)
