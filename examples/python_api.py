"""pf-ray from Python: load an experiment, change it, run it, read the results.

    python examples/python_api.py
"""

from __future__ import annotations

from pathlib import Path

from pf_ray.config import load_experiment
from pf_ray.launch import compress

HERE = Path(__file__).resolve().parent

config = load_experiment(HERE / "digits_quick.yaml", ["search.num_trials=4", "storage.path=runs/examples"])
results = compress(config)
best = results["search"]["best"]
print(f"chosen keep ratios: {best['layer_values']}")
for artifact in results["artifacts"]:
    print(f"{artifact['model']:>10} {artifact['format']:>9}: accuracy {artifact['test_accuracy']:.4f}, "
          f"{artifact['size_bytes'] / 1024:.0f} KiB")
