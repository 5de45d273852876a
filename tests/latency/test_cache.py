"""The latency cache: a key that changes with each of its parts, entries reused otherwise, damaged entries measured
again; tables cached like single measurements."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pf_ray.config import Precision, Runtime, TargetConfig
from pf_ray.latency import TablePlan, build, cache, measure
from pf_ray.latency.measure import Timing, measure_ms, measurement_key
from tests.latency.conftest import SHAPE, SyntheticRuntime, small_cnn

TARGET = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.FP32, threads=1, batch_size=1)


@pytest.fixture
def fake_timing(monkeypatch):
    """Measurements without a runtime: each is 1.0 ms more than the last; returns the calls."""
    calls = []

    def measured(model, input_shape, target, timing):
        calls.append((tuple(input_shape), target))
        return [{"median_ms": float(len(calls)), "rounds_ms": [float(len(calls))]}]

    monkeypatch.setattr(measure, "_measure_one", measured)
    return calls


def test_the_key_changes_with_each_of_its_parts(monkeypatch) -> None:
    base = measurement_key(small_cnn(), SHAPE, TARGET, Timing())
    assert measurement_key(small_cnn(), SHAPE, TARGET, Timing()) == base  # same shapes, new weights
    changed = {
        "architecture": measurement_key(small_cnn(width=12), SHAPE, TARGET, Timing()),
        "input shape": measurement_key(small_cnn(), (1, 16, 16), TARGET, Timing()),
        "timing": measurement_key(small_cnn(), SHAPE, TARGET, Timing(repeats=41)),
        **{f"target.{field}": measurement_key(small_cnn(), SHAPE, replace(TARGET, **{field: value}), Timing())
           for field, value in [("precision", Precision.INT8), ("threads", 2), ("batch_size", 8)]},
    }
    monkeypatch.setattr(cache, "runtime_version", lambda runtime: "onnxruntime 0.0.1")
    changed["runtime version"] = measurement_key(small_cnn(), SHAPE, TARGET, Timing())
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    changed["torch version"] = measurement_key(small_cnn(), SHAPE, TARGET, Timing())
    monkeypatch.undo()
    name, flags = cache.cpu()
    monkeypatch.setattr(cache, "cpu", lambda: (name, flags + " avx512_vnni_not_really"))
    changed["CPU flags"] = measurement_key(small_cnn(), SHAPE, TARGET, Timing())
    monkeypatch.setattr(cache, "cpu", lambda: ("Another CPU", flags))
    changed["CPU model"] = measurement_key(small_cnn(), SHAPE, TARGET, Timing())
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_a_measurement_is_reused_and_a_damaged_entry_measured_again(tmp_path, fake_timing) -> None:
    first = measure_ms(small_cnn(), SHAPE, TARGET, folder=tmp_path)
    assert measure_ms(small_cnn(), SHAPE, TARGET, folder=tmp_path) == first == 1.0
    assert len(fake_timing) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert measure_ms(small_cnn(), SHAPE, replace(TARGET, threads=2), folder=tmp_path) == 2.0
    entry = tmp_path / f"{measurement_key(small_cnn(), SHAPE, TARGET, Timing())}.json"
    for damage in ("{not json", '{"median_ms": -1}', '{"other": 1}', ""):
        entry.write_text(damage)
        assert measure_ms(small_cnn(), SHAPE, TARGET, folder=tmp_path) > 0
    assert len(fake_timing) == 6  # each damaged entry measured again
    assert measure_ms(small_cnn(), SHAPE, TARGET, folder=tmp_path) == 6.0  # and the repaired one reused


def test_the_cache_folder_comes_from_the_environment(tmp_path, monkeypatch, fake_timing) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "here"))
    measure_ms(small_cnn(), SHAPE, TARGET)
    assert len(list((tmp_path / "here").glob("*.json"))) == 1


def test_a_table_is_cached_like_a_measurement(tmp_path, monkeypatch) -> None:
    built = []

    class FakeTimer:
        """The synthetic runtime in place of exporting and timing pruned copies."""

        def __init__(self, model, input_shape, target, plan, log=None) -> None:
            from pf_ray.ops.macs_budget import macs_table

            self.runtime = SyntheticRuntime(macs_table(model, input_shape))
            built.append(plan)

        def __call__(self, vectors):
            return self.runtime(vectors)

        def reference_ms(self) -> float:
            return 2.0

        def close(self) -> None:
            pass

    monkeypatch.setattr(build, "CandidateTimer", FakeTimer)
    plan = TablePlan(num_random=30, num_holdout=10, dense_window=8)
    lines: list[str] = []
    table = build.latency_table(small_cnn(), SHAPE, TARGET, plan=plan, folder=tmp_path, log=lines.append)
    assert any("measuring" in line for line in lines) and table.reference_ms == 2.0
    again = build.latency_table(small_cnn(), SHAPE, TARGET, plan=plan, folder=tmp_path)
    assert len(built) == 1 and again.predict(table.sizes) == table.predict(table.sizes)
    assert again.target == {"runtime": "onnxruntime", "precision": "fp32", "threads": 1, "batch_size": 1}
    build.latency_table(small_cnn(), SHAPE, TARGET, plan=replace(plan, seed=1), folder=tmp_path)
    build.latency_table(small_cnn(), SHAPE, replace(TARGET, precision=Precision.INT8), plan=plan, folder=tmp_path)
    assert len(built) == 3  # the plan and the target are in the key
    (entry,) = tmp_path.glob(f"table-{build.table_key(small_cnn(), SHAPE, TARGET, plan)}.json")
    entry.write_text(entry.read_text()[:100])
    build.latency_table(small_cnn(), SHAPE, TARGET, plan=plan, folder=tmp_path)
    assert len(built) == 4  # a damaged table is built again
