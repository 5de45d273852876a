"""Uniform quantization by quantization-aware training (PocketFlow's UniformQuantLearner; Jacob et al., CVPR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pf_ray.config import SearchConfig
from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, ModelError
from pf_ray.learners.base import PerLayerMode, check_per_layer_mode, refuse_latency_budget
from pf_ray.metrics import quantized_layers
from pf_ray.ops.bits import FP32_BITS, MAX_BITS, WeightBitsBudget
from pf_ray.ops.latency_budget import LatencySource
from pf_ray.ops.qat_layers import (
    FAKE_QUANT_LAYERS,
    ActivationQuantizer,
    FrozenActivationQuantizer,
    fake_quantize_layers_,
    freeze_,
    is_int8_qdq,
    packed_weights,
)
from pf_ray.ops.quantize import GRANULARITIES, INT8_BITS, MIN_BITS
from pf_ray.packing import PackedTensor
from pf_ray.registry import LEARNERS
from pf_ray.search_space import PerLayerSpace, layer_features
from pf_ray.strict import check_choice, check_range
from pf_ray.train import take_batches

LAYER_BITS_FIELD = "learner.options.layer_bits"
CALIBRATION_BATCH_SIZE = 64  # images per calibration batch of the activation ranges

__all__ = ["UniformQuantization", "UniformQuantizationConfig", "is_int8_qdq"]


@dataclass(frozen=True)
class UniformQuantizationConfig:
    mode: PerLayerMode = PerLayerMode.UNIFORM  # uniform: weight_bits everywhere; list: layer_bits; auto: searched
    weight_bits: int = 4  # uniform width; in auto mode also the budget: weight_bits per weight on average
    layer_bits: tuple[float, ...] = ()  # one per quantized layer in model order (mode list / auto); whole numbers
    activation_bits: int | None = None  # None: float activations; else the input of every quantized layer
    granularity: str = "channel"  # weight ranges: one per output channel, or "tensor": one per layer
    quantize_first_last: bool = False  # PocketFlow keeps the first conv and the last linear layer in float
    min_bits: int = MIN_BITS  # the search's box for every layer's bits (auto mode)
    max_bits: int = MAX_BITS
    fold_batchnorm: bool = True  # quantize each conv's BN-folded weight; the BN trains on, finalize folds it in
    int8_outputs: bool = True  # W8A8 layers whose output meets no quantized layer (before a residual add) quantize it
    symmetric_int8: bool = True  # W8A8 layers' weights on a symmetric grid (int8 zero point 0: ORT's fast kernels)
    activation_ema_decay: float = 0.99  # running range = decay * running + (1 - decay) * batch, while training
    num_calibration_batches: int = 4  # training batches (of 64) that set the activation ranges in prepare
    seed: int = 0  # which calibration batches

    def __post_init__(self) -> None:
        check_per_layer_mode(self.mode, "layer_bits", self.layer_bits)
        check_range("weight_bits", self.weight_bits, low=MIN_BITS, high=MAX_BITS)
        for index, bits in enumerate(self.layer_bits):
            if not (MIN_BITS <= bits <= MAX_BITS and float(bits).is_integer()):
                raise ConfigError(f"layer_bits[{index}]: got {bits!r}; allowed: whole numbers from {MIN_BITS} "
                                  f"to {MAX_BITS}")
        if self.activation_bits is not None:
            check_range("activation_bits", self.activation_bits, low=MIN_BITS, high=MAX_BITS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_range("min_bits", self.min_bits, low=MIN_BITS, high=MAX_BITS)
        check_range("max_bits", self.max_bits, low=self.min_bits, high=MAX_BITS)
        if not self.min_bits <= self.weight_bits <= self.max_bits:
            raise ConfigError(f"weight_bits: got {self.weight_bits}; allowed range is [min_bits, max_bits] = "
                              f"[{self.min_bits}, {self.max_bits}] (the search's budget)")
        check_range("activation_ema_decay", self.activation_ema_decay, low=0.0, high=1.0, high_inclusive=False)
        check_range("num_calibration_batches", self.num_calibration_batches, low=0)


@LEARNERS.register("uniform_quantization", config=UniformQuantizationConfig)
class UniformQuantization:
    """Layers swapped for fake-quantized ones in ``prepare``; fine-tuning then trains through the quantizers."""

    searched_field = "layer_bits"  # the config field its per-layer search fills (PerLayerSpace.field)

    def __init__(self, config: UniformQuantizationConfig) -> None:
        self.config = config
        self.layer_bits: dict[str, int] = {}  # layer name -> weight bits, filled by prepare

    # ---- checks and the layers concerned

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self._bits(len(self._layers(model, input_shape)))

    def _layers(self, model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, nn.Module]]:
        names = quantized_layers(model, input_shape, first_last=self.config.quantize_first_last)
        if not names:
            raise ModelError(
                f"uniform_quantization: the model ({type(model).__name__}) has no conv/linear layer to quantize"
                + ("" if self.config.quantize_first_last else
                   " besides its first and last, which stay float; set learner.options.quantize_first_last")
            )
        layers = [(name, model.get_submodule(name)) for name in names]
        for name, layer in layers:
            # A subclass may compute its forward differently: replacing it by a plain quantized layer would not
            # be the same model.
            if type(layer) not in (nn.Conv2d, nn.Linear, *FAKE_QUANT_LAYERS):
                raise ModelError(f"uniform_quantization: layer {name!r} is a {type(layer).__name__}, a subclass of "
                                 "Conv2d/Linear with its own code; only plain nn.Conv2d and nn.Linear are quantized")
        return layers

    def _bits(self, num_layers: int) -> tuple[int, ...]:
        config = self.config
        if config.mode == PerLayerMode.UNIFORM or not config.layer_bits:
            return (config.weight_bits,) * num_layers  # auto before any search: uniform
        if len(config.layer_bits) != num_layers:
            raise ConfigError(f"{LAYER_BITS_FIELD}: got {len(config.layer_bits)} values; expected {num_layers} "
                              "(one per quantized layer of this model)")
        return tuple(int(bits) for bits in config.layer_bits)

    # ---- the learner's hooks

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        self._quantize_layers(model, data.input_shape)
        config = self.config
        if config.activation_bits is not None and config.num_calibration_batches > 0:
            self._calibrate(model, data)
        return model

    def rebuild_finalized(self, model: nn.Module, state_dict: dict[str, torch.Tensor],
                          input_shape: tuple[int, int, int]) -> nn.Module:
        """The structure ``finalize`` gave, on a freshly built zoo ``model`` (in place; returns it), for
        ``state_dict`` (a finalized model's) to be loaded into: the same layers quantized at the same bits,
        frozen, with an activation quantizer wherever the state dict holds one. How ``load_checkpoint`` rebuilds
        a compressed.pt of this learner without data."""
        names = self._quantize_layers(model, input_shape, activations=False)
        freeze_(model)
        for name in names:
            layer = model.get_submodule(name)
            inputs, outputs = self.config.activation_bits or INT8_BITS, INT8_BITS
            for attribute, bits in (("input_quantizer", inputs), ("output_quantizer", outputs)):
                if f"{name}.{attribute}.scale" in state_dict:  # the values come with load_state_dict
                    setattr(layer, attribute, FrozenActivationQuantizer(bits, torch.ones(()),
                                                                        torch.zeros((), dtype=torch.int32)))
        return model

    def _quantize_layers(self, model: nn.Module, input_shape: tuple[int, int, int], *,
                         activations: bool = True) -> list[str]:
        """Swap the quantized layers for fake-quantized ones (batch norms folded in as configured), in place;
        returns their names. ``activations=False`` leaves out the activation quantizers."""
        config = self.config
        layers = self._layers(model, input_shape)
        bits = self._bits(len(layers))
        for name, layer in layers:
            if isinstance(layer, FAKE_QUANT_LAYERS):
                raise ModelError(f"uniform_quantization: layer {name!r} is already fake-quantized")
        layer_bits = {name: layer_bits for (name, _), layer_bits in zip(layers, bits, strict=True)}
        fake_quantize_layers_(model, layer_bits, granularity=config.granularity,
                              activation_bits=config.activation_bits, ema_decay=config.activation_ema_decay,
                              fold_batchnorm=config.fold_batchnorm, int8_outputs=config.int8_outputs,
                              symmetric_int8=config.symmetric_int8, activations=activations)
        self.layer_bits = layer_bits
        return list(layer_bits)

    @torch.no_grad()
    def _calibrate(self, model: nn.Module, data: DataBundle) -> None:
        """Set every activation range to the min/max seen on a few training batches, in eval mode (batch norm
        keeps its statistics); each layer sees its inputs as quantized by the layers before it."""
        quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
        parameter = next(model.parameters())
        was_training = model.training
        model.eval()
        for quantizer in quantizers:
            quantizer.calibrating = True
        try:
            for inputs, _ in take_batches(data.train, CALIBRATION_BATCH_SIZE, self.config.num_calibration_batches,
                                          seed=self.config.seed):
                model(inputs.to(parameter.device))
        finally:
            for quantizer in quantizers:
                quantizer.calibrating = False
            model.train(was_training)

    def on_step(self, model: nn.Module, step: int) -> None:
        pass  # weights are re-quantized every forward and ranges move in the forward: nothing to re-apply

    def finalize(self, model: nn.Module) -> nn.Module:
        """The fake-quantized layers replaced in place by frozen ones (dequantized weights on their grid, fixed
        activation ranges): same outputs as the QAT model in eval mode; returns ``model``."""
        return freeze_(model)

    def packed(self, model: nn.Module) -> dict[str, PackedTensor]:
        """Every quantized weight of the finalized model as ``PackedTensor.integer`` (its bits per code, one scale
        and zero point per output channel or per tensor)."""
        if any(isinstance(m, FAKE_QUANT_LAYERS) for m in model.modules()):
            # its weights are still float: packing nothing would silently store them all dense
            raise ModelError("uniform_quantization: packed() takes the finalized model; call finalize(model) first")
        return packed_weights(model)

    # ---- per-layer search

    def search_space(self, model: nn.Module, input_shape: tuple[int, int, int], search: SearchConfig,
                     latency: LatencySource | None = None) -> PerLayerSpace | None:
        """Bits per quantized layer in [min_bits, max_bits] under ``weight_bits`` per weight on average (auto
        mode); None in the other modes."""
        refuse_latency_budget(search, "uniform_quantization", "its per-layer bits change the stored size, not the "
                              "speed of a CPU runtime (which computes 8-bit or float); it keeps its own budget, the "
                              "average bits (learner.options.weight_bits)")
        if self.config.mode != PerLayerMode.AUTO:
            return None
        layers = self._layers(model, input_shape)
        names = tuple(name for name, _ in layers)
        budget = WeightBitsBudget(self.config.weight_bits / FP32_BITS,
                                  tuple(layer.weight.numel() for _, layer in layers),
                                  min_bits=self.config.min_bits, max_bits=self.config.max_bits)
        return PerLayerSpace(self.searched_field, names, low=float(self.config.min_bits),
                             high=float(self.config.max_bits), budget=budget,
                             features=layer_features(model, input_shape, names), label="bits")
