"""Real measurements of a small CNN on its runtimes: positive, cached figures; and a real (small) table."""

from __future__ import annotations

import pytest

from pf_ray.config import Precision, Runtime, TargetConfig
from pf_ray.export.executorch_pte import executorch_available
from pf_ray.latency import TablePlan, latency_table, measure, measure_ms, reference_ms
from pf_ray.latency.measure import Timing
from tests.latency.conftest import SHAPE, small_cnn

QUICK = Timing(warmup=2, repeats=10, rounds=2)
NO_EXECUTORCH = pytest.mark.skipif(not executorch_available(),
                                   reason="ExecuTorch is not installed (pip install 'pf-ray[executorch]')")


@pytest.mark.parametrize("runtime, precision", [
    ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
    pytest.param("executorch", "fp32", marks=NO_EXECUTORCH), pytest.param("executorch", "int8", marks=NO_EXECUTORCH),
])
def test_a_real_measurement_is_positive_and_cached(runtime, precision, tmp_path, monkeypatch) -> None:
    target = TargetConfig(runtime=Runtime(runtime), precision=Precision(precision), batch_size=2)
    first = measure_ms(small_cnn(), SHAPE, target, timing=QUICK, folder=tmp_path)
    assert 0 < first < 100
    monkeypatch.setattr(measure, "_measure_one", lambda *args: pytest.fail("measured again"))
    assert measure_ms(small_cnn(), SHAPE, target, timing=QUICK, folder=tmp_path) == first
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_the_reference_is_fp32_onnx_runtime_with_the_targets_threads_and_batch(tmp_path) -> None:
    target = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.INT8, threads=1, batch_size=3)
    fp32 = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.FP32, threads=1, batch_size=3)
    assert reference_ms(small_cnn(), SHAPE, target, timing=QUICK, folder=tmp_path) == \
        measure_ms(small_cnn(), SHAPE, fp32, timing=QUICK, folder=tmp_path) > 0


def test_a_real_table_of_a_small_cnn(tmp_path) -> None:
    target = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.INT8)
    plan = TablePlan(sweep_fractions=(0.5,), dense_groups=1, dense_window=8, num_random=12, num_holdout=4,
                     timing=QUICK)
    lines: list[str] = []
    table = latency_table(small_cnn(), SHAPE, target, plan=plan, folder=tmp_path, log=lines.append)
    assert table.full_ms > 0 and table.reference_ms > 0 and len(table.holdout) > 0
    assert table.predict([4, 8]) > 0 and table.step >= 1 and table.environment["cpu"]["model_name"]
    assert any("latency table" in line for line in lines)
    assert len(list(tmp_path.glob("table-*.json"))) == 1
