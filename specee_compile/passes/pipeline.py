"""A pipeline of named phases of passes, extensible by pass name.

    canonicalize -> specee -> optimize -> finalize

Each phase is a list of pass objects following the ``onnx_ir`` pass contract. Users add
their own passes with ``insert_after`` / ``insert_before``, drop one with ``remove`` or
swap one with ``replace``; unknown names raise an error listing the valid ones.

A pipeline is itself an ``onnx_ir`` pass (``pipeline(model) -> PassResult``), so pipelines
nest in each other and in ``ir.passes.Sequential``; its ``requires``/``ensures`` are those
of every pass it holds, checked as each runs. ``run`` is the compiler's entry: it skips
passes by name, logs what each did and can dump the graph's text IR after every phase.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from specee_compile.errors import OutputError, PassError

logger = logging.getLogger(__name__)

PHASES = ("canonicalize", "specee", "optimize", "quantize", "finalize")


class Pipeline(ir.passes.PassBase):
    """Ordered phases, each an ordered list of passes with unique ``name`` attributes."""

    def __init__(self, phases: dict[str, list] | None = None, name: str = "pipeline"):
        self.name = name
        self.phases: dict[str, list] = {p: [] for p in PHASES}
        for phase, passes in (phases or {}).items():
            self._phase(phase)
            for p in passes:
                self.append(phase, p)

    # ---- editing ------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [p.name for passes in self.phases.values() for p in passes]

    def passes(self) -> list:
        return [p for passes in self.phases.values() for p in passes]

    # ---- the onnx_ir pass contract ------------------------------------------------------
    @property
    def in_place(self) -> bool:
        return all(p.in_place for p in self.passes())

    @property
    def changes_input(self) -> bool:
        passes = self.passes()
        return not passes or passes[0].changes_input or passes[0].in_place

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = model
        model, log = self.run(model)
        return ir.passes.PassResult(model, any(e.get("modified") for e in log) or model is not start)

    def append(self, phase: str, p) -> "Pipeline":
        self._check_new(p)
        self._phase(phase).append(p)
        return self

    def insert_after(self, name: str, p) -> "Pipeline":
        phase, i = self._find(name)
        self._check_new(p)
        self.phases[phase].insert(i + 1, p)
        return self

    def insert_before(self, name: str, p) -> "Pipeline":
        phase, i = self._find(name)
        self._check_new(p)
        self.phases[phase].insert(i, p)
        return self

    def remove(self, name: str) -> "Pipeline":
        phase, i = self._find(name)
        del self.phases[phase][i]
        return self

    def replace(self, name: str, p) -> "Pipeline":
        phase, i = self._find(name)
        if p.name != name:
            self._check_new(p)
        self.phases[phase][i] = p
        return self

    def describe(self, indent: str = "") -> str:
        lines = []
        for phase, passes in self.phases.items():
            lines.append(f"{indent}{phase}:")
            lines += [f"{indent}  {p.name}  {summary(p)}" for p in passes] or [f"{indent}  (none)"]
        return "\n".join(lines)

    # ---- running ------------------------------------------------------------------------
    def run(self, model: ir.Model, skip: tuple[str, ...] = (), dump_dir: Path | None = None,
            strict: bool = True) -> tuple[ir.Model, list[dict]]:
        """Run every phase; return (model, log). ``skip`` names passes to leave out (with
        ``strict``, every name must be one of this pipeline's)."""
        unknown = [s for s in skip if s not in self.names()]
        if unknown and strict:
            raise PassError(f"cannot skip unknown pass(es) {unknown}; the passes are: {', '.join(self.names())}.")
        ran: list[str] = []
        log: list[dict] = []
        if dump_dir is not None:
            _dump(model, Path(dump_dir) / "00-exported.txt")
        for k, (phase, passes) in enumerate(self.phases.items(), start=1):
            for p in passes:
                if p.name in skip:
                    log.append({"phase": phase, "pass": p.name, "skipped": True})
                    continue
                result = self._run_one(p, model, ran)
                model = result.model
                entry = {"phase": phase, "pass": p.name, "modified": bool(result.modified)}
                if getattr(p, "fired", None):
                    entry["fired"] = dict(p.fired)
                log.append(entry)
                ran.append(p.name)
            if dump_dir is not None:
                _dump(model, Path(dump_dir) / f"{k:02d}-{phase}.txt")
        return model, log

    @staticmethod
    def _run_one(p, model: ir.Model, ran: list[str]) -> ir.passes.PassResult:
        try:
            result = p(model)
        except ir.passes.InvariantError as e:  # requires/ensures; ours are PassErrors too
            if isinstance(e, PassError):
                raise PassError(f"{e} (passes that ran before '{p.name}': {', '.join(ran) or 'none'})") from e
            raise PassError(f"pass '{p.name}': {e} ({e.__cause__ or 'a pre- or postcondition'}); passes that ran "
                            f"before it: {', '.join(ran) or 'none'}.") from e
        except PassError as e:
            raise PassError(f"{e} (passes that ran before '{p.name}': {', '.join(ran) or 'none'})") from e
        except Exception as e:
            raise PassError(
                f"pass '{p.name}' failed ({type(e).__name__}: {e}); passes that ran before it: "
                f"{', '.join(ran) or 'none'}. Skip it with --skip-pass {p.name} to compile without it."
            ) from e
        logger.info("pass %s: modified=%s %s", p.name, result.modified, getattr(p, "fired", "") or "")
        return result

    # ---- helpers ------------------------------------------------------------------------
    def _phase(self, phase: str) -> list:
        if phase not in self.phases:
            raise PassError(f"unknown phase '{phase}'; the phases are: {', '.join(self.phases)}.")
        return self.phases[phase]

    def _find(self, name: str) -> tuple[str, int]:
        for phase, passes in self.phases.items():
            for i, p in enumerate(passes):
                if p.name == name:
                    return phase, i
        raise PassError(f"no pass named '{name}'; the passes are: {', '.join(self.names()) or 'none'}.")

    def _check_new(self, p) -> None:
        name = getattr(p, "name", None)
        if not isinstance(name, str) or not name:
            raise PassError(f"{p!r} has no name; give the pass a snake_case `name` attribute.")
        if name in self.names():
            raise PassError(f"a pass named '{name}' is already in the pipeline; names must be unique.")


def summary(p) -> str:
    doc = type(p).__doc__
    return doc.strip().splitlines()[0] if doc else ""


def _dump(model: ir.Model, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(model.graph))
    except OSError as e:
        raise OutputError(f"cannot write the IR dump {path} ({e}); choose another --dump-ir folder.") from e
