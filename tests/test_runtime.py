"""The ORT runtime: damaged bundles, bad requests, capacity, and concurrent use."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specee_compile.bundle import MANIFEST
from specee_compile.errors import BundleError, GenerationError
from specee_compile.runtimes import load


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return load(tiny_bundle)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    out = tmp_path / "copy.onnx"
    shutil.copytree(tiny_bundle, out)
    return out


def _edit_manifest(bundle, change):
    path = bundle / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_altered_file_fails_checksum(bundle_copy):
    data = bundle_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="model.onnx.data does not match its checksum"):
        load(bundle_copy)


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        load(bundle_copy)


def test_newer_format_version_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="format version 99"):
        load(bundle_copy)


def test_manifest_not_json_is_refused(bundle_copy):
    (bundle_copy / MANIFEST).write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load(bundle_copy)


def test_graph_io_disagreeing_with_manifest_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m["graphs"]["step"]["outputs"].pop())
    with pytest.raises(BundleError, match="manifest promises"):
        load(bundle_copy)


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        load(tmp_path / "nothing")


def test_empty_prompt_raises(engine):
    with pytest.raises(GenerationError, match="empty"):
        engine.generate("   ")


@pytest.mark.parametrize("n", [0, -3, True, 2.5, 1 << 30])
def test_bad_max_new_tokens_raises(engine, n):
    with pytest.raises(GenerationError, match="max_new_tokens"):
        engine.generate([1, 2, 3], max_new_tokens=n)


def test_prompt_longer_than_context_raises(engine):
    with pytest.raises(GenerationError, match="context holds 64"):
        engine.generate(list(range(3, 70)))


def test_generation_stops_cleanly_at_capacity(engine):
    result = engine.generate(list(range(3, 60)), max_new_tokens=50)
    assert result.stop_reason in ("capacity", "eos")
    assert result.prompt_tokens + len(result.token_ids) <= engine.capacity + 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=-(1 << 40), max_value=1 << 40), min_size=1, max_size=80))
def test_any_token_ids_give_tokens_or_a_clear_error(engine, ids):
    try:
        result = engine.generate(ids, max_new_tokens=3)
    except GenerationError as e:
        assert "vocabulary" in str(e) or "context holds" in str(e)
    else:
        assert all(0 <= t < engine.vocab_size for t in result.token_ids)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_any_text_prompt_gives_tokens_or_a_clear_error(engine, text):
    try:
        result = engine.generate(text, max_new_tokens=2)
    except GenerationError as e:
        assert "empty" in str(e) or "context holds" in str(e)
    else:
        assert isinstance(result.text, str)


def test_concurrent_requests_are_independent(engine):
    prompts = [[1, 10, 11, 12], [1, 200, 201], [1, 5, 6, 7, 8, 9]]
    expected = [engine.generate(p, max_new_tokens=12).token_ids for p in prompts]
    results: dict[int, list[int]] = {}

    def work(k):
        for _ in range(3):
            results[k] = engine.generate(prompts[k % 3], max_new_tokens=12).token_ids
            assert results[k] == expected[k % 3]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[k] for k in range(6)] == expected + expected


def test_stream_receives_the_generated_text(engine):
    pieces: list[str] = []
    result = engine.generate("hello world", max_new_tokens=8, stream=pieces.append)
    assert "".join(pieces) == result.text
