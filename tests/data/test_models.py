"""Models: every registered name builds and runs; width multipliers; user models and their errors."""

from __future__ import annotations

import uuid

import pytest
import torch
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import ConfigError, ModelError
from pf_ray.metrics import model_stats
from pf_ray.models import absolute_model_name, build_model, check_forward
from pf_ray.models.torchvision_models import classifier_names, example_input_shape
from pf_ray.models.user import is_user_model, run_name_prefix
from pf_ray.registry import MODELS

NUM_CLASSES = 5
CIFAR_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "mobilenet_v1", "mobilenet_v2"]


def natural_size(name: str) -> int:
    return 224 if name.startswith("torchvision_") else 32  # ImageNet models / CIFAR models


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", MODELS.names())
def test_registered_model_builds_and_runs(name, in_channels):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name), in_channels=in_channels, num_classes=NUM_CLASSES).eval()
    size = natural_size(name)
    with torch.no_grad():
        logits = model(torch.randn(1, in_channels, size, size))
    assert logits.shape == (1, NUM_CLASSES)
    assert torch.isfinite(logits).all()


def test_every_expected_model_is_registered():
    expected = set(CIFAR_MODELS) | {
        "torchvision_resnet18",
        "torchvision_mobilenet_v2",
        "torchvision_mobilenet_v3_small",
    }
    assert expected <= set(MODELS.names())
    assert not any(":" in name for name in MODELS.names())


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (2, 9, 13)])
@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v1", "mobilenet_v2"])
def test_cifar_models_take_small_inputs_of_any_shape(name, shape):
    config = ModelConfig(name, width_multiplier=1.0 if name == "resnet20" else 0.25)  # small: fast test
    model = build_model(config, in_channels=shape[0], num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        assert model(torch.randn(1, *shape)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize(("name", "depth"), [("resnet20", 20), ("resnet32", 32), ("resnet44", 44), ("resnet56", 56)])
def test_resnet_depth_and_projection_shortcuts(name, depth):
    model = build_model(ModelConfig(name), in_channels=3, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three_by_three = [c for c in convs if c.kernel_size == (3, 3)]
    projections = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(three_by_three) + 1 == depth  # + the linear head
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]


def test_resnet20_size_matches_the_paper():
    model = build_model(ModelConfig("resnet20"), in_channels=3, num_classes=10)
    # 0.27M parameters in He et al. (their option A has no projection weights; option B adds 2x1x1 convs + BN)
    assert sum(p.numel() for p in model.parameters()) == 272_474


def test_kaiming_initialisation():
    torch.manual_seed(0)
    model = build_model(ModelConfig("resnet56"), in_channels=3, num_classes=10)
    conv = model.layer3[0].conv2  # 64 -> 64, 3x3: fan_out = 64 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)


@pytest.mark.parametrize(
    "name", ["mobilenet_v1", "mobilenet_v2", "torchvision_mobilenet_v2", "torchvision_mobilenet_v3_small"]
)
def test_width_multiplier_shrinks_mobilenets_to_multiples_of_8(name):
    full = build_model(ModelConfig(name), in_channels=3, num_classes=10)
    half = build_model(ModelConfig(name, width_multiplier=0.5), in_channels=3, num_classes=10)
    assert sum(p.numel() for p in half.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())
    if not name.startswith("torchvision_"):
        widths = [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)]
        assert all(width % 8 == 0 for width in widths)
        assert widths[0] == 16  # make_divisible(32 * 0.5)


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "torchvision_resnet18"])
def test_width_multiplier_on_a_model_without_one_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"model\.width_multiplier: got 0\.5.*" + name):
        build_model(ModelConfig(name, width_multiplier=0.5), in_channels=3, num_classes=10)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'resnet21'.*resnet20"):
        build_model(ModelConfig("resnet21"), in_channels=3, num_classes=10)


def test_torchvision_first_conv_follows_in_channels():
    model = build_model(ModelConfig("torchvision_resnet18"), in_channels=1, num_classes=7)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7) and model.fc.out_features == 7
    model = build_model(ModelConfig("torchvision_mobilenet_v3_small"), in_channels=2, num_classes=7)
    assert model.features[0][0].in_channels == 2


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v1", "mobilenet_v2"])
def test_torch_pruning_removes_channels_physically(name):
    tp = pytest.importorskip("torch_pruning")
    config = ModelConfig(name, width_multiplier=1.0 if name == "resnet20" else 0.5)  # small: fast test
    model = build_model(config, in_channels=1, num_classes=10).eval()
    example = torch.randn(1, 1, 8, 8)
    head = model.fc if hasattr(model, "fc") else model.classifier
    before = model_stats(model, (1, 8, 8)).macs
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=[head]
    )
    pruner.step()
    assert model_stats(model, (1, 8, 8)).macs < 0.35 * before  # about a quarter: both sides of each conv halve
    assert model(example).shape == (1, 10)


# ---------------------------------------------------------------------------------------------------------------
# User models.

USER_MODEL = """
import torch
from torch import nn

def build(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))

def build_fixed():
    return nn.Linear(64, 3)

def build_classes_only(num_classes, *, hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Linear(hidden, num_classes))

def build_kwargs(**kwargs):
    return nn.Linear(kwargs["in_channels"], kwargs["num_classes"])

def build_wide(in_channels, num_classes, width_multiplier=1.0):
    return nn.Linear(in_channels, round(8 * width_multiplier))

def build_not_a_module(in_channels, num_classes):
    return 42

def build_broken(in_channels, num_classes):
    raise RuntimeError("out of coffee")

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / f"user_model_{uuid.uuid4().hex[:8]}.py"
    path.write_text(USER_MODEL)
    return path


def build(name, width_multiplier=1.0, in_channels=1, num_classes=10):
    return build_model(
        ModelConfig(name, width_multiplier=width_multiplier), in_channels=in_channels, num_classes=num_classes
    )


def test_user_model_from_a_file(user_file):
    model = build(f"{user_file}:build", in_channels=3, num_classes=6)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 6)


@pytest.mark.parametrize(
    ("function", "out_features"), [("build_fixed", 3), ("build_classes_only", 10), ("build_kwargs", 10)]
)
def test_user_model_gets_only_the_keywords_it_accepts(user_file, function, out_features):
    model = build(f"{user_file}:{function}")
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert linear.out_features == out_features


def test_user_model_width_multiplier(user_file):
    assert build(f"{user_file}:build_wide", width_multiplier=2.0).out_features == 16
    with pytest.raises(ConfigError, match=r"model\.width_multiplier: got 2\.0.*build"):
        build(f"{user_file}:build", width_multiplier=2.0)


def test_user_model_from_a_module_path(tmp_path, monkeypatch):
    package = f"user_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "nets.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build(f"{package}.nets:build", in_channels=2, num_classes=4)
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 4)


def test_user_file_may_import_its_neighbours(tmp_path):
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("from torch import nn\nHEAD = nn.Linear\n")
    (tmp_path / "net.py").write_text(
        f"from {helper} import HEAD\ndef build(num_classes):\n    return HEAD(4, num_classes)\n"
    )
    assert build(f"{tmp_path / 'net.py'}:build", num_classes=3).out_features == 3


def test_absolute_model_name_resolves_files_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_model_name("models/net.py:build") == f"{tmp_path / 'models' / 'net.py'}:build"
    assert absolute_model_name("package.module:build") == "package.module:build"
    assert absolute_model_name("resnet20") == "resnet20"


def test_user_model_missing_file(tmp_path):
    with pytest.raises(ModelError, match=r"model\.name: file '.*nowhere\.py' does not exist"):
        build(f"{tmp_path / 'nowhere.py'}:build")


def test_user_model_file_that_fails_to_import(tmp_path):
    path = tmp_path / "bad_import.py"
    path.write_text("import module_that_does_not_exist_xyz\n")
    with pytest.raises(
        ModelError,
        match=r"importing '.*bad_import\.py' failed: ModuleNotFoundError.*"
        r"module_that_does_not_exist_xyz",
    ):
        build(f"{path}:build")


def test_user_model_module_that_does_not_exist():
    with pytest.raises(ModelError, match=r"importing module 'no_such_package_xyz\.nets' failed"):
        build("no_such_package_xyz.nets:build")


def test_user_model_missing_function_lists_the_available_ones(user_file):
    with pytest.raises(ModelError, match=r"has no function 'bulid'; its callables: .*build, build_broken"):
        build(f"{user_file}:bulid")


def test_user_model_not_callable(user_file):
    with pytest.raises(ModelError, match="NOT_CALLABLE is a int, not a function"):
        build(f"{user_file}:NOT_CALLABLE")


def test_user_model_must_return_a_module(user_file):
    with pytest.raises(ModelError, match=r"returned a int; expected a torch\.nn\.Module"):
        build(f"{user_file}:build_not_a_module")


def test_user_model_that_raises(user_file):
    with pytest.raises(ModelError, match="raised RuntimeError: out of coffee"):
        build(f"{user_file}:build_broken")


@pytest.mark.parametrize("name", [":build", "net.py:"])
def test_user_model_reference_needs_both_halves(name):
    with pytest.raises(ModelError, match="expected 'path/to/file.py:function'"):
        build(name)


@pytest.mark.parametrize(("field", "value"), [("in_channels", 0), ("num_classes", -1)])
def test_bad_sizes_are_rejected(field, value):
    kwargs = {"in_channels": 3, "num_classes": 10, field: value}
    with pytest.raises(ModelError, match=f"{field}: got {value}"):
        build_model(ModelConfig("resnet20"), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# torchvision:NAME (every torchvision classifier; the pruning contract is tests/models/test_torchvision_contract.py).


def build_torchvision_model(name, in_channels=3, num_classes=NUM_CLASSES, side=64, width_multiplier=1.0):
    return build_model(ModelConfig(f"torchvision:{name}", width_multiplier=width_multiplier), in_channels=in_channels,
                       num_classes=num_classes, input_shape=(in_channels, side, side))


@pytest.mark.parametrize(("name", "side"), [("resnet18", 32), ("squeezenet1_1", 32), ("googlenet", 32),
                                            ("vit_b_32", 64), ("swin_t", 32)])
def test_torchvision_classifier_builds_for_the_dataset(name, side):
    torch.manual_seed(0)
    model = build_torchvision_model(name, in_channels=1, num_classes=7, side=side)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    model.train()  # GoogLeNet and Inception-v3 are built without auxiliary heads: a tensor in training mode too
    assert model(torch.randn(2, 1, side, side)).shape == (2, 7)


def test_torchvision_names_are_no_user_models_and_the_old_names_are_aliases():
    assert not is_user_model("torchvision:resnet18") and is_user_model("torchvision.models:resnet18")
    assert run_name_prefix("torchvision:resnet18") == "torchvision_resnet18"
    old = build_model(ModelConfig("torchvision_mobilenet_v2"), in_channels=3, num_classes=10)
    new = build_model(ModelConfig("torchvision:mobilenet_v2"), in_channels=3, num_classes=10)
    assert [p.shape for p in old.parameters()] == [p.shape for p in new.parameters()]


def test_torchvision_width_multiplier_only_where_the_builder_has_one():
    full = build_torchvision_model("mobilenet_v3_large")
    half = build_torchvision_model("mobilenet_v3_large", width_multiplier=0.5)
    assert sum(p.numel() for p in half.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())
    with pytest.raises(ConfigError, match=r"model\.width_multiplier: got 0\.5; model 'torchvision:resnet50' has no "
                                          r"width multiplier, so only 1\.0 is allowed"):
        build_torchvision_model("resnet50", width_multiplier=0.5)


def test_an_unknown_torchvision_name_lists_close_matches_and_how_to_see_all():
    with pytest.raises(ConfigError, match=r"model\.name: unknown torchvision classifier 'torchvision:resnet51'; close "
                                          r"matches: torchvision:resnet50.*has 80 \(list them with python -c") as error:
        build_torchvision_model("resnet51")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="unknown torchvision classifier 'torchvision:fasterrcnn_resnet50_fpn'"):
        build_torchvision_model("fasterrcnn_resnet50_fpn")  # detection: not a classifier


@pytest.mark.parametrize(("name", "side", "message"), [
    ("vit_b_16", 40, r"'torchvision:vit_b_16' needs square inputs whose side is a multiple of its patch size 16 "
                     r"\(e\.g\. 3x224x224\); the dataset gives 3x40x40"),
    ("maxvit_t", 64, r"'torchvision:maxvit_t' needs inputs whose height and width split into 7x7 windows at every "
                     r"stage, e\.g\. 3x224x224 .*; the dataset gives 3x64x64"),
    ("inception_v3", 32, r"'torchvision:inception_v3' needs inputs of at least 75x75 pixels \(its strides and "
                         r"kernels\); the dataset gives 3x32x32"),
], ids=["vit_b_16", "maxvit_t", "inception_v3"])
def test_a_torchvision_model_refuses_an_input_size_it_cannot_take_naming_the_size_it_needs(name, side, message):
    with pytest.raises(ModelError, match=r"model\.name: " + message):
        build_torchvision_model(name, side=side)


def test_vit_is_built_for_the_dataset_s_input_size():
    model = build_torchvision_model("vit_b_32", side=96).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, NUM_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("name", classifier_names())
def test_every_torchvision_classifier_builds_for_one_channel_and_runs(name):
    shape = example_input_shape(name, 64, in_channels=1)
    model = build_model(ModelConfig(f"torchvision:{name}"), in_channels=1, num_classes=7, input_shape=shape)
    check_forward(model, name, shape, 7)
