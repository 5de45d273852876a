"""Import rules: pf_ray imports without Ray; torch-pruning stays in ops/channel_groups.py; trainables and
search_algs do not import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.import_graph import cycles, import_graph, path_within

ROOT = Path(__file__).resolve().parents[1]

BLOCK_RAY = """
import importlib.abc, sys
class BlockRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, BlockRay())
import pkgutil, importlib, pf_ray
names = [m.name for m in pkgutil.walk_packages(pf_ray.__path__, "pf_ray.")]
for name in names:
    importlib.import_module(name)
assert "ray" not in sys.modules
print(len(names))
"""


def test_every_pf_ray_module_imports_without_ray():
    result = subprocess.run([sys.executable, "-c", BLOCK_RAY], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 15  # every module was really imported


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_torch_pruning_is_imported_only_by_ops_channel_groups():
    users = [p.relative_to(ROOT).as_posix() for p in _python_files("pf_ray")
             if any(n.split(".")[0] == "torch_pruning" for n in _imported_modules(p))]
    assert users == ["pf_ray/ops/channel_groups.py"]


def test_trainables_and_search_algs_do_not_import_each_other():
    for folder, forbidden in (("trainables", "search_algs"), ("search_algs", "trainables")):
        for path in _python_files(folder):
            assert not any(n.split(".")[0] == forbidden for n in _imported_modules(path)), path


def test_ray_is_imported_in_pf_ray_only_under_launch():
    # The run side (pf_ray/launch/) wires Ray in, lazily; among its modules search_state.py reads and rewrites
    # Tune's saved search (ray.cloudpickle) and orphans.py removes the placement groups stopped Ray Train runs
    # leave behind (a Ray 2.60 workaround).
    users = [p.relative_to(ROOT).as_posix() for p in _python_files("pf_ray")
             if any(n.split(".")[0] == "ray" for n in _imported_modules(p))]
    assert users and all(user.startswith("pf_ray/launch/") for user in users), users


def test_trainables_never_import_the_run_side():
    # pf_ray.launch imports trainables (the Ray edge on the workers' side), never the other way round.
    for path in _python_files("trainables"):
        assert not any(n == "pf_ray.launch" or n.startswith("pf_ray.launch.") for n in _imported_modules(path)), path


def test_every_learner_has_a_trainable():
    import pf_ray.learners  # noqa: F401  (registration)
    from pf_ray.registry import LEARNERS
    from trainables import get_trainable

    for name in LEARNERS.names():
        assert callable(get_trainable(name)), name


def test_a_learner_without_a_trainable_is_a_config_error():
    from pf_ray.errors import ConfigError
    from trainables import get_trainable

    with pytest.raises(ConfigError, match="learner 'lasso' has no trainable: there is no trainables/lasso.py"):
        get_trainable("lasso")
    with pytest.raises(ConfigError, match="learner 'trial' has no trainable: trainables/trial.py defines no "
                                          r"function trial\(\)"):
        get_trainable("trial")


def test_no_import_cycle_in_the_project():
    """Imports run one way (every import counts, at module level or inside a function): config and search spaces
    below the learners, the learners below the candidate, trainables below launch."""
    graph = import_graph()
    assert {"pf_ray.candidate", "pf_ray.learners", "pf_ray.launch.pipeline", "trainables.trial"} <= set(graph)
    assert "pf_ray.learners.channel_pruning" in graph["pf_ray.learners"]  # discovered modules are edges too
    assert [path_within(graph, component) for component in cycles(graph)] == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert path_within(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_module_is_over_500_lines():
    long = {path.relative_to(ROOT).as_posix(): length for folder in ("pf_ray", "trainables", "search_algs")
            for path in _python_files(folder) if (length := len(path.read_text().splitlines())) > 500}
    assert long == {}
