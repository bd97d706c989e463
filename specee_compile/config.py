"""Compile configuration: one frozen, validated dataclass, presets and checked overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from specee_compile.errors import ConfigError

BACKENDS = ("ort", "trt")
OPT_LEVELS = ("O0", "O1")
PRECISIONS = ("fp32", "fp16", "bf16")
CHECKS = ("", "trt")
EXIT_MODES = ("segments", "graph")
DRAFT_PRECISIONS = ("", "fp32", "int8", "int4")
# The tree draft's default on ONNX Runtime: its proposals are verified, so only their speed and
# hit rate count (docs/benchmarks/draft-int8: int8 kept SmolLM2's tokens per forward, int4 lost some).
TREE_DRAFT_PRECISION = "int8"
DRAFT_BLOCK = 32  # the draft's int8/int4 blocks (ONNX Runtime's MatMulNBits)
BUNDLE_SUFFIXES = {".onnx": "ort", ".plan": "trt", ".engine": "trt"}


@dataclass(frozen=True)
class CompileConfig:
    """Everything `compile()` needs. Validated on construction.

    Attributes:
        model: a Hugging Face model directory, a .gguf file, or a built-in name.
        out: the bundle directory to write; its suffix (.onnx / .plan) picks the backend.
        backend: "ort" (ONNX Runtime) or "trt" (TensorRT); derived from ``out`` if empty.
        max_context: KV-cache capacity in tokens (prompt + generated).
        opt_level: "O0" exports only; "O1" adds ONNX Runtime's transformer fusions.
        force: replace an existing bundle at ``out`` (only once the new one is complete).
        skip_passes: names of passes to leave out.
        dump_ir: a folder to write the graph's text IR to after every phase.
        pipeline: custom passes: a function that edits the default
            :class:`specee_compile.passes.PassPlan` in place (one pipeline per graph family:
            ``lambda plan: plan["decode"].append("finalize", MyPass())``; it is called on every
            plan the compile builds), or a :class:`specee_compile.passes.Pipeline` replacing the
            ``step`` family's. The passes that ran are recorded in the manifest.
        specee: also build the SpecEE decode graphs (calibrating first when needed).
        calib_file: calibration JSONL (default ShareGPT).
        budget: minutes the calibration may take: its draft text is sized to fit, measured on
            this machine (``None``: the calibration defaults).
        exit_rule: "full" (paper), "reduced" (draft vocabulary) or "draft" (no head product).
        threshold: predictor threshold; 0 takes the calibrated one.
        exit_mode: how a SpecEE decode step exits: "segments" (one graph per block of
            layers, the runtime stops after the first block whose exit flag is set) or
            "graph" (one decode graph with a nested ``If`` after every predictor layer).
            TensorRT bundles take "segments" only: one engine per segment and one for the draft.
        tree: with ``specee``, also export the tree verification and tree draft graphs
            (``specee/tree.onnx``, ``specee/draft_tree.onnx``) that lossless tree speculation
            runs (``load(bundle, tree="4x2x6")``); ``check`` "trt" checks them too, and a TensorRT
            bundle holds an engine of each. Only ONNX Runtime bundles (exit mode "segments") also
            hold the tree segments that early exit inside verification (``":exit"``) runs.
        tree_shape: the bundle's default tree shape (``specee-run --tree`` without one). Empty:
            chosen at compile time by measuring the candidates
            (:mod:`specee_compile.runtimes.tree_choice`) on ``tree_prompts`` held-out prompts x
            ``tree_new_tokens`` tokens.
        precision: TensorRT engine precision, "fp16" (default), "bf16" or "fp32"; ONNX
            Runtime bundles are fp32 only. Empty: the backend's default.
        check: "trt" builds TensorRT-ready graphs (standard ONNX attention, no ONNX Runtime
            fusions) and checks every graph against TensorRT 10's ONNX parser before writing;
            always on for the TensorRT backend.
        quant: weight precision of every graph: "fp32", "int8", "int4" (ONNX Runtime's block
            quantizer) or "gguf" (the GGUF's own Q4_0/Q4_1/Q8_0 blocks, others re-quantized).
        quant_head, quant_embedding: the LM head's and the embedding's precision ("" = as
            ``quant``; a tied embedding follows the head).
        quant_block: block size of int4/int8 (GGUF blocks are 32); 0 = 32 for ONNX Runtime graphs,
            128 for TensorRT-ready ones (TensorRT's INT4 blocks are 64 or 128: a weight whose
            inputs 128 does not divide takes 64).
        quant_symmetric: int4/int8 without zero points (default; at blocks of 32 measured faster and closer
            to fp32 on SmolLM2, docs/benchmarks/quant-defaults).
        accuracy_level: MatMulNBits' activation precision, 4 (int8) or 0 (fp32); recorded in the manifest.
        quant_draft: the draft graphs' weight precision, "fp32", "int8" or "int4" (ONNX Runtime's
            block quantizer, blocks of 32, int8 activations). "" (default): for ONNX Runtime graphs
            the tree draft (``specee/draft_tree.onnx``) is int8, since the target verifies every
            token it proposes (on SmolLM2 its trees accepted as many tokens per forward as with
            fp32, and 80 MT-Bench prompts decoded at 1.63x dense against 1.59x,
            docs/benchmarks/draft-int8), and the autoregressive
            draft keeps ``quant``'s precision, since its candidates decide the exits (which the
            eager reference decoder reproduces); TensorRT-ready graphs keep ``quant``'s.
        gguf: the GGUF whose blocks ``quant`` "gguf" keeps (default: MODEL itself when it is one).
    """

    model: str
    out: Path
    backend: str = ""
    max_context: int = 2048
    opt_level: str = "O1"
    force: bool = False
    skip_passes: tuple[str, ...] = field(default_factory=tuple)
    dump_ir: Path | None = None
    specee: bool = False
    calib_file: str | None = None
    budget: float | None = None
    exit_rule: str = "full"
    threshold: float = 0.0  # 0: the calibrated threshold
    exit_mode: str = "segments"
    tree: bool = False
    tree_shape: str = ""  # "": measured at compile time
    tree_prompts: int = 8  # 4 x 64 chose 1x1x1 on SmolLM2 where 8 x 128 and MT-Bench pick 1x1x1+4 (draft-stage9)
    tree_new_tokens: int = 128
    calibration: Path | None = None  # a calibration artifact folder to use as is
    precision: str = ""  # "": fp16 for TensorRT, fp32 for ONNX Runtime
    check: str = ""
    quant: str = "fp32"
    quant_head: str = ""
    quant_embedding: str = ""
    quant_block: int = 0
    quant_symmetric: bool = True
    accuracy_level: int = 4
    quant_draft: str = ""
    gguf: Path | None = None
    pipeline: object | None = field(default=None, compare=False)  # edits the PassPlan, or the step's Pipeline

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if not self.backend:
            object.__setattr__(self, "backend", BUNDLE_SUFFIXES.get(self.out.suffix, "ort"))
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend '{self.backend}' is unknown; choose one of {BACKENDS}.")
        if self.out.suffix and self.out.suffix not in BUNDLE_SUFFIXES:
            raise ConfigError(
                f"output suffix '{self.out.suffix}' is unknown; use .onnx (ONNX Runtime bundle), "
                ".plan or .engine (TensorRT bundle), or a directory name without a suffix."
            )
        if self.out.suffix and BUNDLE_SUFFIXES[self.out.suffix] != self.backend:
            raise ConfigError(
                f"backend '{self.backend}' contradicts the output suffix '{self.out.suffix}' "
                f"(a '{BUNDLE_SUFFIXES[self.out.suffix]}' bundle); use .onnx for ort, .plan or .engine for trt."
            )
        if not self.precision:
            object.__setattr__(self, "precision", "fp16" if self.backend == "trt" else "fp32")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' is unknown; choose one of {PRECISIONS}.")
        if self.backend == "ort" and self.precision != "fp32":
            raise ConfigError(
                f"ONNX Runtime bundles are fp32; precision '{self.precision}' applies to TensorRT engines "
                "(--out NAME.plan)."
            )
        if self.check not in CHECKS:
            raise ConfigError(f"check '{self.check}' is unknown; the only check is 'trt' (TensorRT 10's ONNX parser).")
        if not isinstance(self.max_context, int) or not 16 <= self.max_context <= 1 << 20:
            raise ConfigError(f"max_context must be an integer in [16, 1048576], got {self.max_context}.")
        if self.pipeline is not None and not callable(self.pipeline):
            raise ConfigError("pipeline must be a function that edits the PassPlan, or a passes.Pipeline for the step "
                              f"graph; got {type(self.pipeline).__name__}.")
        if self.exit_rule not in ("full", "reduced", "draft"):
            raise ConfigError(f"exit_rule '{self.exit_rule}' is unknown; choose full, reduced or draft.")
        if self.exit_mode not in EXIT_MODES:
            raise ConfigError(f"exit_mode '{self.exit_mode}' is unknown; choose one of {EXIT_MODES}.")
        if self.exit_mode != "segments" and not self.specee:
            raise ConfigError(f"exit_mode '{self.exit_mode}' applies to SpecEE bundles only; add --specee "
                              "(specee=true) or drop the exit mode.")
        if self.backend == "trt" and self.specee and self.exit_mode != "segments":
            raise ConfigError(
                f"TensorRT SpecEE bundles use exit mode 'segments' (one engine per segment); exit mode "
                f"'{self.exit_mode}' is not built for TensorRT. Drop --exit-mode, or compile --out NAME.onnx "
                f"--specee --exit-mode {self.exit_mode} --check trt for its TensorRT-checked graph."
            )
        if self.tree and not self.specee:
            raise ConfigError("tree speculation needs the draft of a SpecEE bundle; add --specee (specee=true) or drop "
                              "--tree.")
        if self.tree_shape:
            from specee_compile.contract import TREE_MAX_WIDTH
            from specee_compile.runtimes.speculation import TreeShape

            if not self.tree:
                raise ConfigError(f"--tree-shape {self.tree_shape} is the default of a bundle compiled with --tree; add "
                                  "--tree or drop the shape.")
            object.__setattr__(self, "tree_shape", str(TreeShape.parse(self.tree_shape).check(TREE_MAX_WIDTH)))
        for name in ("tree_prompts", "tree_new_tokens"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ConfigError(f"{name} must be from 1 to 4096, got {getattr(self, name)}.")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"threshold must be in [0, 1) (0 = calibrated), got {self.threshold}.")
        if self.opt_level not in OPT_LEVELS:
            raise ConfigError(f"opt_level '{self.opt_level}' is unknown; choose one of {OPT_LEVELS}.")
        if self.calib_file is not None and not Path(self.calib_file).is_file():
            kind = "a folder" if Path(self.calib_file).is_dir() else "missing"
            raise ConfigError(f"--calib {self.calib_file} is {kind}; pass a JSONL file that exists.")
        if self.budget is not None:
            if not self.specee or self.calibration:
                raise ConfigError("--budget sizes the calibration, which runs with --specee only (and not with a "
                                  "given calibration); add --specee or drop --budget.")
            if not 0 < self.budget < 1e6:
                raise ConfigError(f"--budget must be a positive number of minutes, got {self.budget}.")
        if self.quant_spec.active and self.graph_target == "trt":
            self._check_trt_quant()
        self._check_quant_draft()
        if self.gguf is not None:
            object.__setattr__(self, "gguf", Path(self.gguf))
            if self.gguf.suffix != ".gguf" or not self.gguf.is_file():
                raise ConfigError(f"--gguf {self.gguf} is not a .gguf file; name the GGUF whose blocks --quant gguf "
                                  "keeps.")
        if self.dump_ir is not None:
            object.__setattr__(self, "dump_ir", Path(self.dump_ir))
            if self.dump_ir.exists() and not self.dump_ir.is_dir():
                raise ConfigError(f"--dump-ir {self.dump_ir} is a file; the IR dumps go into a folder. Name a folder "
                                  "(it is created if missing).")

    def _check_trt_quant(self) -> None:
        """TensorRT parses weight-only INT4 in symmetric blocks of 64 or 128 values; INT8 weights
        only per tensor or channel, and no GGUF block (32 values, Q4_1 with minimums)."""
        where = "TensorRT-ready graphs (--check trt, a .plan output)"
        fix = "use --quant int4 for them, or an ONNX Runtime bundle (.onnx without --check trt) for"
        for flag, value in (("--quant", self.quant), ("--quant-head", self.quant_head)):
            if value not in ("", "fp32", "int4"):
                why = ("TensorRT takes INT8 weights per tensor or per channel, not in blocks" if value == "int8" else
                       "a GGUF's blocks hold 32 values (Q4_1 with minimums) and TensorRT's INT4 blocks 64 or 128")
                raise ConfigError(f"{flag} {value} cannot be built into {where}: {why}. {fix.capitalize()} {value}.")
        if self.quant_embedding not in ("", "fp32"):
            raise ConfigError(f"--quant-embedding {self.quant_embedding}: {where} read the embedding in fp32 (their "
                              "quantized weights feed products only). Drop --quant-embedding.")
        if not self.quant_symmetric:
            raise ConfigError(f"--quant-asymmetric: TensorRT's quantization is symmetric (zero points must be 0), "
                              f"so {where} take symmetric blocks only. Drop --quant-asymmetric.")
        if self.specee and self.exit_mode == "graph":
            raise ConfigError(f"--quant {self.quant} with --exit-mode graph cannot be built into {where}: TensorRT "
                              "builds segment engines only, and ONNX Runtime does not fuse the blocked weights that "
                              "the decode graph's If branches read from the outer graph. Use --exit-mode segments.")
        if self.quant_block not in (0, 64, 128):
            raise ConfigError(f"--quant-block {self.quant_block}: TensorRT's INT4 blocks are 64 or 128 values (the "
                              f"default for {where} is 128, 64 where 128 does not divide a weight's inputs).")

    def _check_quant_draft(self) -> None:
        if self.quant_draft not in DRAFT_PRECISIONS:
            raise ConfigError(f"--quant-draft {self.quant_draft!r} is unknown; choose one of "
                              f"{', '.join(p for p in DRAFT_PRECISIONS if p)}.")
        if self.quant_draft and not self.specee:
            raise ConfigError(f"--quant-draft {self.quant_draft} sets the precision of a SpecEE bundle's draft graphs; "
                              "add --specee or drop --quant-draft.")
        if self.quant_draft == "int8" and self.graph_target == "trt":
            raise ConfigError("--quant-draft int8 cannot be built into TensorRT-ready graphs (--check trt, a .plan "
                              "output): TensorRT takes INT8 weights per tensor or per channel, not in blocks. Use "
                              "--quant-draft int4 or fp32 for them.")

    def draft_quant_spec(self, family: str):
        """The weight quantization of the draft graph ``family`` ("draft" or "draft_tree")."""
        from specee_compile.quant.spec import QuantSpec

        precision = self.quant_draft or (TREE_DRAFT_PRECISION if family == "draft_tree" and self.graph_target == "ort"
                                         else "")
        if not precision:
            return self.quant_spec
        if self.graph_target == "trt":  # TensorRT's INT4 blocks, its own activations
            return QuantSpec(precision, precision, "fp32", self.quant_block or 128, True, self.accuracy_level)
        return QuantSpec(precision, precision, precision, DRAFT_BLOCK, True, 4)

    @property
    def quant_spec(self):
        """The weight quantization asked for (raises ConfigError on an unknown choice)."""
        from specee_compile.quant.spec import QuantSpec

        block = self.quant_block or (128 if self.graph_target == "trt" else 32)
        return QuantSpec(self.quant, self.quant_head, self.quant_embedding, block, self.quant_symmetric,
                         self.accuracy_level)

    @property
    def graph_target(self) -> str:
        """What the emitted graphs are for: "trt" (standard ONNX only) or "ort" (ORT contrib ops)."""
        return "trt" if self.backend == "trt" or self.check == "trt" else "ort"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["out"] = str(self.out)
        d["skip_passes"] = list(self.skip_passes)
        d["dump_ir"] = str(self.dump_ir) if self.dump_ir else None
        d["calibration"] = str(self.calibration) if self.calibration else None
        d["gguf"] = str(self.gguf) if self.gguf else None
        d["pipeline"] = _describe_custom(self.pipeline)
        return d


def _describe_custom(pipeline) -> list[str] | str | None:
    if pipeline is None:
        return None
    if hasattr(pipeline, "names"):
        return pipeline.names()
    return getattr(pipeline, "__qualname__", type(pipeline).__name__)


def with_overrides(config: CompileConfig, overrides: list[str]) -> CompileConfig:
    """Apply ``key=value`` overrides to a compile config, checked against its fields."""
    return apply_overrides(config, overrides, frozen=("model", "out", "pipeline", "dump_ir"))


def apply_overrides(config, overrides: list[str], frozen: tuple[str, ...] = ()):
    """Apply ``key=value`` overrides to any frozen config dataclass, checked against its fields."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields or key in frozen:
            valid = ", ".join(k for k in fields if k not in frozen)
            raise ConfigError(f"override '{item}' is not key=value with a known key ({valid}).")
        current = getattr(config, key)
        try:
            if isinstance(current, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1")
            elif isinstance(current, int):
                value = int(raw)
            elif isinstance(current, float):
                value = float(raw)
            elif isinstance(current, tuple):
                items = [v for v in raw.split(",") if v]
                value = tuple(int(v) for v in items) if current and isinstance(current[0], int) else tuple(items)
            else:
                value = raw
        except ValueError as e:
            raise ConfigError(f"override '{item}': '{raw}' is not a valid {type(current).__name__}.") from e
        changes[key] = value
    return dataclasses.replace(config, **changes)
