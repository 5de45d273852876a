"""Two gloo ranks on the CPU (torch.distributed and torch.multiprocessing, no Ray): what DDP training must get
right whatever the device: a NaN on one rank ends both ranks together, evaluation counts each example once, the
ranks' compressed models are checked to match, and two ranks training together end with the same parameters."""

from __future__ import annotations

import math
import queue
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from pf_ray.config import TrainConfig
from pf_ray.metrics import ACCURACY, LOSS

WORLD = 2
TIMEOUT_S = 90  # far above a normal run (a few seconds); a hang in a collective would run past it


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _train_set(nan: bool) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 2, 2, generator=generator)
    if nan:
        images[:] = float("nan")
    return TensorDataset(images, torch.randint(0, 3, (16,), generator=generator))


def _eval_set() -> TensorDataset:
    """7 examples (odd: DistributedSampler would pad one for 2 ranks) whose predictions are known: the model is
    the identity on 3 inputs, so the prediction is the argmax of the input; 3 of the 7 labels agree."""
    inputs = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2, 0])] * 2.0
    labels = torch.tensor([0, 1, 2, 1, 2, 0, 1])
    return TensorDataset(inputs, labels)


def _identity() -> nn.Module:
    layer = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
    return layer


def _scenario(rank: int, scenario: str) -> object:
    from pf_ray.devices import check_same_structure, structure_digest
    from pf_ray.train import evaluate, fit

    if scenario == "nan":  # rank 1's data is all NaN: its loss is NaN from the first step
        model = nn.parallel.DistributedDataParallel(_tiny_model())
        fit(model, _train_set(nan=rank == 1), TrainConfig(epochs=2, batch_size=4, learning_rate=0.01),
            distributed=True)
        return "finished"
    if scenario == "evaluate":
        plain = evaluate(_identity(), _eval_set(), batch_size=2, distributed=True)
        # DDP-wrapped, in batches of 3: rank 0 runs 2 batches (4 examples), rank 1 one (3); an eval forward under
        # no-grad holds no collective, so the ranks need not take as many batches
        wrapped = evaluate(nn.parallel.DistributedDataParallel(_identity()), _eval_set(), batch_size=3,
                           distributed=True)
        if wrapped[ACCURACY] != plain[ACCURACY] or not math.isclose(wrapped[LOSS], plain[LOSS], rel_tol=1e-6):
            raise AssertionError(f"DDP-wrapped {wrapped} != plain {plain}")
        return plain
    if scenario == "structure":  # rank 1 pruned one channel more
        model = nn.Sequential(nn.Linear(4, 3 if rank == 0 else 2))
        check_same_structure(model, "cpu")
        return "no error"
    if scenario == "same_structure":
        check_same_structure(_tiny_model(), "cpu")
        return structure_digest(_tiny_model())
    if scenario == "fit":  # two ranks on different shards: DDP keeps their parameters equal
        model = nn.parallel.DistributedDataParallel(_tiny_model())
        history: list[dict] = []
        fit(model, _train_set(nan=False), TrainConfig(epochs=2, batch_size=4, learning_rate=0.05),
            validation_set=_train_set(nan=False), distributed=True, report=history.append)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        return {"parameters": flat.tolist(), "history": [{k: v for k, v in h.items() if k != "epoch_seconds"}
                                                         for h in history]}
    raise ValueError(scenario)


SCENARIOS = ("nan", "evaluate", "structure", "same_structure", "fit")


def _rank_main(rank: int, store: str, results: mp.Queue) -> None:
    """Every scenario in turn on one process group (each ends with all ranks at the same point, errors included);
    puts (rank, scenario, outcome, value or message) for each."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        for scenario in SCENARIOS:
            try:
                results.put((rank, scenario, "ok", _scenario(rank, scenario)))
            except Exception as error:  # noqa: BLE001 -- the tests assert on the type and message
                results.put((rank, scenario, type(error).__name__, str(error)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict[int, tuple[str, object]]]:
    """scenario -> rank -> (outcome, value or message), from one run of 2 gloo ranks (spawning them costs more
    than the scenarios). Fails on a hang."""
    context = mp.get_context("spawn")
    results = context.Queue()
    store = str(tmp_path_factory.mktemp("gloo") / "store")
    processes = [context.Process(target=_rank_main, args=(rank, store, results)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    found: dict[str, dict[int, tuple[str, object]]] = {scenario: {} for scenario in SCENARIOS}
    try:
        for _ in range(WORLD * len(SCENARIOS)):
            rank, scenario, outcome, value = results.get(timeout=TIMEOUT_S)
            found[scenario][rank] = (outcome, value)
    except queue.Empty:
        pytest.fail(f"not every rank finished within {TIMEOUT_S} s (a hang): {found}")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return found


def test_a_nan_on_one_rank_ends_every_rank_together(outcomes):
    outcomes = outcomes["nan"]
    assert {rank: outcome for rank, (outcome, _) in outcomes.items()} == {0: "FloatingPointError",
                                                                          1: "FloatingPointError"}
    assert outcomes[1][1] == "training diverged: loss is nan at epoch 1, step 0; lower the learning rate"
    assert outcomes[0][1] == ("training diverged: loss is not finite on another rank at epoch 1, step 0; lower "
                              "the learning rate")


def test_distributed_evaluation_counts_each_example_once(outcomes):
    outcomes = outcomes["evaluate"]
    logits = _identity()(_eval_set().tensors[0])
    exact_loss = nn.functional.cross_entropy(logits, _eval_set().tensors[1]).item()
    for outcome, metrics in outcomes.values():
        assert outcome == "ok", metrics
        assert metrics[ACCURACY] == 3 / 7  # padded to 8, it would be 3/8 or 4/8
        assert math.isclose(metrics[LOSS], exact_loss, rel_tol=1e-6)  # float32 batch sums


def test_ranks_whose_compressed_models_differ_all_raise(outcomes):
    outcomes = outcomes["structure"]
    for rank, (outcome, message) in outcomes.items():
        assert outcome == "RuntimeError", message
        assert f"the compressed model differs between DDP ranks (rank {rank}" in message


def test_ranks_with_the_same_structure_pass_the_check(outcomes):
    outcomes = outcomes["same_structure"]
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == "ok"


def test_two_ranks_training_together_end_with_equal_parameters_and_metrics(outcomes):
    outcomes = outcomes["fit"]
    (outcome0, result0), (outcome1, result1) = outcomes[0], outcomes[1]
    assert outcome0 == outcome1 == "ok", (result0, result1)
    assert result0["parameters"] == result1["parameters"]
    assert result0["parameters"] != torch.cat([p.flatten() for p in _tiny_model().parameters()]).tolist()
    assert result0["history"] == result1["history"] and len(result0["history"]) == 2
