"""A user-defined graph pass in the compile pipelines, dense and SpecEE graphs alike.

The pass below records an op histogram of a graph in its metadata; it is an ordinary
``onnx_ir`` pass object with a snake_case ``name``. A compile runs one pipeline per graph
family (``specee-compile --list-passes --specee``); the function ``add_histograms`` edits the
default plan, appending the pass to the ``finalize`` phase of the step graph's pipeline and
of the SpecEE segments' and draft's. The model (a tiny random Llama, or the directory given
as the first argument) is compiled as a SpecEE bundle (a quick tiny calibration), then
loaded and run.

    python examples/custom_pass.py [MODEL] [OUT_DIR]
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

from specee_compile.calibrate import CalibrationSettings, calibrate
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.passes import PassPlan
from specee_compile.runtimes import load
from specee_compile.testing import TINY_CALIBRATION, save_tiny_model


@dataclasses.dataclass
class RecordOpHistogramPass(ir.passes.InPlacePass):
    """Store the graph's op histogram as JSON in the model metadata."""

    name: str = "record_op_histogram"
    key: str = "example.op_histogram"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        hist = collections.Counter(node.op_type for node in model.graph)
        model.metadata_props[self.key] = json.dumps(dict(sorted(hist.items())))
        return ir.passes.PassResult(model, modified=True)


def add_histograms(plan: PassPlan) -> None:
    """Edit the default plan in place: the pass ends the step, segment and draft pipelines."""
    for family in ("step", "segments", "draft"):
        plan[family].append("finalize", RecordOpHistogramPass())


def main(argv: list[str]) -> int:
    work = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp())
    model = argv[0] if argv and argv[0] else str(save_tiny_model(work / "tiny-llama"))
    prompts = work / "calibration.jsonl"  # a few lines are enough for a tiny model's quick calibration
    prompts.write_text("".join(json.dumps({"prompt": f"hello {i}", "response": "the quick brown fox " * 4}) + "\n"
                               for i in range(12)))
    calibration = calibrate(model, CalibrationSettings(calib_file=str(prompts), **TINY_CALIBRATION), progress=False)
    config = CompileConfig(model=model, out=work / "custom.onnx", max_context=64, force=True, specee=True,
                           calibration=calibration, pipeline=add_histograms)
    out = compile_bundle(config, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    ran = sorted({f"{e['graph']}:{e['pass']}" for e in manifest["passes"] if not e.get("skipped")})
    print("passes:", ran)
    for name in ("model.onnx", manifest["specee"]["segments"][0]["file"], manifest["specee"]["draft"]["file"]):
        print(f"op histogram of {name}:", ir.load(out / name).metadata_props["example.op_histogram"])
    got = load(out).generate([1, 40, 41], max_new_tokens=5)
    print("generated:", got.token_ids, "exit layers:", got.exit_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
