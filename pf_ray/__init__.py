"""pf-ray: automated model compression for PyTorch, searched and trained on Ray.

The library itself (this package) is pure PyTorch and imports without Ray; ``pf_ray.launch`` brings Ray in,
lazily, when a search runs.
"""

from __future__ import annotations

__version__ = "0.1.0"
