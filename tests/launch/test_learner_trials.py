"""Every compressing learner as a Ray Tune trainable under a searcher with ASHA, and distillation on Ray: a search
on the tiny model in which each candidate meets its learner's budget, and a distilled trial in its own process
and as a 2-worker Ray Train run."""

from __future__ import annotations

import pytest

from pf_ray.candidate import search_space
from pf_ray.config import ExperimentConfig
from pf_ray.data import load_data
from pf_ray.metrics import ACCURACY, EPOCH, LAYER_VALUES
from pf_ray.models import build_model
from pf_ray.spec import RunSpec
from pf_ray.strict import from_dict
from tests.launch.test_trials import TINY, _run_one_trial, baseline  # noqa: F401  (baseline: the module's fixture)

pytestmark = pytest.mark.ray

# learner -> (options, searcher); each searched learner's budget must hold for every candidate it scores.
LEARNERS = {
    "weight_sparsification": ({"sparsity": 0.8, "mask_update_steps": 1}, "random"),
    "nonuniform_quantization": ({"bits": 3}, "tpe"),
    "uniform_quantization": ({"mode": "auto", "weight_bits": 4, "activation_bits": 8}, "gp"),
}
# By default one learner runs the search on Ray: every learner's space and budget are the same object to the trial
# (tests/learners/ check each learner's space, budget and projection without Ray; channel pruning runs its
# search in tests/launch/test_compress.py, GP and TPE run under Tune in test_searchers_under_tune.py).
SLOW = {"nonuniform_quantization", "uniform_quantization"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in sorted(LEARNERS)])
def test_learner_search_with_asha_meets_its_budget(ray_session, baseline, tmp_path, name):  # noqa: F811
    from pf_ray.launch.search import run_search

    options, algorithm = LEARNERS[name]
    config = from_dict(ExperimentConfig, {**TINY, "learner": {"name": name, "options": options},
                                          "search": {**TINY["search"], "algorithm": algorithm, "num_trials": 3}})
    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    space = search_space(RunSpec.resolve(config), model, data.input_shape)
    trials = run_search(RunSpec.resolve(config), space, baseline, tmp_path, log=lambda line: None)
    assert len(trials) == 3 and all(t["error"] is None for t in trials)
    assert all(1 <= t[EPOCH] <= 2 and 0 <= t[ACCURACY] <= 1 for t in trials)
    for trial in trials:  # the projected per-layer values the trial trained with meet the budget
        assert len(trial[LAYER_VALUES]) == len(space.names)
        assert space.budget.cost(trial[LAYER_VALUES]) <= space.budget.target + 1e-6


def test_distillation_runs_in_a_trial(ray_session, baseline, tmp_path):  # noqa: F811
    # In Ray Train with 2 workers:
    # tests/launch/test_trials.py::test_two_worker_ray_train_trial_distils_reports_and_checkpoints
    config = from_dict(ExperimentConfig, {
        **TINY, "learner": {**TINY["learner"], "distillation": {"weight": 4.0, "temperature": 4.0}},
        "resources": {"cpus_per_trial": 1}})
    result = _run_one_trial(config, baseline, tmp_path)[0]
    assert result.error is None, result.error
    assert list(result.metrics_dataframe[EPOCH]) == [1, 2]
    # The reported loss is cross-entropy + 4 * CE(teacher at T=4, student at T=4). The second term is at least
    # the entropy of the teacher's softened prediction, and an untrained ResNet-20's logits divided by 4 are
    # nearly uniform over the 10 classes (entropy close to ln 10 = 2.30): the sum is above 4 * 2 = 8, where
    # cross-entropy alone on this tiny run stays near ln 10.
    assert min(result.metrics_dataframe["loss"]) > 8.0


def test_native_int8_runs_as_a_trainable_under_asha(ray_session, baseline, tmp_path):  # noqa: F811
    # native_int8 has nothing per layer to search (8 bits everywhere): `pf-ray compress` goes straight to the
    # retrain. Here its trainable runs as Tune trials under ASHA with Tune's own variant generator.
    from ray import tune

    from pf_ray.launch.cluster import trial_cost
    from pf_ray.metrics import SCORE
    from search_algs.schedulers import make_asha
    from trainables import get_trainable
    from trainables.trial import TrialSetup

    config = from_dict(ExperimentConfig, {**TINY, "learner": {"name": "native_int8", "options": {"method": "ptq"}}})
    trainable = tune.with_resources(
        tune.with_parameters(get_trainable("native_int8"), setup=TrialSetup(RunSpec.resolve(config), None,
                                                                              str(baseline))),
        trial_cost(config)[0])
    tuner = tune.Tuner(trainable, param_space={},
                       tune_config=tune.TuneConfig(scheduler=make_asha(max_epochs=2, grace_period=1,
                                                                       reduction_factor=2),
                                                   metric=SCORE, mode="max", num_samples=2),
                       run_config=tune.RunConfig(name="native_int8", storage_path=str(tmp_path), verbose=0))
    grid = tuner.fit()
    assert len(grid) == 2 and grid.num_errors == 0
    assert all(1 <= result.metrics[EPOCH] <= 2 and 0 <= result.metrics[ACCURACY] <= 1 for result in grid)
