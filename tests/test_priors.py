"""Prior boxes and feature-map geometry (rock_dist.model.priors) against the formula of docs/architecture.md."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rock_dist.errors import ConfigError
from rock_dist.model.priors import (PRIORS_PER_LOCATION, feature_map_sizes, feature_map_steps, make_priors,
                                    num_priors)

SK = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
AR = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]


def test_reference_geometry_at_480x640() -> None:
    assert feature_map_sizes((480, 640)) == [(30, 40), (15, 20), (8, 10), (4, 5), (2, 3), (1, 1)]
    steps = feature_map_steps((480, 640))
    assert [s[0] for s in steps] == [16, 32, 60, 120, 240, 480]
    assert [s[1] for s in steps] == [16, 32, 64, 128, 213, 640]
    assert PRIORS_PER_LOCATION == (4, 6, 6, 6, 4, 4)
    assert num_priors((480, 640)) == 7228
    assert make_priors((480, 640)).shape == (7228, 4)


def _spec_prior(k: int, size: int, i: int, j: int) -> tuple[float, float, float, float]:
    """One prior straight from the wording of docs/architecture.md, with the reference's steps at 480x640."""
    steps_h = [16, 32, 60, 120, 240, 480]
    steps_w = [16, 32, 64, 128, 213, 640]
    fw, fh = 640 / steps_w[k], 480 / steps_h[k]
    s = SK[k]
    sizes = [(s, s), (math.sqrt(s * SK[k + 1]),) * 2]
    for a in AR[k]:
        sizes += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
    w, h = sizes[size]
    return tuple(min(max(v, 0.0), 1.0) for v in ((j + 0.5) / fw, (i + 0.5) / fh, w, h))  # type: ignore[return-value]


@pytest.mark.parametrize("k,size,i,j", [(0, 0, 0, 0), (0, 2, 3, 5), (1, 5, 14, 19), (2, 4, 7, 9), (3, 1, 2, 4),
                                        (4, 1, 1, 2), (4, 3, 0, 0), (5, 3, 0, 0)])
def test_priors_match_formula_at_chosen_indices(k: int, size: int, i: int, j: int) -> None:
    sizes = feature_map_sizes((480, 640))
    index = sum(a * h * w for a, (h, w) in zip(PRIORS_PER_LOCATION[:k], sizes[:k]))
    h, w = sizes[k]
    index += size * h * w + i * w + j  # order: map, size, row, column
    priors = make_priors((480, 640))
    expected = torch.tensor(_spec_prior(k, size, i, j))
    torch.testing.assert_close(priors[index], expected, rtol=0, atol=1e-6)


def test_hand_values() -> None:
    priors = make_priors((480, 640))
    torch.testing.assert_close(priors[0], torch.tensor([8 / 640, 8 / 480, 0.07, 0.07]))
    # Last prior: 1x1 map, transposed aspect-2 box whose height 0.87*sqrt(2) is clamped to 1.
    torch.testing.assert_close(priors[-1], torch.tensor([0.5, 0.5, 0.87 / math.sqrt(2), 1.0]))
    assert priors.min() >= 0 and priors.max() <= 1


def _brute_force(image_size: tuple[int, int]) -> torch.Tensor:
    H, W = image_size
    out = []
    for k, (fh, fw) in enumerate(feature_map_sizes(image_size)):
        step_h, step_w = H // fh, W // fw
        s = SK[k]
        sizes = [(s, s), (math.sqrt(s * SK[k + 1]),) * 2]
        for a in AR[k]:
            sizes += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
        for w, h in sizes:
            for i, j in itertools.product(range(fh), range(fw)):
                out.append([(j + 0.5) * step_w / W, (i + 0.5) * step_h / H, w, h])
    return torch.tensor(out).clamp(0, 1)


@pytest.mark.parametrize("size,expected_maps,expected_count", [
    ((128, 160), [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1), (1, 1)], 496),
    ((300, 300), [(19, 19), (10, 10), (5, 5), (3, 3), (1, 1), (1, 1)], 2256),
    ((512, 512), [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], 4096 + 1536 + 384 + 96 + 16 + 4),
])
def test_other_input_sizes(size: tuple[int, int], expected_maps: list, expected_count: int) -> None:
    assert feature_map_sizes(size) == expected_maps
    assert feature_map_sizes(size, "resnet18") == expected_maps  # every backbone has output stride 16
    assert num_priors(size) == expected_count
    priors = make_priors(size)
    assert priors.shape == (expected_count, 4)
    torch.testing.assert_close(priors, _brute_force(size), rtol=0, atol=1e-6)


def test_unknown_backbone_is_config_error() -> None:
    with pytest.raises(ConfigError, match="backbone"):
        feature_map_sizes((480, 640), "vgg16")
