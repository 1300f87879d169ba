"""``mf-edge bench``: every format of a model, made by the conversion pipeline, measured side by side.

``run_bench(BenchConfig(...))`` returns the report (a JSON-ready dict); ``report`` writes it as a
table, JSON, CSV and a PNG chart; ``measure`` is what runs inside each runtime's own process.
"""

from mf_edge.bench import report
from mf_edge.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "report", "run_bench"]
