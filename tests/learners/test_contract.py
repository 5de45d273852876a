"""Learner contract: every registered learner goes through prepare -> two SGD steps -> finalize, and defines
only the hooks the learner protocols declare."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import ModelConfig
from pf_ray.export.onnx import export_onnx
from pf_ray.export.packed import pack_state_dict, read_packed, write_packed
from pf_ray.export.verify import onnx_session
from pf_ray.learners import Learner, build_learner, learner_config_class
from pf_ray.learners.base import OPTIONAL_HOOKS
from pf_ray.registry import LEARNERS
from pf_ray.strict import from_dict, to_dict
from tests.tiny import SHAPE, train_two_steps
from tests.tiny import tiny_data as _data
from tests.tiny import tiny_resnet20 as _resnet20


@pytest.mark.parametrize("name", LEARNERS.names())
def test_learner_contract(name, tmp_path):
    """prepare -> two SGD steps -> finalize -> export (ONNX, and the compact .pfpack where the learner stores
    weights compactly) -> reload each file and run it: the outputs match the finalized model's."""
    data = _data()
    learner = build_learner(name, from_dict(learner_config_class(name), {}, path="learner.options"))
    learner.check(_resnet20(), SHAPE)
    model = learner.prepare(_resnet20(), data)
    if hasattr(learner, "set_total_steps"):
        learner.set_total_steps(2)
    model = learner.finalize(train_two_steps(learner, model, data))
    inputs = data.train.tensors[0]
    model.eval()
    with torch.no_grad():
        expected = model(inputs)
    assert expected.shape == (16, 10)

    onnx_path = export_onnx(model, SHAPE, tmp_path / f"{name}.onnx")
    session = onnx_session(onnx_path)
    (got,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    assert np.abs(got - expected.numpy()).max() < 1e-3

    packed = pack_state_dict(model.state_dict(), learner.packed(model) if hasattr(learner, "packed") else {})
    sizes = write_packed(tmp_path / f"{name}.pfpack", packed)
    state, _ = read_packed(tmp_path / f"{name}.pfpack")
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert torch.allclose(reloaded(inputs), expected, atol=1e-4)
    assert sizes["file_bytes"] <= sizes["dense_bytes"] + 4096  # never bigger than float32 plus the header

    # compressed.pt: a pf-ray checkpoint naming the learner, rebuilt without data by load_checkpoint
    checkpoint = save_checkpoint(tmp_path / "compressed.pt", model, model_config=ModelConfig("resnet20"),
                                 input_shape=SHAPE, num_classes=10,
                                 extra={"learner": name, "learner_config": to_dict(learner.config)})
    rebuilt, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        assert torch.allclose(rebuilt(inputs), expected, atol=1e-5)


def _members(protocol: type) -> set[str]:
    """The attributes and methods a protocol declares."""
    return {name for name in {*vars(protocol), *getattr(protocol, "__annotations__", {})}
            if not name.startswith("_")}


@pytest.mark.parametrize("name", LEARNERS.names())
def test_a_learner_defines_only_declared_hooks_with_their_signatures(name):
    """A misspelt or unknown hook (``packd``, ``search_spaces``) would never be called: every public attribute of a
    learner class belongs to ``Learner`` or to one of the optional hook protocols, whole and with its arguments."""
    cls = LEARNERS.get(name)
    public = {attribute for attribute in vars(cls) if not attribute.startswith("_")}
    declared = _members(Learner).union(*map(_members, OPTIONAL_HOOKS))
    assert public <= declared, f"{name} defines {sorted(public - declared)}, which no learner protocol declares"
    for protocol in (Learner, *OPTIONAL_HOOKS):
        members = _members(protocol)
        if protocol is Learner or members & public:
            assert members - {"config"} <= public, f"{name} has only part of {protocol.__name__}"
            for member in members & public:
                if callable(vars(protocol).get(member)):
                    expected = list(inspect.signature(vars(protocol)[member]).parameters)
                    assert list(inspect.signature(getattr(cls, member)).parameters) == expected, (name, member)
            assert isinstance(build_learner(name, learner_config_class(name)()), protocol)
