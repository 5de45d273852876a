"""Safe pruning of any graph (issue 15): the groups whose pruning breaks a user's model are found and left unpruned,
the others are pruned for real; the dependency analysis is bounded in time and memory."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from pf_ray.errors import ModelError
from pf_ray.export.onnx import export_onnx
from pf_ray.metrics import model_stats
from pf_ray.ops.channel_groups import AnalysisLimits, prunable_groups, trace_groups
from pf_ray.ops.macs_budget import macs_table, project_to_budget, without_groups
from pf_ray.ops.pruning import prune_channels_
from pf_ray.ops.safe_pruning import unsafe_groups
from tests.user_graphs import SAFE, SHAPE, UNSAFE, Hungry, ScaledNet, Slow, shuffle_user_net


def test_pruning_every_group_of_a_shuffle_graph_breaks_it():
    """What users met: torch-pruning's groups for a split + shuffle graph do not describe the model."""
    model = shuffle_user_net()
    groups = prunable_groups(model, SHAPE)
    with pytest.raises((IndexError, RuntimeError)):
        prune_channels_(model, SHAPE, [0.5] * len(groups), round_to=1)
        model(torch.randn(2, *SHAPE))


def test_the_unsafe_groups_of_a_shuffle_graph_are_named_with_the_reason():
    model = shuffle_user_net()
    before = copy.deepcopy(model.state_dict())
    lines = []
    skipped = unsafe_groups(model, SHAPE, 0.1, 1, log=lines.append)
    assert tuple(group.name for group in skipped) == UNSAFE
    reasons = dict((group.name, group.reason) for group in skipped)
    assert "channel shuffle" in reasons["stem.0"] and "16 output channels" in reasons["stem.0"]
    assert "grouped convolution 'block1.branch.0' (groups=2)" in reasons["block1.branch.0"]
    assert len(lines) == 3 and all("left unpruned" in line for line in lines)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())  # not modified


@pytest.mark.parametrize("criterion", ["l1", "lasso"])
def test_a_shuffle_graph_is_pruned_toward_half_its_macs_where_it_is_safe(tmp_path, criterion):
    model = shuffle_user_net()
    skipped = {group.name for group in unsafe_groups(model, SHAPE, 0.1, 1)}
    table = without_groups(macs_table(model, SHAPE), skipped)
    assert table.names == SAFE
    ratios = project_to_budget(table, [1.0] * len(table.names), 0.5, round_to=1, min_ratio=0.1)
    full = model_stats(model, SHAPE).macs
    batches = [torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kept = prune_channels_(model, SHAPE, dict(zip(table.names, ratios, strict=True)), round_to=1, criterion=criterion,
                           **({"batches": batches} if criterion == "lasso" else {}))
    assert kept["stem.0"] == 16 and kept["block1.branch.0"] == 8  # the unsafe groups keep every channel
    assert kept["expand.0"] < 32 and kept["mid.0"] < 32
    assert model_stats(model, SHAPE).macs / full == pytest.approx(0.5, abs=0.03)
    assert model.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)
    assert export_onnx(model, SHAPE, tmp_path / "pruned.onnx").exists()


def test_a_group_that_breaks_the_model_when_run_is_found_by_running_it():
    skipped = unsafe_groups(ScaledNet(), SHAPE, 0.1, 1)
    assert [group.name for group in skipped] == ["first"]  # "second" (into the classifier) is fine
    assert "fails to run" in skipped[0].reason and "RuntimeError" in skipped[0].reason


def test_a_safe_model_has_no_unsafe_group():
    from tests.tiny import tiny_resnet20

    assert unsafe_groups(tiny_resnet20(), (1, 16, 16), 0.1, 8) == ()


# --------------------------------------------------------------------------------------------------------------
# The bound on the dependency analysis


def test_an_analysis_past_its_time_is_refused_in_one_line():
    lines = []
    started = time.monotonic()
    with pytest.raises(ModelError) as error:
        trace_groups(Slow(seconds=30.0), SHAPE, AnalysisLimits(seconds=0.5, progress_seconds=0.2, log=lines.append))
    assert time.monotonic() - started < 5.0  # stopped, not waited out
    message = str(error.value)
    assert "\n" not in message and "took more than 0.5 s" in message and "tracing the forward pass" in message
    assert "weight_sparsification" in message  # what to do instead
    assert lines and all(line.startswith("channel dependency analysis: ") for line in lines)
    time.sleep(0.2)  # nothing left pending for this thread after the refusal
    assert prunable_groups(Slow(seconds=0.0), SHAPE)  # and the next analysis runs as usual


def test_an_analysis_past_its_memory_is_refused_in_one_line():
    limit = 64 << 20
    with pytest.raises(ModelError, match=r"needed more than 0\.1 GB") as error:
        trace_groups(Hungry(limit_bytes=2 << 30), SHAPE, AnalysisLimits(memory_bytes=limit))
    assert "\n" not in str(error.value)


def test_a_tiny_deadline_stops_the_grouping_of_a_real_model():
    from tests.tiny import tiny_resnet20

    with pytest.raises(ModelError, match="took more than"):
        trace_groups(tiny_resnet20(), (1, 16, 16), AnalysisLimits(seconds=1e-3))
