"""The emulated aarch64 CPUs pf-ray verifies on (``pf_ray.aarch64``), in a module of their own: the config checks
names against them without importing the runner."""

from __future__ import annotations

import enum


class CpuModel(enum.StrEnum):
    """The emulated CPUs offered: each selects different integer kernels in ONNX Runtime (MLAS) and XNNPACK."""

    CORTEX_A53 = "cortex-a53"  # Armv8.0-A: NEON only, no dot product (cheap boards, older phones)
    CORTEX_A72 = "cortex-a72"  # Armv8.0-A: NEON only (Raspberry Pi 4)
    CORTEX_A76 = "cortex-a76"  # Armv8.2-A: SDOT/UDOT dot product (Raspberry Pi 5, phones' big cores)
    NEOVERSE_N1 = "neoverse-n1"  # Armv8.2-A: dot product (AWS Graviton2, Ampere Altra)
    CORTEX_A710 = "cortex-a710"  # Armv9.0-A: dot product, I8MM (SMMLA), SVE2
