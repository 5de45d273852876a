"""Every example experiment loads and validates (learner options included) with the current code."""

from __future__ import annotations

from pathlib import Path

import pytest

from pf_ray.config import load_experiment

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path):
    config = load_experiment(path)
    assert config.model.name and config.learner.name
