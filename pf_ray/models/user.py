"""User models named ``"path/to/file.py:function"`` or ``"package.module:function"``.

The function is called with the keywords among ``in_channels``, ``num_classes`` (and ``width_multiplier``)
that its signature accepts, and must return an ``nn.Module``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from pf_ray.errors import ConfigError, ModelError

TORCHVISION_PREFIX = "torchvision:"  # pf_ray.models.torchvision_models.PREFIX (this module does not import torchvision)


def is_user_model(name: str) -> bool:
    """Registered names never contain ":"; user model references always do (torchvision's, ``torchvision:NAME``,
    are no user model: pf-ray builds them itself)."""
    return ":" in name and not name.startswith(TORCHVISION_PREFIX)


def absolute_model_name(name: str) -> str:
    """Make a file reference absolute (Ray Tune runs trials in their own working directories)."""
    if not is_user_model(name):
        return name
    target, _, function = name.rpartition(":")
    if not _is_file_reference(target):
        return name
    return f"{Path(target).expanduser().resolve()}:{function}"


def run_name_prefix(name: str) -> str:
    """A model's name as the start of a run folder's name: a model file's stem and function (``user_model-build``
    for ``path/to/user_model.py:build``); any other name with "/" and ":" made "_" (``resnet20``)."""
    target, colon, function = name.rpartition(":")
    if colon and _is_file_reference(target):
        return f"{Path(target).stem}-{function}"
    return name.replace("/", "_").replace(":", "_")


def build_user_model(name: str, *, in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
    """Import the function ``name`` refers to, call it, and check that it returned an ``nn.Module``."""
    # rpartition: a Windows path ("C:/models/net.py:build") keeps its drive letter.
    target, _, function_name = name.rpartition(":")
    if not target or not function_name:
        raise ModelError(f"model.name: got {name!r}; expected 'path/to/file.py:function' or 'package.module:function'")
    module = _load_file(target) if _is_file_reference(target) else _import_module(target)
    function = getattr(module, function_name, None)
    if function is None:
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelError(
            f"model.name: {target!r} has no function {function_name!r}; "
            f"its callables: {', '.join(available) or '(none)'}"
        )
    if not callable(function):
        raise ModelError(f"model.name: {target}:{function_name} is a {type(function).__name__}, not a function")

    kwargs = _keyword_arguments(
        function, in_channels=in_channels, num_classes=num_classes, width_multiplier=width_multiplier, name=name
    )
    try:
        model = function(**kwargs)
    except Exception as error:
        raise ModelError(f"model.name: {name!r} raised {type(error).__name__}: {_first_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.name: {name!r} returned a {type(model).__name__}; expected a torch.nn.Module")
    return model


def _is_file_reference(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"model.name: file {target!r} does not exist (resolved to {str(path)!r})")
    # A unique module name per file, registered in sys.modules so dataclasses and pickling inside it work.
    module_name = f"pf_ray_user_model_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"model.name: {target!r} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))  # let the file import its neighbours, during its import only
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ModelError(
            f"model.name: importing {target!r} failed: {type(error).__name__}: {_first_line(error)}"
        ) from error
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except Exception as error:
        raise ModelError(
            f"model.name: importing module {target!r} failed: {type(error).__name__}: {_first_line(error)}"
        ) from error


def _first_line(error: Exception) -> str:
    """A user's exception as one line: the CLI prints bad input as one line (the traceback is chained)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _keyword_arguments(
    function: Any, *, in_channels: int, num_classes: int, width_multiplier: float, name: str
) -> dict[str, Any]:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # some builtins have no signature: call them without keywords
        parameters = {}
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {n for n, p in parameters.items() if p.kind in keyword_kinds}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    kwargs: dict[str, Any] = {}
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if key in named or takes_any:
            kwargs[key] = value
    # width_multiplier only when asked for by name: a **kwargs function may forward it somewhere unprepared.
    if "width_multiplier" in named:
        kwargs["width_multiplier"] = width_multiplier
    elif width_multiplier != 1.0:
        raise ConfigError(
            f"model.width_multiplier: got {width_multiplier!r}; {name!r} takes no "
            "width_multiplier argument, so only 1.0 is allowed"
        )
    return kwargs
