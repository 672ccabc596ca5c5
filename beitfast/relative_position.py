"""The geometry of the relative position bias: how many rows a table has and which row each token pair
reads. The model, the checkpoint conversions and the resize all need it; it needs none of them."""

from __future__ import annotations

import torch

__all__ = ["num_relative_positions", "relative_position_index"]


def num_relative_positions(grid: tuple[int, int]) -> int:
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """The official ``[1 + N, 1 + N]`` index into a ``[(2Wh-1)(2Ww-1) + 3, H]`` bias table.

    Token pairs index their relative offset; the last three rows are cls->token, token->cls and
    cls->cls.
    """
    wh, ww = grid
    num_rows = num_relative_positions(grid)
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (wh - 1)
    dx = xs[:, None] - xs[None, :] + (ww - 1)
    n = wh * ww
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * ww - 1) + dx
    index[0, :] = num_rows - 3
    index[:, 0] = num_rows - 2
    index[0, 0] = num_rows - 1
    return index
