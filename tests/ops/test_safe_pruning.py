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
from tests.user_graphs import GROUPED, PLAIN, SHAPE, SHUFFLED, Hungry, ScaledNet, Slow, shuffle_user_net


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
    skipped = unsafe_groups(model, SHAPE, 0.1, 1, log=lines.append)  # round_to 1: grouped convs cannot stay even
    assert tuple(group.name for group in skipped) == SHUFFLED + GROUPED
    reasons = dict((group.name, group.reason) for group in skipped)
    assert "channel shuffle" in reasons["stem.0"] and "reshape across the channel axis" in reasons["stem.0"]
    assert "grouped convolution 'block1.branch.0' (groups=2)" in reasons["block1.branch.0"]
    assert "multiple of 2 (round_to is 1)" in reasons["block1.branch.0"]
    assert len(lines) == 3 and all("left unpruned" in line for line in lines)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())  # not modified
    assert [group.name for group in unsafe_groups(model, SHAPE, 0.1, 2)] == list(SHUFFLED)  # even counts: fine


@pytest.mark.parametrize("criterion", ["l1", "lasso"])
def test_a_shuffle_graph_is_pruned_toward_half_its_macs_where_it_is_safe(tmp_path, criterion):
    model = shuffle_user_net()
    skipped = {group.name for group in unsafe_groups(model, SHAPE, 0.1, 2)}
    table = without_groups(macs_table(model, SHAPE), skipped)
    assert table.names == GROUPED + PLAIN
    ratios = [0.5] * len(table.names)
    assert project_to_budget(table, ratios, 0.5, round_to=2, min_ratio=0.1) != ratios  # 0.5 everywhere is under it
    full = model_stats(model, SHAPE).macs
    batches = [torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kept = prune_channels_(model, SHAPE, dict(zip(table.names, ratios, strict=True)), round_to=2, criterion=criterion,
                           **({"batches": batches} if criterion == "lasso" else {}))
    assert kept["stem.0"] == 16  # the unsafe group keeps every channel
    assert kept["block1.branch.0"] < 8 and kept["expand.0"] < 32 and kept["mid.0"] < 32
    assert model.block1.branch[0].groups == 2 and model.block1.branch[0].out_channels == kept["block1.branch.0"]
    assert model_stats(model, SHAPE).macs == table.macs(ratios, 2) < 0.5 * full  # the analytic MACs are the real ones
    assert model.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)
    assert export_onnx(model, SHAPE, tmp_path / "pruned.onnx").exists()


def test_a_grouped_convolution_keeps_the_same_count_in_each_group_and_its_kept_filters_unchanged():
    torch.manual_seed(0)
    grouped = torch.nn.Conv2d(8, 8, 1, groups=2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), grouped, torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10))
    with torch.no_grad():  # the four largest filters all in the first group: L1 alone would keep 0..3
        grouped.weight.mul_(torch.tensor([4.0, 3, 2, 5, 0.1, 0.2, 0.3, 0.4]).view(8, 1, 1, 1))
    inputs = torch.randn(2, *SHAPE)
    features = model[0](inputs)
    reference = grouped(features)
    prune_channels_(model, SHAPE, {"1": 0.5}, round_to=2)
    # per group the two largest: 0 and 3 in the first, 6 and 7 in the second
    assert grouped.out_channels == 4 and grouped.groups == 2
    assert torch.allclose(grouped(features), reference[:, [0, 3, 6, 7]], atol=1e-6)


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


def test_torchvision_shufflenet_is_analysed_and_its_shuffled_groups_left_unpruned():
    import torchvision

    # torch-pruning 1.6 divides by zero mapping the channel shuffle's reshape (and fails grouping some layers after
    # it): those reshapes keep the identity mapping, and the groups through them are marked as problems
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    groups = prunable_groups(model, (3, 32, 32))
    problems = [group for group in groups if group.problem]
    assert 0 < len(problems) < len(groups)
    assert all("channel shuffle" in group.problem for group in problems)
    assert "stage2.0.branch2.0" in {group.name for group in groups if not group.problem}  # inside a branch: safe
