"""Strict config loading: unknown keys, wrong types, ranges, enums, YAML errors and --set overrides."""

from __future__ import annotations

import pytest
import yaml

from pf_ray.config import ExperimentConfig, SearchAlgorithm, TrainConfig, apply_overrides, load_experiment
from pf_ray.errors import ConfigError
from pf_ray.spec import RunSpec, load_spec
from pf_ray.strict import from_dict, to_dict


def test_defaults_round_trip_through_dicts():
    config = ExperimentConfig()
    assert from_dict(ExperimentConfig, to_dict(config)) == config


def test_strings_become_enums_and_lists_become_tuples():
    config = from_dict(ExperimentConfig, {"search": {"algorithm": "random"},
                                          "export": {"latency_batch_sizes": [1, 32]}})
    assert config.search.algorithm is SearchAlgorithm.RANDOM
    assert config.export.latency_batch_sizes == (1, 32)


def test_ints_are_accepted_where_floats_are_expected():
    assert from_dict(TrainConfig, {"learning_rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"serch": {}}, "unknown field serch; valid fields of ExperimentConfig: model, dataset"),
        ({"search": {"num_trails": 3}}, "unknown field search.num_trails"),
        ({"search": {"num_trials": "many"}}, "search.num_trials: got 'many' (str); expected an integer"),
        ({"search": {"num_trials": True}}, "search.num_trials: got True (bool); expected an integer"),
        ({"search": {"num_trials": 0}}, "search.num_trials: got 0; allowed range is [1, inf]"),
        ({"search": {"target_macs_ratio": 1.5}}, "search.target_macs_ratio: got 1.5; allowed range is (0, 1]"),
        ({"search": {"algorithm": "grid"}}, "search.algorithm: got 'grid'; allowed: random, tpe, gp, ddpg"),
        ({"search": {"fine_tune": {"learning_rate": -1}}},
         "search.fine_tune.learning_rate: got -1.0; allowed range is (0, 10]"),
        ({"dataset": {"validation_fraction": 0.9}}, "dataset.validation_fraction: got 0.9"),
        ({"export": {"formats": ["onnx", "tflite"]}},
         "export.formats: got 'tflite'; allowed: onnx, onnx_int8, ort, ort_int8"),
        ({"export": {"latency_batch_sizes": 1}}, "export.latency_batch_sizes: got 1 (int); expected a list"),
        ({"model": "resnet20"}, "model: got 'resnet20' (str); expected a mapping of fields"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(data, expected):
    with pytest.raises(ConfigError) as error:
        from_dict(ExperimentConfig, data)
    assert expected in str(error.value)


def test_overrides_parse_values_as_yaml_and_create_sections():
    data = apply_overrides({"search": {"num_trials": 4}}, ["search.num_trials=16", "model.name=resnet32",
                                                           "export.latency_batch_sizes=[1, 8]"])
    assert data == {"search": {"num_trials": 16}, "model": {"name": "resnet32"},
                    "export": {"latency_batch_sizes": [1, 8]}}


@pytest.mark.parametrize("override", ["search.num_trials", "=3"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, [override])


def test_yaml_errors_give_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("search:\n  num_trials: [1, 2\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_experiment(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_experiment(path)


def test_learner_options_are_validated_by_the_learners_own_config(tmp_path):
    with pytest.raises(ConfigError, match="unknown learner 'prune_everything'; known: channel_pruning, discrim"):
        load_spec(None, ["learner.name=prune_everything"])
    with pytest.raises(ConfigError, match="learner.options.keep_ratio"):
        load_spec(None, ["learner.options.keep_ratio=1.5"])
    with pytest.raises(ConfigError, match="unknown field learner.options.keep"):
        load_spec(None, ["learner.options.keep=0.5"])


def test_a_run_spec_round_trips_through_a_plain_dict():
    spec = load_spec(None, ["learner.options.mode=list", "learner.options.layer_keep_ratios=[0.5, 0.25]"])
    assert spec.learner_config.layer_keep_ratios == (0.5, 0.25)
    assert RunSpec.from_dict(spec.to_dict()) == spec
    assert RunSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="unknown field learner_config.keep"):
        RunSpec.from_dict({**spec.to_dict(), "learner_config": {"keep": 1}})
