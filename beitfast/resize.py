"""Resizing a checkpoint's position parameters for another patch grid (another image size).

* :func:`resize_rel_pos_bias_table`: the relative position bias table. By default as the official
  BEiT fine-tuning code does (classification and segmentation alike): the offsets of the old table are
  placed on a geometric-progression grid that stretches the large offsets and keeps the small ones
  nearly in place, and each head is resampled at the new integer offsets by the cubic spline through
  the old values; the three cls rows are kept. ``method="bicubic"`` resamples the offsets as an image
  instead (``F.interpolate``), a plainer choice the official authors found to degrade ADE20K.
* :func:`resize_pos_embed`: the absolute position embedding, bicubic as the official code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .relative_position import num_relative_positions

__all__ = ["RESIZE_METHODS", "resize_rel_pos_bias_table", "resize_pos_embed", "geometric_offsets"]

RESIZE_METHODS = ("geometric", "bicubic")


def grid_from_table_rows(rows: int) -> tuple[int, int] | None:
    """The square patch grid of a bias table with ``rows`` rows, or None if there is none."""
    side = math.isqrt(max(rows - 3, 0))
    if side * side != rows - 3 or side % 2 == 0:
        return None
    return ((side + 1) // 2,) * 2


def square_grid(num_patches: int, what: str) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{what}: {num_patches} patches is not a square grid; pass a config with img_size")
    return (side, side)


def resize_rel_pos_bias_table(
    table: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
    method: str = "geometric",
) -> torch.Tensor:
    """A ``[(2Wh-1)(2Ww-1) + 3, H]`` bias table for another patch grid; the last three rows (cls->token,
    token->cls, cls->cls) are kept. ``old_grid`` defaults to the square grid the row count implies.

    ``method="geometric"`` (default): the official fine-tuning resize (see :func:`geometric_offsets`),
    per head the not-a-knot cubic spline through the old offsets evaluated at the new ones, which is
    what the official call of SciPy's removed ``interp2d(kind="cubic")`` computes (a FITPACK
    interpolating spline, s=0, whose evaluation clamps points beyond the outermost node to it).
    Computed in float64 and returned in the table's dtype. Each axis is resized on its own (the
    official code handles square grids only); an axis whose size does not change is kept.

    ``method="bicubic"``: the offsets resampled as an image by ``F.interpolate`` (bicubic,
    ``align_corners=False``: offset 0 stays at the centre).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize_rel_pos_bias_table: method must be one of {RESIZE_METHODS}, got {method!r}")
    if old_grid is None:
        old_grid = grid_from_table_rows(table.shape[0])
        if old_grid is None:
            raise ValueError(
                f"resize_rel_pos_bias_table: {table.shape[0]} rows is not (2G-1)^2 + 3 for a square grid; "
                "pass old_grid"
            )
    if table.shape[0] != num_relative_positions(old_grid):
        raise ValueError(
            f"resize_rel_pos_bias_table: table has {table.shape[0]} rows, grid {old_grid} needs "
            f"{num_relative_positions(old_grid)}"
        )
    if tuple(new_grid) == tuple(old_grid):
        return table
    heads = table.shape[1]
    old_hw = (2 * old_grid[0] - 1, 2 * old_grid[1] - 1)
    new_hw = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    offsets = table[:-3].reshape(*old_hw, heads).permute(2, 0, 1)
    if method == "bicubic":
        resized = _bicubic(offsets.unsqueeze(0), new_hw).squeeze(0)
    else:
        rows = _axis_resampling(old_hw[0], new_hw[0])
        cols = _axis_resampling(old_hw[1], new_hw[1])
        resized = (rows @ offsets.double() @ cols.T).to(table.dtype)
    return torch.cat([resized.permute(1, 2, 0).reshape(-1, heads), table[-3:]], dim=0)


def geometric_offsets(old_span: int, new_span: int) -> torch.Tensor:
    """Where the official resize places the ``old_span`` (odd) offsets of one axis of the old table
    when the new table has ``new_span`` offsets: ``0, +-1, +-(1 + q), +-(1 + q + q^2), ...``, the ratio
    q in [1.01, 1.5] chosen by bisection (to a 1e-6 bracket) so that the largest old offset lands on
    the largest new one, ``new_span // 2``. As in the official code, q is the last midpoint tried."""
    half, target = old_span // 2, new_span // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2.0
        if (1.0 - q ** half) / (1.0 - q) > target:  # the sum 1 + q + ... + q^(half-1)
            high = q
        else:
            low = q
    distances, distance = [], 1.0
    for i in range(half):
        distances.append(distance)
        distance += q ** (i + 1)
    positive = torch.tensor(distances, dtype=torch.float64)
    return torch.cat([-positive.flip(0), positive.new_zeros(1), positive])


def _axis_resampling(old_span: int, new_span: int) -> torch.Tensor:
    """The float64 ``[new_span, old_span]`` matrix taking one axis of the old offsets to the new."""
    if old_span == new_span:
        return torch.eye(old_span, dtype=torch.float64)
    if old_span < 4:
        raise ValueError(
            f"resize_rel_pos_bias_table: the geometric resize fits a cubic spline through at least 4 offsets "
            f"per axis, this table has {old_span} (a grid of {(old_span + 1) // 2}); use method='bicubic'"
        )
    reach = new_span // 2
    new_offsets = torch.arange(-reach, reach + 1, dtype=torch.float64)
    return cubic_spline_matrix(geometric_offsets(old_span, new_span), new_offsets)


def cubic_spline_matrix(nodes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The ``[len(points), len(nodes)]`` matrix of not-a-knot cubic spline interpolation: row i holds
    the weights giving the spline through values at ``nodes`` (increasing, at least 4) at
    ``points[i]``; points beyond the outermost nodes take the value there. Float64.

    The spline is written with its second derivatives M at the nodes (the moment form): continuity of
    the first derivative at the inner nodes, and of the third at the second and the second-last node
    (not-a-knot, the interpolating spline FITPACK builds with s=0), give M linearly in the values.
    """
    x = nodes.to(torch.float64)
    n = x.numel()
    h = x[1:] - x[:-1]
    lhs = torch.zeros(n, n, dtype=torch.float64)  # lhs @ M = rhs @ values
    rhs = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        lhs[i, i - 1], lhs[i, i], lhs[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        rhs[i, i - 1], rhs[i, i], rhs[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    lhs[0, :3] = torch.stack([-h[1], h[0] + h[1], -h[0]])
    lhs[-1, -3:] = torch.stack([-h[-1], h[-2] + h[-1], -h[-2]])
    moments = torch.linalg.solve(lhs, rhs)  # [n, n]: M as a linear map of the values
    p = points.to(torch.float64).clamp(x[0], x[-1])
    left = (torch.searchsorted(x, p, right=True) - 1).clamp(0, n - 2)
    width = h[left]
    a, b = x[left + 1] - p, p - x[left]  # distances to the interval's ends
    eye = torch.eye(n, dtype=torch.float64)
    return (
        eye[left] * (a / width)[:, None] + eye[left + 1] * (b / width)[:, None]
        + moments[left] * ((a ** 3 / width - width * a) / 6)[:, None]
        + moments[left + 1] * ((b ** 3 / width - width * b) / 6)[:, None]
    )


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """A ``[1, 1 + N, D]`` absolute position embedding for another patch grid: the patch part is
    resampled by bicubic interpolation (as the official code), the cls entry kept. ``old_grid``
    defaults to a square grid."""
    num_patches = pos_embed.shape[1] - 1
    old_grid = old_grid or square_grid(num_patches, "resize_pos_embed")
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(
            f"resize_pos_embed: pos_embed has {num_patches} patches, grid {old_grid} has "
            f"{old_grid[0] * old_grid[1]}"
        )
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    resized = _bicubic(patches, tuple(new_grid)).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], resized], dim=1)


def _bicubic(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Interpolated in at least fp32 (bicubic is not implemented for half types on every device).
    work = torch.promote_types(image.dtype, torch.float32)
    out = F.interpolate(image.to(work), size=size, mode="bicubic", align_corners=False)
    return out.to(image.dtype)
