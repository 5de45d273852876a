"""Checkpoints: an architecture description plus a state dict, loaded with ``torch.load(weights_only=True)``.

A checkpoint never pickles code. It stores the model's config (registered name or user function), the input
shape and class count, the state dict and plain metadata. A pruned model is rebuilt as its unpruned
architecture whose layers are then resized to the shapes found in the state dict.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import CheckpointError, ConfigError, PfRayError
from pf_ray.files import atomic_path
from pf_ray.strict import from_dict, to_dict

FORMAT = "pf-ray-checkpoint/1"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    model: ModelConfig
    input_shape: tuple[int, int, int]
    num_classes: int
    metrics: dict[str, Any]
    extra: dict[str, Any]
    sha256: str
    removed_blocks: tuple[str, ...] = ()  # residual blocks removed from the model (depth pruning), by name


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    model_config: ModelConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temporary file + rename): a reader never sees half a checkpoint."""
    from pf_ray.ops.blocks import removed_blocks

    path = Path(path)
    payload = {
        "format": FORMAT,
        "removed_blocks": removed_blocks(model),
        "model": to_dict(model_config),
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def read_checkpoint(path: str | Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The checkpoint's description and state dict, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a corrupt or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}): "
                              f"not a pf-ray checkpoint or corrupt") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a pf-ray checkpoint (expected format {FORMAT})")
    try:
        info = CheckpointInfo(
            path=path,
            model=from_dict(ModelConfig, payload["model"], path="checkpoint.model"),
            input_shape=tuple(int(v) for v in payload["input_shape"]),  # type: ignore[arg-type]
            num_classes=int(payload["num_classes"]),
            metrics=dict(payload.get("metrics", {})),
            extra=dict(payload.get("extra", {})),
            sha256=sha256_of(path),
            removed_blocks=tuple(str(name) for name in payload.get("removed_blocks", ())),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has a malformed header: {error}") from None
    return info, payload["state_dict"]


def load_checkpoint(
    path: str | Path,
    *,
    expect_input_shape: tuple[int, int, int] | None = None,
    expect_num_classes: int | None = None,
    user_model: str | None = None,
) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model (pruned layers resized to the stored shapes) and load its weights.

    A checkpoint may name a user model (``file.py:function``): Python code that rebuilding it would run. That
    happens only when the caller names the same model in ``user_model`` (the user named it: ``model.name`` of
    the experiment, or ``--model`` of a command); a checkpoint alone never makes pf-ray import a file.
    """
    from pf_ray.models import build_model
    from pf_ray.models.user import is_user_model
    from pf_ray.ops.resize import resize_to_state_dict_

    info, state_dict = read_checkpoint(path)
    if is_user_model(info.model.name) and info.model.name != user_model:
        raise CheckpointError(
            f"checkpoint {str(path)!r} names the user model {info.model.name!r}, which pf-ray imports only when "
            f"you name it yourself (model.name in the experiment, or --model for export/verify)"
            + (f"; you named {user_model!r}" if user_model else ""))
    if expect_input_shape is not None and tuple(expect_input_shape) != info.input_shape:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained on inputs {info.input_shape}; "
                              f"the dataset gives {tuple(expect_input_shape)}")
    if expect_num_classes is not None and expect_num_classes != info.num_classes:
        raise CheckpointError(f"checkpoint {str(path)!r} has {info.num_classes} classes; "
                              f"the dataset has {expect_num_classes}")
    try:
        model = build_model(info.model, in_channels=info.input_shape[0], num_classes=info.num_classes,
                            input_shape=info.input_shape)
    except PfRayError as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot rebuild its model: {error}") from None
    try:
        if info.removed_blocks:  # depth first: the blocks' layers are gone from the state dict
            from pf_ray.ops.blocks import remove_blocks_

            remove_blocks_(model, info.input_shape, info.removed_blocks, check=False)
        resize_to_state_dict_(model, state_dict)
        model = _learner_structure(model, info, state_dict)
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError, ConfigError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {str(path)!r} does not match model {info.model.name!r}: "
                              f"{first_line}") from None
    model.eval()
    return model, info


def checkpoint_learner(info: CheckpointInfo) -> Any:
    """The learner (built from its saved config) that made a checkpoint's model, or None when the checkpoint
    names none (a baseline)."""
    name = info.extra.get("learner")
    if not name:
        return None
    from pf_ray.learners import build_learner, learner_config_class

    try:
        config = from_dict(learner_config_class(name), info.extra.get("learner_config") or {},
                           path="learner_config")
        return build_learner(name, config)
    except PfRayError as error:
        raise CheckpointError(f"checkpoint {str(info.path)!r} names learner {name!r}: {error}") from None


def _learner_structure(model: nn.Module, info: CheckpointInfo, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A learner whose finalized layers are not the zoo's (``rebuild_finalized``, e.g. uniform_quantization's
    frozen quantized layers) rebuilds them from the learner and config the checkpoint names; others: ``model``."""
    rebuild = getattr(checkpoint_learner(info), "rebuild_finalized", None)
    return model if rebuild is None else rebuild(model, state_dict, info.input_shape)
