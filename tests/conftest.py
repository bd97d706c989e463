"""Shared fixtures: tiny random-weight models of each supported family, saved as HF directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from specee_compile.testing import FAMILIES, TINY_VOCAB, make_tiny_model, tiny_config, tiny_tokenizer  # noqa: F401


def mutate_json(draw, node, values, delete: bool = True) -> None:
    """Change one randomly chosen key or item of a JSON tree, at any depth: delete it (when
    ``delete``) or replace it with a value drawn from the hypothesis strategy ``values``."""
    from hypothesis import strategies as st

    while True:
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        if delete and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(values)
        return


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> saved tiny model directory (config, safetensors, tokenizer)."""
    dirs = {}
    tokenizer = tiny_tokenizer()
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        make_tiny_model(family).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[family] = d
    return dirs


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dirs, tmp_path_factory) -> Path:
    """A compiled ORT bundle of the tiny Llama (capacity 64)."""
    from specee_compile.compiler import compile as compile_bundle
    from specee_compile.config import CompileConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny.onnx"
    return compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=out, max_context=64), progress=False)


@pytest.fixture(autouse=True, scope="session")
def _cache_home(tmp_path_factory):
    """Keep the user's cache unless CI points XDG_CACHE_HOME somewhere on purpose. Each test
    worker has its own cache (calibrations replace their entries), but the workers of one run
    share the converted models and the wheels, which are filled under a lock: SmolLM2 is then
    converted once, and its fp32 directory is half a GB."""
    if "XDG_CACHE_HOME" in os.environ:
        return
    own = tmp_path_factory.mktemp("xdg-cache")
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "xdg-cache-shared"
    (own / "specee-compile").mkdir()
    for name in ("models", "wheels", ".locks"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        (own / "specee-compile" / name).symlink_to(shared / name, target_is_directory=True)
    os.environ["XDG_CACHE_HOME"] = str(own)


@pytest.fixture(scope="session")
def tiny_llama_calibration(tiny_dirs, tmp_path_factory) -> Path:
    """A quick calibration artifact of the tiny Llama."""
    from specee_compile.calibrate import CalibrationSettings, calibrate
    from specee_compile.testing import TINY_CALIBRATION, write_calibration_jsonl

    calib = write_calibration_jsonl(tmp_path_factory.mktemp("calib-llama") / "c.jsonl")
    return calibrate(tiny_dirs["llama"], CalibrationSettings(calib_file=str(calib), **TINY_CALIBRATION),
                     progress=False)


@pytest.fixture(scope="session")
def calibrations(tiny_dirs, tiny_llama_calibration, tmp_path_factory) -> dict[str, Path]:
    """family -> a quick calibration artifact of that tiny model (the Llama's is tiny_llama_calibration)."""
    from specee_compile.calibrate import CalibrationSettings, calibrate
    from specee_compile.testing import TINY_CALIBRATION, write_calibration_jsonl

    path = write_calibration_jsonl(tmp_path_factory.mktemp("calib") / "c.jsonl")
    settings = CalibrationSettings(calib_file=str(path), **TINY_CALIBRATION)
    return {family: tiny_llama_calibration if family == "llama" else calibrate(d, settings, progress=False)
            for family, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def bundle(tiny_dirs, calibrations, tmp_path_factory):
    """bundle(family, threshold, rule, exit_mode="segments", check="", tree=False, quant_draft="") -> a compiled tiny
    SpecEE bundle (capacity 64), compiled once per session: tests that change a bundle copy it
    first. Tests take the tree bundle (a superset) where the tree graphs do not matter, so that
    they share its compile."""
    from specee_compile.compiler import compile as compile_bundle
    from specee_compile.config import CompileConfig

    built = {}

    def get(family, threshold, rule, exit_mode="segments", check="", tree=False, quant_draft=""):
        key = (family, threshold, rule, exit_mode, check, tree, quant_draft)
        if key not in built:
            out = tmp_path_factory.mktemp("specee") / f"{family}.onnx"
            built[key] = compile_bundle(CompileConfig(
                model=str(tiny_dirs[family]), out=out, max_context=64, specee=True, calibration=calibrations[family],
                threshold=threshold, exit_rule=rule, exit_mode=exit_mode, check=check, tree=tree, quant_draft=quant_draft),
                progress=False)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_specee_bundle(bundle) -> Path:
    """A tiny Llama SpecEE bundle with the tree graphs and tree segments (capacity 64); tests
    that change it copy it first."""
    return bundle("llama", 0.3, "full", tree=True)
