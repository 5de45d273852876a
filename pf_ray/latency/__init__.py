"""Latency on the deployment target: measured (``measure``), and predicted for channel pruning's candidates by a
fitted per-group table (``build`` -> ``LatencyTable``), with the channel multiple where latency steps (``steps``).

    from pf_ray.latency import latency_table, measure_ms, reference_ms

    table = latency_table(model, (1, 28, 28), TargetConfig(precision="int8"), log=print)   # cached per CPU
    table.predict(kept)          # ms, one kept count per group of macs_table(model, shape), in its order
    table.speedup(kept)          # reference_ms / predict(kept): FP32 ONNX Runtime unpruned over the candidate
    table.step                   # the channel multiple worth rounding to (round_to: auto)

No Ray here: a table is plain data, pickled to wherever the search runs.
"""

from pf_ray.latency.build import TablePlan, fit_table, latency_table, plan_for, pruned_copy
from pf_ray.latency.measure import Timing, measure_models, measure_ms, reference_ms
from pf_ray.latency.table import LatencyTable, Measured

__all__ = ["LatencyTable", "Measured", "TablePlan", "Timing", "fit_table", "latency_table", "measure_models",
           "measure_ms", "plan_for", "pruned_copy", "reference_ms"]
