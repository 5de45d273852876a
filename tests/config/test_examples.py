"""Every example experiment loads and resolves (learner options included) with the current code, and every
example the documentation names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pf_ray.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DOCS = [ROOT / "README.md", ROOT / "clusters" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "examples" / "python_api.py"]


def test_every_example_the_documentation_names_exists():
    named = {match for doc in DOCS for match in re.findall(r"examples/[\w.-]+\.(?:yaml|py)", doc.read_text())}
    assert named, "no document names an example"
    assert sorted(name for name in named if not (ROOT / name).is_file()) == []
    # and every example is documented somewhere (python_api.py loads digits_quick.yaml by its bare name)
    documented = named | {f"examples/{match}" for match in
                          re.findall(r'"([\w.-]+\.yaml)"', (ROOT / "examples" / "python_api.py").read_text())}
    assert sorted(f"examples/{path.name}" for path in EXAMPLES if f"examples/{path.name}" not in documented) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_resolves(path):
    spec = load_spec(path)
    assert spec.experiment.model.name and spec.learner_name == spec.experiment.learner.name
    assert type(spec.learner_config).__name__.endswith("Config")
