"""Where latency steps: the channel multiple worth rounding kept counts to on a target (``round_to: auto``).

From in-context sweeps (the whole model, one group at every count of a window): a count is *efficient* when no
larger count of the same sweep runs at most as long (within ``tolerance``, the timing noise): keeping fewer
channels there buys no speed. Where the runtime works in channel blocks, only the block's multiples are efficient
(ONNX Runtime FP32 on AVX-512 measured flat from 1 to 16 channels of a ResNet-20 layer3 group, then a step to 17;
INT8 cheapest at multiples of 4). A sweep's step is the largest multiple b (of ``CHOICES``) that at least ``share``
of its efficient counts are multiples of: rounding to b then loses (almost) no efficient count, and a coarser b
would. The target's step is the median of the sweeps' steps (the lower one of two middle values).

Sweeps that do not step carry no evidence about the kernels' channel block and are left out: a *flat* one (only
its top count efficient: that group's channels cost nothing measurable) and a *smooth* one (more than
``smooth_share`` of its counts efficient: latency follows the count one channel at a time, as on ResNet-20's
16-channel residual stream at 28x28 in FP32, where element-wise work on the activations dominates). With no
evidence at all the step is 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CHOICES = (1, 2, 4, 8, 16, 32)


def efficient_counts(sweep: Mapping[int, float], tolerance: float) -> list[int]:
    """The counts of a sweep (count -> ms) that no larger count beats or matches within ``tolerance``."""
    counts = sorted(sweep)
    efficient = []
    fastest_above = float("inf")  # the fastest time among the counts above the current one
    for count in reversed(counts):
        if fastest_above > sweep[count] * (1 + tolerance):
            efficient.append(count)
        fastest_above = min(fastest_above, sweep[count])
    return sorted(efficient)


def step_from_sweeps(sweeps: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], *,
                     tolerance: float = 0.01, share: float = 0.8, smooth_share: float = 0.6,
                     choices: Sequence[int] = CHOICES) -> tuple[int, dict[str, Any]]:
    """The step (see the module's doc) and the evidence: per sweep its efficient counts, its shape and its step.
    Each sweep's top count (the group's full size) is left out of the vote: the unpruned size is kept whatever its
    multiple."""
    evidence: dict[str, Any] = {"tolerance": tolerance, "share": share, "smooth_share": smooth_share, "sweeps": {}}
    steps = []
    for name, sweep in sweeps.items():
        efficient = efficient_counts(sweep, tolerance)
        below = [count for count in efficient if count != sizes[name]]
        shape = "flat" if not below else "smooth" if len(efficient) > smooth_share * len(sweep) else "steps"
        record: dict[str, Any] = {"counts": [min(sweep), max(sweep)], "efficient": efficient, "shape": shape}
        if shape == "steps":
            record["step"] = max(b for b in choices if b <= sizes[name] and
                                 sum(count % b == 0 for count in below) >= share * len(below))
            steps.append(record["step"])
        evidence["sweeps"][name] = record
    step = sorted(steps)[(len(steps) - 1) // 2] if steps else 1
    evidence["rule"] = (f"median of the steps of the sweeps that step ({sorted(steps) or 'none'}); a sweep's step: "
                        f"the largest b with >= {share:.0%} of its efficient counts (no larger count within "
                        f"{tolerance:.1%} as fast) multiples of b")
    return step, evidence
