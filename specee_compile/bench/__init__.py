"""specee-bench: speed and quality of SpecEE bundles side by side with dense baselines.

    from specee_compile.bench import BenchSettings, run
    report = run(BenchSettings(model="smollm2", out=Path("bench"), quick=True))
"""

from specee_compile.bench.run import BenchSettings, run

__all__ = ["BenchSettings", "run"]
