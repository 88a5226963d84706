"""Benchmarks (one module each, registered by name) and the resumable evaluation runner.

`get_benchmark(name)` returns a configured-by-default benchmark; `BENCHMARKS` maps names to classes;
`trimkv.eval.runner.evaluate(...)` / `python -m trimkv eval` runs one (model, benchmark, policy, budget).
"""

from trimkv.eval import aime24, gsm8k, longbench, longbench_v2, longmemeval, longproc, math500, scbench  # noqa: F401
from trimkv.eval.base import BENCHMARKS, Benchmark, GenerationSettings, Sample, get_benchmark, register

try:  # the offline synthetic task (written against base.py's interface)
    from trimkv.eval import synthetic  # noqa: F401
except ImportError:
    pass

__all__ = ["BENCHMARKS", "Benchmark", "GenerationSettings", "Sample", "get_benchmark", "register"]
