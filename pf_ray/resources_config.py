"""The experiment's ``resources`` section: where Ray runs and what a run asks it for (CPUs, GPUs, precision).

``pf_ray.launch.resources`` maps it to Ray's requests and refuses the impossible ones; docs/design.md, "Resources
and GPUs", has the table. Kept apart from ``pf_ray.config`` (which re-exports it) for that module's length.
"""

from __future__ import annotations

from dataclasses import dataclass

from pf_ray.errors import ConfigError
from pf_ray.strict import check_choice, check_range

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ResourcesConfig:
    ray_address: str | None = None  # None = start a local Ray on 127.0.0.1
    num_cpus: int | None = None  # local Ray only; None = all cores
    # local Ray only; None = the GPUs CUDA sees here. A number is what Ray schedules with: 0 hides the GPUs; more
    # than there are fakes some where CUDA_VISIBLE_DEVICES is unset (placement tests on a CPU-only machine).
    num_gpus: int | None = None
    cpus_per_trial: int = 1  # the trial's own process (and torch threads when it trains in-process)
    workers_per_trial: int = 1  # >1: fine-tune with a Ray Train TorchTrainer (DDP) inside the trial
    cpus_per_worker: int = 1
    use_gpu: bool = False  # trials, the retrain and the baseline train on GPUs (Ray places them on GPU nodes)
    # GPUs one trial's own process holds when workers_per_trial is 1; a fraction (0.25) lets four trials share one
    # GPU. None = 1 with use_gpu, 0 without. Ray Train workers (workers_per_trial >= 2, the retrain) take 1 each.
    gpus_per_trial: float | None = None
    # Training arithmetic: "fp32", or "bf16" autocast for the model's forward (quantizer and codebook maths stay
    # fp32). bf16 needs a GPU with bf16 (Ampere or later) or a CPU; preflight refuses it on one without.
    precision: str = "fp32"
    # A custom resource every trial driver requests (a sliver of it), so drivers run only on the nodes that
    # offer it: the clusters/ YAMLs give it to the CPU head, never to preemptible GPU workers. None = anywhere.
    driver_resource: str | None = None

    def __post_init__(self) -> None:
        if self.driver_resource is not None and not self.driver_resource.replace("_", "").isalnum():
            raise ConfigError(f"resources.driver_resource: {self.driver_resource!r} is not a resource name "
                              f"(letters, digits and _)")
        if self.driver_resource and self.use_gpu and self.workers_per_trial == 1:
            # The trial would need its GPU and the driver resource on one node: the head has no GPU, so it would
            # wait for ever. Ray Train workers (workers_per_trial >= 2) take the GPUs on the worker nodes.
            raise ConfigError(f"resources.driver_resource: got {self.driver_resource!r} with use_gpu and "
                              f"workers_per_trial 1; a trial driver on the CPU head cannot train on a GPU "
                              f"itself: set workers_per_trial to 2 or more (Ray Train workers on the GPU nodes)")
        if self.gpus_per_trial is not None:
            check_range("resources.gpus_per_trial", self.gpus_per_trial, low=0.0, high=1.0)
            if self.gpus_per_trial > 0 and not self.use_gpu:
                raise ConfigError(f"resources.gpus_per_trial: got {self.gpus_per_trial:g} without use_gpu; set "
                                  f"resources.use_gpu to true as well (or leave gpus_per_trial unset)")
        check_choice("resources.precision", self.precision, PRECISIONS)
        if self.num_cpus is not None:
            check_range("resources.num_cpus", self.num_cpus, low=1)
        if self.num_gpus is not None:
            check_range("resources.num_gpus", self.num_gpus, low=0)
        check_range("resources.cpus_per_trial", self.cpus_per_trial, low=1)
        check_range("resources.workers_per_trial", self.workers_per_trial, low=1)
        check_range("resources.cpus_per_worker", self.cpus_per_worker, low=1)

    @property
    def trial_gpus(self) -> float:
        """GPUs one trial's own process reserves (workers_per_trial 1): gpus_per_trial, else 1 with use_gpu."""
        if not self.use_gpu:
            return 0.0
        return 1.0 if self.gpus_per_trial is None else float(self.gpus_per_trial)
