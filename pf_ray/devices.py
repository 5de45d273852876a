"""Where a trial trains, decided in one place, and the few collective checks that keep DDP ranks in step.

``training_device`` picks the device every stage of a trial uses (the learner's prepare, fine-tuning, the proxy
score, BatchNorm re-estimation); export, ONNX and latency copy the model to the CPU themselves. No Ray in here:
a Ray Train worker passes ``ray.train.torch.get_device()`` as ``assigned``.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from pf_ray.config import ResourcesConfig
from pf_ray.errors import ConfigError

BF16 = "bf16"


def training_device(resources: ResourcesConfig, *, assigned: torch.device | str | None = None) -> torch.device:
    """The device a trial's process trains on.

    Args:
        assigned: the device a launcher already chose for this process (Ray Train's ``get_device()``); taken as
            it is when ``use_gpu`` agrees with it.

    With ``resources.use_gpu`` the trial's process must see CUDA (Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU it
    reserved for the trial, so the first visible one is the trial's); without it, the CPU, whatever is present.

    Raises:
        ConfigError: ``use_gpu`` is set but this process sees no CUDA device.
    """
    if assigned is not None:
        assigned = torch.device(assigned)
        if resources.use_gpu and assigned.type != "cuda":
            raise ConfigError(f"resources.use_gpu: true, but this worker was given device {str(assigned)!r}; "
                              f"CUDA available: {torch.cuda.is_available()}")
        return _check_precision(resources, assigned if resources.use_gpu else torch.device("cpu"))
    if not resources.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("resources.use_gpu: true, but this process sees no CUDA device (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}); run on a GPU node or set "
                          "resources.use_gpu to false")
    return _check_precision(resources, torch.device("cuda", torch.cuda.current_device()))


def _check_precision(resources: ResourcesConfig, device: torch.device) -> torch.device:
    """``device``, once it is known to compute ``resources.precision`` (bf16 needs Ampere or later on CUDA; a
    cluster's GPUs are only known here, in the trial, so preflight cannot always refuse it)."""
    if resources.precision == BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"resources.precision: got 'bf16', but {torch.cuda.get_device_name(device)} has no bf16; "
                          "set resources.precision to fp32")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def prepare_for_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` moved to ``device`` (in place), with the CUDA speed settings there: cudnn's autotuner and
    channels-last memory (a layout, not a numerical change). On the CPU: only the move."""
    device = torch.device(device)
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution once
        model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's arithmetic: bf16 autocast for ``precision`` "bf16", else nothing. Fake quantization
    computes in fp32 whatever it is given (``ops.quantize.fake_quantize``); codebook values and quantizer ranges
    are fp32 tensors, which autocast leaves alone outside matrix products and convolutions."""
    device = torch.device(device)
    if precision != BF16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def precision_for(model: nn.Module, precision: str) -> str:
    """``precision``, or "fp32" for a model that cannot run under autocast: a captured graph (native_int8's pt2e
    QAT graph, whose torchao fake quantizers take fp32 only; autocast would hand them bf16)."""
    if precision == BF16 and any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):
        return "fp32"
    return precision


# --- collective checks (torch.distributed, any backend) ---------------------------------------------------------


def distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def structure_digest(model: nn.Module) -> int:
    """A 60-bit digest of what must match on every DDP rank after compression: each state-dict entry's name,
    shape and dtype, and the values of its integer and boolean ones (pruning masks, kept-channel indices,
    quantizer codes). Floating-point values are left out: DDP broadcasts rank 0's at wrap time."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if not (tensor.is_floating_point() or tensor.is_complex()):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 4


def check_same_structure(model: nn.Module, device: torch.device | str) -> None:
    """Raise on every rank, together, when the compressed models differ in structure between ranks (a pruning
    whose channel choice depends on the rank's hardware), instead of a DDP start-up failure or hang."""
    if not distributed_ready():
        return
    digest = structure_digest(model)
    mine = torch.tensor([digest >> 30, digest & (2**30 - 1)], dtype=torch.int64, device=device)
    low, high = mine.clone(), mine.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        rank = torch.distributed.get_rank()
        raise RuntimeError(f"the compressed model differs between DDP ranks (rank {rank}: structure digest "
                           f"{digest:#x}); the learner's channel or code choice is not deterministic across ranks. "
                           f"Run it with one worker, or make its selection deterministic")
