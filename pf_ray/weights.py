"""A user's own weights: a plain state dict file (``torch.save(model.state_dict())``, a torchvision weights file)
loaded into the model pf-ray builds for the dataset.

The file is read with ``torch.load(weights_only=True)``: no pickled code runs. The model is built for the
dataset's channels and classes; where the file was saved for other ones, the classifier head (the last
convolution or linear layer the forward runs) keeps its fresh initialisation, and the first one (the stem) is
summed over its input channels for grayscale data (RGB weights) or re-initialised otherwise. Every other tensor
must match by name and shape.
"""

from __future__ import annotations

import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pf_ray.errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model_state_dict")  # {"state_dict": {...}} as Lightning and many scripts save it
DDP_PREFIX = "module."  # keys of a model saved from inside DistributedDataParallel


@dataclass(frozen=True)
class LoadedWeights:
    """What loading changed: one line per tensor not taken as stored (empty: every tensor was)."""

    changes: tuple[str, ...]

    @property
    def reinitialised(self) -> bool:
        """True when some tensor kept its fresh initialisation: the model needs training before it is a baseline."""
        return any("re-initialised" in change for change in self.changes)


def read_weights_file(path: str | Path, *, field: str = "baseline.checkpoint") -> Any:
    """The file's contents, loaded with ``weights_only=True`` (a pf-ray checkpoint or a plain state dict).

    Raises:
        CheckpointError: missing, unreadable, or a whole pickled model (named with the state-dict way).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a corrupt or foreign file
        modules = _pickled_modules(path)
        if modules:
            raise CheckpointError(
                f"{field}: {str(path)!r} is a whole pickled model (a {modules[0]}), which only unpickling code "
                f"could load; pf-ray loads weights only: save them with torch.save(model.state_dict(), path) "
                f"and name the model in model.name") from None
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}): "
                              f"not a pf-ray checkpoint or corrupt") from None


def _pickled_modules(path: Path) -> list[str]:
    """The classes a torch.save'd file would unpickle (read from its opcodes, never run), outermost first, when
    they include a ``torch.nn`` module or a torchvision model; otherwise (not a model) []."""
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with zipfile.ZipFile(path) as archive:
            pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            opcodes = list(pickletools.genops(archive.read(pickled)))
    except Exception:  # not a torch.save zip file at all
        return []
    if not any(name.startswith(("torch.nn.modules.", "torchvision.models.")) for name in unsafe):
        return []  # other globals (builtins.open, ...): not a model, just unsafe
    ordered = [" ".join(str(argument).split()).replace(" ", ".") for opcode, argument, _ in opcodes
               if opcode.name == "GLOBAL"]  # "module name" -> "module.name", in the order they are read
    return list(dict.fromkeys(name for name in ordered if name in unsafe)) or sorted(unsafe)


def plain_state_dict(payload: Any, path: str | Path, *, field: str = "baseline.checkpoint") -> dict[str, torch.Tensor]:
    """``payload`` as a state dict: name -> tensor, unwrapped from ``{"state_dict": ...}`` and a DDP prefix."""
    if isinstance(payload, dict):
        for key in WRAPPER_KEYS:
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        what = f"a {type(payload).__name__}" if not isinstance(payload, dict) else \
            "an empty dict" if not payload else "a dict whose values are not all tensors"
        raise CheckpointError(f"{field}: {str(path)!r} holds {what}; expected a pf-ray checkpoint or a state dict "
                              f"(torch.save(model.state_dict(), path))")
    if all(key.startswith(DDP_PREFIX) for key in payload):
        payload = {key[len(DDP_PREFIX):]: value for key, value in payload.items()}
    return dict(payload)


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], input_shape: tuple[int, int, int],
                         *, model_name: str, path: str | Path, field: str = "baseline.checkpoint") -> LoadedWeights:
    """Load ``state_dict`` into ``model`` (built for ``input_shape`` and its classes), adapting head and stem.

    Raises:
        CheckpointError: a tensor the model has is missing, one it has not is present, or a shape differs
            outside the head and the stem; the first such key is named, with both shapes.
    """
    stem, head = _stem_and_head(model, input_shape)
    own = model.state_dict()
    where = f"{field}: {str(path)!r} is not a state dict of model {model_name!r}"
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"{where}: it has no tensor {missing[0]!r} (shape {_shape(own[missing[0]])})"
                              + (f" nor {len(missing) - 1} other(s) the model has" if len(missing) > 1 else ""))
    unexpected = [k for k in state_dict if k not in own]
    if unexpected:
        raise CheckpointError(f"{where}: it has a tensor {unexpected[0]!r} (shape {_shape(state_dict[unexpected[0]])})"
                              f" the model has not" + (f", and {len(unexpected) - 1} more" if len(unexpected) > 1
                                                       else ""))
    adapted, changes = {}, []
    for key, mine in own.items():
        if key not in state_dict:
            continue
        theirs = state_dict[key]
        if theirs.shape == mine.shape:
            adapted[key] = theirs.to(mine.dtype)
            continue
        module, _, tensor = key.rpartition(".")
        if module == head and _differ_only_in(theirs, mine, dim=0):
            changes.append(f"{key}: {_shape(theirs)} in the file -> {_shape(mine)} re-initialised "
                           f"(classifier head, {mine.shape[0]} classes)")
        elif module == stem and tensor == "weight" and _differ_only_in(theirs, mine, dim=1):
            if mine.shape[1] == 1:  # RGB weights on grayscale data: their sum sees the same luminance
                adapted[key] = theirs.sum(dim=1, keepdim=True).to(mine.dtype)
                changes.append(f"{key}: {_shape(theirs)} in the file -> {_shape(mine)} summed over its "
                               f"{theirs.shape[1]} input channels (first layer, {mine.shape[1]}-channel input)")
            else:
                changes.append(f"{key}: {_shape(theirs)} in the file -> {_shape(mine)} re-initialised "
                               f"(first layer, {mine.shape[1]}-channel input)")
        else:
            raise CheckpointError(f"{where}: tensor {key!r} has shape {_shape(theirs)} in the file and "
                                  f"{_shape(mine)} in the model")
    own.update(adapted)
    model.load_state_dict(own)
    return LoadedWeights(tuple(changes))


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _differ_only_in(a: torch.Tensor, b: torch.Tensor, *, dim: int) -> bool:
    if a.dim() != b.dim() or a.dim() <= dim:
        return False
    return all(x == y for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if i != dim)


def _stem_and_head(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[str | None, str | None]:
    """The names of the first and last convolution or linear layers a forward runs (None if there are none)."""
    names = {module: name for name, module in model.named_modules()}
    order: list[str] = []
    hooks = [module.register_forward_hook(lambda m, i, o: order.append(names[m]))
             for module in model.modules() if isinstance(module, nn.Conv2d | nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return (order[0], order[-1]) if order else (None, None)
