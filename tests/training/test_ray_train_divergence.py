"""A diverging Ray Train run (2 workers, gloo) ends once with the divergence, not with Ray Train's retries of a
deterministic failure: the ranks stop together, rank 0 records why, the worker group ends normally, and
``ray_train_fit`` raises the FloatingPointError in its caller."""

from __future__ import annotations

import pytest
import torch

from pf_ray.checkpoint import save_checkpoint
from pf_ray.config import ExperimentConfig
from pf_ray.data import load_data
from pf_ray.models import build_model
from pf_ray.spec import RunSpec
from pf_ray.strict import from_dict

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # 17 s; the gloo NaN test (test_distributed.py) is in the default run

TINY = {
    "model": {"name": "resnet20"},
    "dataset": {"name": "synthetic"},
    "learner": {"name": "weight_sparsification", "options": {"mode": "uniform", "sparsity": 0.5}},
    "search": {"validation_subset": 32,
               "fine_tune": {"epochs": 2, "batch_size": 32, "learning_rate": 0.01, "train_subset": 64}},
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
}


def test_a_diverging_two_worker_run_ends_once_with_the_reason(ray_session, tmp_path):
    from trainables.train_loop import DIVERGED_FILE, TrainJob, _read_diverged, ray_train_fit

    config = from_dict(ExperimentConfig, TINY)
    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight.mul_(1e37)  # logits overflow within a step or two, on every rank
    baseline = save_checkpoint(tmp_path / "poisoned.pt", model, model_config=config.model,
                               input_shape=data.input_shape, num_classes=data.num_classes)
    job = TrainJob(RunSpec.resolve(config), config.search.fine_tune, 32, num_workers=2, cpus_per_worker=1,
                   name="diverging", storage_path=str(tmp_path / "runs"), measure=False)
    with pytest.raises(FloatingPointError, match=r"^training diverged: loss is (nan|inf|-inf) at epoch \d, step \d; "):
        ray_train_fit(job, str(baseline))
    assert (tmp_path / "runs" / "diverging" / DIVERGED_FILE).is_file()
    assert _read_diverged(None, str(tmp_path / "nowhere")) is None
