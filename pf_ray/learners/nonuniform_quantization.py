"""Non-uniform weight quantization with trained codebooks (Han et al., "Deep Compression", ICLR 2016;
PocketFlow's NonUniformQuantLearner)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from pf_ray.config import SearchConfig
from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, ModelError
from pf_ray.learners.base import PerLayerMode, check_per_layer_mode, refuse_latency_budget
from pf_ray.metrics import quantized_layers
from pf_ray.ops.bits import FP32_BITS, MAX_BITS, WeightBitsBudget
from pf_ray.ops.codebook import CENTROID_GRADIENTS, INITS, OPTIMIZE, CodebookWeight, codebook_of_values
from pf_ray.ops.latency_budget import LatencySource
from pf_ray.packing import PackedTensor
from pf_ray.registry import LEARNERS
from pf_ray.search_space import PerLayerSpace, layer_features
from pf_ray.strict import check_choice, check_range

LAYER_BITS_FIELD = "learner.options.layer_bits"


@dataclass(frozen=True)
class NonUniformQuantizationConfig:
    mode: PerLayerMode = PerLayerMode.AUTO  # uniform: bits everywhere; list: layer_bits; auto: searched
    bits: int = 4  # uniform bits; in auto the average-bits budget (and the setting before a search)
    layer_bits: tuple[float, ...] = ()  # whole bits, one per quantized layer in forward order (list / auto)
    min_bits: int = 1  # the search's lower bound: below 2, so a 2-bit average still leaves something to trade
    max_bits: int = MAX_BITS  # the search's upper bound
    init: str = "kmeans"  # "kmeans" (Lloyd from quantiles), "quantile" or "linear" (over [min, max])
    kmeans_iterations: int = 20  # Lloyd steps at most (stops when no weight changes cluster)
    bucket_size: int = 0  # weights per codebook, consecutive in the flattened tensor; 0 = one per layer
    optimize: str = "both"  # what fine-tuning trains: "weights", "centroids" (Han et al.) or "both"
    centroid_gradient: str = "mean"  # "sum": Han et al.'s exact gradient; "mean": divided by the cluster size
    keep_zeros: bool = True  # exact zeros (a sparsified model's) stay zeros, masked, out of the clustering
    quantize_first_last: bool = False  # also quantize the first and last conv/linear layers

    def __post_init__(self) -> None:
        check_per_layer_mode(self.mode, "layer_bits", self.layer_bits)
        check_range("bits", self.bits, low=1, high=MAX_BITS)
        for index, bits in enumerate(self.layer_bits):
            if not (1 <= bits <= MAX_BITS and float(bits).is_integer()):
                raise ConfigError(f"layer_bits[{index}]: got {bits!r}; allowed: whole numbers from 1 to {MAX_BITS}")
        check_range("min_bits", self.min_bits, low=1, high=MAX_BITS)
        check_range("max_bits", self.max_bits, low=self.min_bits, high=MAX_BITS)
        check_choice("init", self.init, INITS)
        check_range("kmeans_iterations", self.kmeans_iterations, low=0)
        check_range("bucket_size", self.bucket_size, low=0)
        check_choice("optimize", self.optimize, OPTIMIZE)
        check_choice("centroid_gradient", self.centroid_gradient, CENTROID_GRADIENTS)
        if self.mode == PerLayerMode.AUTO and not self.min_bits <= self.bits <= self.max_bits:
            raise ConfigError(f"bits: got {self.bits} with mode 'auto'; the search reaches averages from min_bits="
                              f"{self.min_bits} to max_bits={self.max_bits}")


@LEARNERS.register("nonuniform_quantization", config=NonUniformQuantizationConfig)
class NonUniformQuantization:
    """Codebooks fitted in ``prepare`` (a parametrization per layer), trained by fine-tuning, baked in by
    ``finalize``."""

    searched_field = "layer_bits"  # the config field its per-layer search fills (PerLayerSpace.field)

    def __init__(self, config: NonUniformQuantizationConfig) -> None:
        self.config = config
        self.layer_bits: dict[str, int] = {}  # layer name -> bits, filled by prepare (or packed)

    # -- which layers, how many bits ---------------------------------------------------------------------------

    def _layers(self, model: nn.Module, input_shape: tuple[int, int, int] | None) -> list[str]:
        names = quantized_layers(model, input_shape, first_last=self.config.quantize_first_last)
        if not names:
            hint = "" if self.config.quantize_first_last else " besides the first and the last (set " \
                "learner.options.quantize_first_last to quantize those)"
            raise ModelError(f"nonuniform_quantization: the model ({type(model).__name__}) has no conv/linear "
                             f"layer to quantize{hint}")
        return names

    def _bits(self, names: list[str]) -> dict[str, int]:
        config = self.config
        if config.mode == PerLayerMode.UNIFORM or not config.layer_bits:
            return dict.fromkeys(names, config.bits)  # auto before any search: uniform
        if len(config.layer_bits) != len(names):
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(f"{LAYER_BITS_FIELD}: got {len(config.layer_bits)} values; expected {len(names)} "
                              f"(one per quantized layer of this model, in order: {shown})")
        return {name: int(bits) for name, bits in zip(names, config.layer_bits, strict=True)}

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self._bits(self._layers(model, input_shape))

    # -- the three hooks ----------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        config = self.config
        self.layer_bits = self._bits(self._layers(model, data.input_shape))
        for name, bits in self.layer_bits.items():
            module = model.get_submodule(name)
            codebook = CodebookWeight(module.weight, bits, init=config.init, bucket_size=config.bucket_size,
                                      kmeans_iterations=config.kmeans_iterations, keep_zeros=config.keep_zeros,
                                      optimize=config.optimize, centroid_gradient=config.centroid_gradient)
            parametrize.register_parametrization(module, "weight", codebook)
            if config.optimize == "centroids":  # Han et al.: the assignment is fixed, the float weights unused
                module.parametrizations.weight.original.requires_grad_(False)
        return model

    def on_step(self, model: nn.Module, step: int) -> None:
        pass  # the parametrization re-quantizes on every forward; nothing to re-apply

    def finalize(self, model: nn.Module) -> nn.Module:
        """Bake each layer's codebook values into a plain weight (the assignment of the last forward)."""
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight") and isinstance(
                module.parametrizations.weight[0], CodebookWeight
            ):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                module.weight.requires_grad_(True)
        return model

    def packed(self, model: nn.Module) -> dict[str, PackedTensor]:
        """k-bit codes + 2^k float32 centroids per codebook for every quantized weight of the finalized model
        (plus a 1-bit mask where ``keep_zeros`` and the weight has exact zeros)."""
        config = self.config
        layer_bits = self.layer_bits or self._bits(self._layers(model, None))
        packed = {}
        for name, bits in layer_bits.items():
            weight = model.get_submodule(name).weight
            try:
                codebook = codebook_of_values(weight, bits, bucket_size=config.bucket_size,
                                              keep_zeros=config.keep_zeros)
            except ModelError as error:
                raise ModelError(f"packed: layer {name!r}: {error}") from None
            packed[f"{name}.weight"] = codebook.pack()
        return packed

    # -- per-layer search ---------------------------------------------------------------------------------------

    def search_space(self, model: nn.Module, input_shape: tuple[int, int, int], search: SearchConfig,
                     latency: LatencySource | None = None) -> PerLayerSpace | None:
        """Bits per quantized layer in [min_bits, max_bits] under an average of ``bits`` per weight (auto mode);
        None in the other modes."""
        refuse_latency_budget(search, "nonuniform_quantization", "codebook weights are stored compactly but "
                              "computed in float; it keeps its own budget, the average bits (learner.options.bits)")
        if self.config.mode != PerLayerMode.AUTO:
            return None
        names = tuple(self._layers(model, input_shape))
        counts = tuple(model.get_submodule(name).weight.numel() for name in names)
        budget = WeightBitsBudget(self.config.bits / FP32_BITS, counts, min_bits=self.config.min_bits,
                                  max_bits=self.config.max_bits)
        return PerLayerSpace(self.searched_field, names, low=float(self.config.min_bits),
                             high=float(self.config.max_bits), budget=budget,
                             features=layer_features(model, input_shape, names), label="bits")
