"""Patch scores -> anomaly maps (docs/ALGORITHM.md section 5), and maps back onto the input image.

Map in the model frame: the h x w patch-score grid is bilinearly upsampled to the
model's input size S and smoothed with a Gaussian (sigma = 4 pixels, truncated at
4 sigma, reflected borders -- scipy.ndimage.gaussian_filter's defaults, which the
PatchCore / SoftPatch reference code uses).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MAP_SIGMA = 4.0


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius int(truncate * sigma + 0.5) (scipy's rule)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    taps = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return taps / taps.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float = MAP_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] maps, reflected borders (scipy mode 'reflect')."""
    if sigma <= 0:
        return maps
    taps = gaussian_kernel1d(sigma, device=maps.device)
    radius = (taps.numel() - 1) // 2
    x = maps.unsqueeze(1)  # [B,1,H,W]
    # scipy's 'reflect' repeats the edge sample (d c b a | a b c d), torch's 'reflect'
    # does not; build it by hand so maps match the reference implementation, and
    # repeat reflection when the radius exceeds the map size.
    x = _symmetric_pad(x, radius, dim=3)
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    x = _symmetric_pad(x, radius, dim=2)
    x = F.conv2d(x, taps.view(1, 1, -1, 1))
    return x.squeeze(1)


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    idx = torch.arange(-radius, n + radius, device=x.device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    idx = torch.where(idx >= n, period - 1 - idx, idx)
    return x.index_select(dim, idx)


def patch_scores_to_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = MAP_SIGMA) -> torch.Tensor:
    """[B, h, w] patch scores -> [B, H, W] anomaly maps (bilinear upsample, Gaussian blur)."""
    up = F.interpolate(patch_scores.unsqueeze(1).float(), size=tuple(size), mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)


def _centre_offset(length: int, crop: int) -> int:
    return int(round((length - crop) / 2.0))  # same rounding as data.images._centre_box


def map_to_input_size(
    amap: np.ndarray, input_size: tuple[int, int], resize: int | None, crop: int | None,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Undo resize + centre crop: a [S, S] model-frame map -> [H, W] on the original image
    (or rendered at ``out_size``, e.g. a downscaled copy of a huge image: same geometry,
    memory independent of the original's size).

    The region the crop cut away has no scores; it is filled by repeating the map's
    border values (no artificial edge of zeros), then the resize is undone bilinearly.
    """
    height, width = (int(v) for v in input_size)
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    # the frame before cropping: resize x resize, or the original size when resize is None
    frame_h, frame_w = (resize, resize) if resize is not None else (height, width)
    if crop is not None:
        top, left = _centre_offset(frame_h, crop), _centre_offset(frame_w, crop)
        pad = (left, frame_w - crop - left, top, frame_h - crop - top)
        if any(p > 0 for p in pad):
            t = F.pad(t, pad, mode="replicate")
    target = (height, width) if out_size is None else tuple(int(v) for v in out_size)
    if t.shape[-2:] != target:
        t = F.interpolate(t, size=target, mode="bilinear", align_corners=False)
    return t[0, 0].numpy()


def image_scores_from_patches(patch_scores: torch.Tensor) -> torch.Tensor:
    """[B, h, w] -> [B]: the largest patch score of each image (PatchCore / SoftPatch)."""
    return patch_scores.flatten(1).amax(dim=1)


def top_fraction_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """[B, P] -> [B]: mean of each row's largest ceil(fraction * P) values (at least one)."""
    count = max(1, int(math.ceil(fraction * values.shape[1])))
    return values.topk(count, dim=1).values.mean(dim=1)
