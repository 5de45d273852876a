"""Trained codebooks (pf_ray.ops.codebook): initialisation, nearest codes, centroid gradients, packed storage,
zeros kept; hand-computed numerics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pf_ray.errors import ModelError
from pf_ray.export.packed import pack_state_dict, read_packed, write_packed
from pf_ray.ops.codebook import (
    CodebookWeight,
    codebook_of_values,
    codebook_quantize_,
    fit_codebook,
    init_centroids,
    nearest_codes,
    quantize,
)


def _close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Initialisation


def test_quantile_init_takes_the_midpoints_of_equal_count_slices():
    # 2 bits: quantiles 1/8, 3/8, 5/8, 7/8 of 0..7; position q * (8 - 1) = 0.875, 2.625, 4.375, 6.125, and
    # between consecutive integers the linear interpolation is the position itself
    centroids = init_centroids(torch.arange(8.0), 2, init="quantile")
    _close(centroids, [[0.875, 2.625, 4.375, 6.125]])


def test_linear_init_spaces_the_centroids_evenly_over_min_max():
    # [-1, 3] in 3 equal steps of 4/3: -1, 1/3, 5/3, 3
    centroids = init_centroids(torch.tensor([0.5, -1.0, 3.0]), 2, init="linear")
    _close(centroids, [[-1.0, 1 / 3, 5 / 3, 3.0]])


def test_kmeans_finds_the_two_clusters():
    # quantile start 0.075, 0.925 (the 1/4 and 3/4 quantiles); Lloyd: {0, 0.1} -> 0.05, {0.9, 1.0} -> 0.95
    centroids = init_centroids(torch.tensor([0.0, 0.1, 0.9, 1.0]), 1, init="kmeans")
    _close(centroids, [[0.05, 0.95]])


def test_kmeans_moves_away_from_its_quantile_start():
    # [0, 1, 2, 10] at 1 bit: quantile start 0.75 (1/4 quantile, position 0.75) and 4.0 (position 2.25:
    # 2 + 0.25 * 8). Lloyd: 0, 1 and 2 (|2 - 0.75| < |2 - 4|) -> mean 1; 10 -> 10; stable.
    weight = torch.tensor([0.0, 1.0, 2.0, 10.0])
    _close(init_centroids(weight, 1, init="quantile"), [[0.75, 4.0]])
    _close(init_centroids(weight, 1, init="kmeans"), [[1.0, 10.0]])
    # without Lloyd steps k-means is its quantile start
    _close(init_centroids(weight, 1, init="kmeans", kmeans_iterations=0), [[0.75, 4.0]])


def test_buckets_get_their_own_codebooks_and_a_partial_last_bucket_is_fitted_alone():
    weight = torch.tensor([0.0, 0.1, 0.9, 1.0, 10.0, 10.2, 20.0, 20.4, 5.0, 7.0])
    centroids = init_centroids(weight, 1, bucket_size=4)
    # bucket 0 as above; bucket 1 {10, 10.2} {20, 20.4}; bucket 2 holds only 5 and 7 (the padding is ignored)
    _close(centroids, [[0.05, 0.95], [10.1, 20.2], [5.0, 7.0]])
    codebook = fit_codebook(weight, 1, bucket_size=4, keep_zeros=False)  # 0.0 is an ordinary weight here
    _close(codebook.values(), [0.05, 0.05, 0.95, 0.95, 10.1, 10.1, 20.2, 20.2, 5.0, 7.0])


def test_a_codebook_has_2_to_the_k_values_or_fewer_when_the_layer_has_fewer_weights():
    weight = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    for bits in (1, 3, 4):
        for init in ("kmeans", "quantile", "linear"):
            assert fit_codebook(weight, bits, init=init).values().unique().numel() == 2**bits
    # 3 weights, 4 centroids: quantile start 0.25, 0.75, 1.25, 1.75; Lloyd: 0 -> c0, 1 (exactly between
    # 0.75 and 1.25: the smaller) -> c1, 2 -> c3, so c0 = 0, c1 = 1, c3 = 2 and c2 (empty) stays at 1.25.
    codebook = fit_codebook(torch.tensor([2.0, 0.0, 1.0]), 2, keep_zeros=False)
    _close(codebook.centroids, [[0.0, 1.0, 1.25, 2.0]])
    _close(codebook.values(), [2.0, 0.0, 1.0])  # 3 distinct values: each weight is its own centroid


def test_nearest_codes_break_ties_toward_the_smaller_centroid():
    centroids = torch.tensor([[1.0, -1.0, 0.0]])  # unsorted on purpose
    codes = nearest_codes(torch.tensor([-2.0, -0.5, 0.2, 0.5, 9.0]), centroids)
    assert codes.tolist() == [1, 1, 2, 2, 0]  # -0.5 and 0.5 lie on midpoints


# --------------------------------------------------------------------------------------------------------------
# Gradients


def _six_weights() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.tensor([[-0.9, 0.1, 0.2], [1.1, 1.8, -1.2]], requires_grad=True)
    centroids = torch.tensor([[-1.0, 0.0, 1.0, 2.0]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # dL/d(quantized weight) for L = sum(g * w_q)
    return weight, centroids, upstream


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    weight, centroids, upstream = _six_weights()
    codes = nearest_codes(weight, centroids)
    assert codes.tolist() == [[0, 1, 1], [2, 3, 0]]  # -0.9->-1, 0.1->0, 0.2->0, 1.1->1, 1.8->2, -1.2->-1
    quantized = quantize(weight, centroids, codes)
    _close(quantized.detach(), [[-1.0, 0.0, 0.0], [1.0, 2.0, -1.0]])
    (quantized * upstream).sum().backward()
    # c0 <- weights 0 and 5: 1 + 6; c1 <- weights 1, 2: 2 + 3; c2 <- weight 3: 4; c3 <- weight 4: 5
    _close(centroids.grad, [[7.0, 5.0, 4.0, 5.0]])
    _close(weight.grad, upstream.tolist())  # straight-through


def test_mean_centroid_gradient_divides_by_the_cluster_size_and_a_mask_cuts_gradients():
    weight, centroids, upstream = _six_weights()
    mask = torch.tensor([[True, True, False], [True, True, True]])  # weight 2 (0.2) is a pruned zero
    quantized = quantize(weight, centroids, nearest_codes(weight, centroids), mask=mask, centroid_gradient="mean")
    _close(quantized.detach(), [[-1.0, 0.0, 0.0], [1.0, 2.0, -1.0]])
    (quantized * upstream).sum().backward()
    # c0: (1 + 6) / 2; c1: weight 1 alone now, 2 / 1; c2: 4 / 1; c3: 5 / 1
    _close(centroids.grad, [[3.5, 2.0, 4.0, 5.0]])
    _close(weight.grad, [[1.0, 2.0, 0.0], [4.0, 5.0, 6.0]])


@pytest.mark.parametrize("optimize", ["weights", "centroids", "both"])
def test_optimize_chooses_what_trains_and_whether_the_assignment_follows_the_weights(optimize):
    torch.manual_seed(0)
    layer = nn.Linear(4, 8, bias=False)
    weight = layer.weight.detach().clone()
    codebook = CodebookWeight(layer.weight, 2, optimize=optimize, centroid_gradient="sum")
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", codebook)
    original = layer.parametrizations.weight.original
    if optimize == "centroids":
        original.requires_grad_(False)
        assert codebook.codes is not None  # fixed by the clustering
    else:
        assert codebook.codes is None  # re-assigned every forward
    centroids = codebook.centroids.detach().clone()
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    layer(torch.ones(2, 4)).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(original, weight) == (optimize == "centroids")
    assert torch.equal(codebook.centroids.detach(), centroids) == (optimize == "weights")
    # whatever trained, the layer still holds only its 4 centroids
    assert set(layer.weight.detach().unique().tolist()) <= set(codebook.centroids.detach().flatten().tolist())
    if optimize == "weights":  # move a weight across a midpoint: its code follows
        with torch.no_grad():
            original[0, 0] = centroids.max() + 1.0
        assert layer.weight[0, 0].item() == centroids.max().item()


# --------------------------------------------------------------------------------------------------------------
# Storage


def test_packed_codebook_bytes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(10, 7)  # 70 weights
    model = nn.Sequential(layer)
    packed = codebook_quantize_(model, {"0": 3})
    # 3-bit codes: ceil(70 * 3 / 8) = 27 bytes; one table of 2^3 float32: 32 bytes
    assert packed["0.weight"].nbytes == 27 + 32
    assert layer.weight.unique().numel() == 8
    torch.testing.assert_close(torch.from_numpy(packed["0.weight"].decode()), layer.weight.detach(), rtol=0, atol=0)
    # buckets of 32: 3 codebooks (32, 32, 6 weights): 27 + 3 * 32 bytes
    bucketed = codebook_quantize_(copy.deepcopy(model), {"0": 3}, bucket_size=32)
    assert bucketed["0.weight"].nbytes == 27 + 3 * 32
    # the whole model through a .pfpack file
    path = tmp_path / "model.pfpack"
    write_packed(path, pack_state_dict(model.state_dict(), packed))
    state, _ = read_packed(path)
    restored = nn.Sequential(nn.Linear(10, 7))
    restored.load_state_dict(state)
    inputs = torch.randn(4, 10)
    torch.testing.assert_close(restored(inputs), model(inputs))


def test_keep_zeros_fits_the_non_zeros_and_stores_the_zeros_as_a_mask():
    weight = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.9, 1.0, 0.0, 0.0])
    # non-zeros 0.1, 0.9, 1.0: quantile start 0.5, 0.95; Lloyd: 0.1 -> 0.1, {0.9, 1.0} -> 0.95
    sparse = fit_codebook(weight, 1, keep_zeros=True)
    _close(sparse.values(), [0.0, 0.0, 0.1, 0.0, 0.95, 0.95, 0.0, 0.0])
    # 1-byte mask + ceil(3 * 1 / 8) = 1 byte of codes + 2 float32 centroids
    assert sparse.pack().nbytes == 1 + 1 + 8
    # zeros as ordinary weights: the cluster {0 x 5, 0.1} has mean 0.1 / 6, so every zero becomes 0.0167
    dense = fit_codebook(weight, 1, keep_zeros=False)
    _close(dense.values(), [1 / 60, 1 / 60, 1 / 60, 1 / 60, 0.95, 0.95, 1 / 60, 1 / 60])


def test_a_90_percent_sparse_layer_with_a_4_bit_codebook_stays_sparse_and_tiny():
    torch.manual_seed(0)
    layer = nn.Linear(100, 100, bias=False)
    with torch.no_grad():  # magnitude pruning to exactly 90% zeros (what weight sparsification leaves)
        threshold = layer.weight.abs().flatten().kthvalue(9000).values
        layer.weight[layer.weight.abs() <= threshold] = 0.0
    zeros = layer.weight == 0
    assert int(zeros.sum()) == 9000
    packed = codebook_quantize_(nn.Sequential(layer), {"0": 4}, keep_zeros=True)
    assert torch.equal(layer.weight == 0, zeros)  # zeros stay zeros, non-zeros stay non-zero
    assert layer.weight[~zeros].unique().numel() == 16
    # mask 10000 / 8 = 1250 bytes + 1000 non-zeros * 4 bits = 500 bytes + 16 * 4 = 64 bytes, vs 40000 dense
    assert packed["0.weight"].nbytes == 1250 + 500 + 64
    assert np.array_equal(packed["0.weight"].decode(), layer.weight.detach().numpy())


def test_codebook_of_values_recovers_a_quantized_tensor_and_rejects_others():
    values = torch.tensor([[0.5, -1.0, 0.0], [0.5, 2.0, -1.0]])  # 3 non-zero distinct values, one zero
    codebook = codebook_of_values(values, 2)
    _close(codebook.centroids, [[-1.0, 0.5, 2.0, 2.0]])  # ascending, padded with the largest
    assert codebook.mask is not None and not codebook.mask[0, 2]
    torch.testing.assert_close(codebook.values(), values, rtol=0, atol=0)
    with pytest.raises(ModelError, match="holds 3 distinct values; 1 bits index at most 2"):
        codebook_of_values(values, 1)
