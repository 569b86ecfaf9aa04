"""Resolution change for BEiT checkpoints, in pure PyTorch (no scipy at run time).

Three operations, all from the official fine-tuning surgery (unilm `beit/run_class_finetuning.py`):

* `resize_rel_pos_table`: the **geometric-grid cubic** resize of a relative-position bias table.
  The official code samples the source table at offsets that grow geometrically away from 0 (ratio q
  found by bisection so the source spans the target's offsets), then evaluates a cubic spline at the
  target's integer offsets with `scipy.interpolate.interp2d(kind='cubic')`. interp2d is gone from
  SciPy ≥ 1.14; on gridded data it fitted FITPACK's interpolating (s = 0) tensor-product cubic spline,
  i.e. a *not-a-knot* cubic spline along each axis, clamping queries to the data range. We build that
  spline as a dense [n_dst, n_src] weight matrix per axis, so the 2-D resize is `Wy @ T @ Wx^T` per head.
  The test compares it with `scipy.interpolate.RectBivariateSpline(kx=3, ky=3, s=0)`.
  Unlike the official code, y and x are handled separately, so non-square grids work.
* `resize_pos_embed`: bicubic resize (`align_corners=False`) of an absolute position embedding, keeping
  the cls slot, as the official code does.
* `expand_shared_rel_pos`: clone the pretraining model's shared table into every layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from beit.models.vit import rel_pos_table_size

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
LAYER_TABLE = "blocks.{}.attn.relative_position_bias_table"
NUM_EXTRA_ROWS = 3  # cls→patch, patch→cls, cls→cls: copied unchanged


def grid_from_table_rows(rows: int) -> tuple[int, int] | None:
    """The square grid whose table has `rows` rows, or None (a non-square grid cannot be inferred)."""
    side = math.isqrt(max(rows - NUM_EXTRA_ROWS, 0))
    if side * side == rows - NUM_EXTRA_ROWS and side % 2 == 1:
        return ((side + 1) // 2, (side + 1) // 2)
    return None


def geometric_ratio(src_size: int, dst_size: int) -> float:
    """The official bisection: q in [1.01, 1.5] with 1 + q + … + q^(src//2 − 1) ≈ dst//2.

    `src_size`, `dst_size` are table side lengths (2·grid − 1). 224→384 (27→47) gives q = 1.090307.
    Kept bit-for-bit (same bounds, same 1e-6 stopping rule, same final midpoint) so the sample positions
    match the official ones. When shrinking, q stays pinned near 1.01 (as officially): the target offsets
    then fall inside the source range and the resize amounts to re-sampling its centre.
    """
    half_src, half_dst = src_size // 2, dst_size // 2
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q**half_src) / (1.0 - q)  # geometric series 1 + q + … + q^(half_src − 1)
        if gp > half_dst:
            right = q
        else:
            left = q
    return q


def source_offsets(src_size: int, dst_size: int) -> torch.Tensor:
    """Positions of the source table's rows along one axis (float64, ascending, length src_size).

    Identity (integer offsets) when the size is unchanged, so an unchanged axis is copied exactly.
    """
    half = src_size // 2
    if src_size == dst_size:
        return torch.arange(-half, half + 1, dtype=torch.float64)
    q = geometric_ratio(src_size, dst_size)
    dis, cur = [], 1.0
    for i in range(half):  # cumulative distances 1, 1+q, 1+q+q², … exactly as the official loop
        dis.append(cur)
        cur += q ** (i + 1)
    return torch.tensor([-d for d in reversed(dis)] + [0.0] + dis, dtype=torch.float64)


def target_offsets(dst_size: int) -> torch.Tensor:
    half = dst_size // 2
    return torch.arange(-half, half + 1, dtype=torch.float64)


def cubic_spline_weights(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Matrix W [len(ts), len(xs)] with spline(ts) = W @ values, for the not-a-knot cubic spline through
    (xs, values) — the curve FITPACK's s=0 cubic fit (interp2d / RectBivariateSpline) produces.

    Queries outside [xs[0], xs[-1]] are clamped to the ends, as FITPACK's evaluator does.
    With fewer than 4 points the not-a-knot spline is the interpolating polynomial (degree n − 1).
    """
    xs, ts = xs.double(), ts.double().clamp(xs[0].item(), xs[-1].item())
    n = xs.numel()
    if n < 4:  # Lagrange basis: polynomial through all points
        w = torch.ones(ts.numel(), n, dtype=torch.float64)
        for j in range(n):
            for k in range(n):
                if k != j:
                    w[:, j] *= (ts - xs[k]) / (xs[j] - xs[k])
        return w
    h = xs[1:] - xs[:-1]
    # Second derivatives M satisfy A @ M = B @ y: continuity of S' at interior points, plus not-a-knot
    # (S''' continuous at xs[1] and xs[-2]) at the two ends.
    A = torch.zeros(n, n, dtype=torch.float64)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        B[i, i - 1], B[i, i], B[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    A[0, 0], A[0, 1], A[0, 2] = h[1], -(h[0] + h[1]), h[0]
    A[-1, -3], A[-1, -2], A[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    M = torch.linalg.solve(A, B)  # [n, n]: second derivatives as linear maps of the values

    seg = (torch.searchsorted(xs, ts, right=True) - 1).clamp(0, n - 2)
    hi = h[seg]
    a = xs[seg + 1] - ts  # distance to the right node
    b = ts - xs[seg]  # distance to the left node
    rows = torch.arange(ts.numel())
    w = torch.zeros(ts.numel(), n, dtype=torch.float64)
    w[rows, seg] += a / hi
    w[rows, seg + 1] += b / hi
    w += (a**3 / (6 * hi) - a * hi / 6)[:, None] * M[seg]
    w += (b**3 / (6 * hi) - b * hi / 6)[:, None] * M[seg + 1]
    return w


def resize_rel_pos_table(
    table: torch.Tensor, dst_grid: tuple[int, int], src_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """[(2·sh−1)(2·sw−1)+3, H] -> [(2·dh−1)(2·dw−1)+3, H] by the geometric-grid cubic method.

    `src_grid` defaults to the square grid implied by the table's size. Returns `table` itself when the
    size is unchanged. Computed in float64, returned in the table's dtype.
    """
    if table.ndim != 2:
        raise ValueError(f"a relative-position table is [rows, num_heads], got shape {list(table.shape)}")
    if src_grid is None:
        src_grid = grid_from_table_rows(table.shape[0])
        if src_grid is None:
            raise ValueError(
                f"cannot infer the patch grid of a relative-position table with {table.shape[0]} rows "
                f"(not (2g−1)²+3 for any g); pass src_grid=(h, w) for a non-square grid"
            )
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if table.shape[0] != rel_pos_table_size(src_grid):
        raise ValueError(
            f"table has {table.shape[0]} rows but grid {src_grid} needs {rel_pos_table_size(src_grid)}"
        )
    if src_grid == dst_grid:
        return table
    (sh, sw), (dh, dw) = [(2 * g[0] - 1, 2 * g[1] - 1) for g in (src_grid, dst_grid)]
    heads = table.shape[1]
    sub = table[:-NUM_EXTRA_ROWS].double().reshape(sh, sw, heads)  # rows: dy (outer), dx (inner)
    wy = cubic_spline_weights(source_offsets(sh, dh), target_offsets(dh))  # [dh, sh]
    wx = cubic_spline_weights(source_offsets(sw, dw), target_offsets(dw))  # [dw, sw]
    out = torch.einsum("ay,yxh,bx->abh", wy, sub, wx).reshape(dh * dw, heads)
    return torch.cat([out.to(table.dtype), table[-NUM_EXTRA_ROWS:]], dim=0)


def resize_pos_embed(
    pos_embed: torch.Tensor,
    dst_grid: tuple[int, int],
    src_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """[1, P + sh·sw, D] -> [1, P + dh·dw, D]: bicubic (align_corners=False, no antialias, as official) on
    the patch part; the P prefix (cls) slots are kept. Returns the input when the grid is unchanged."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = patches.shape[1], patches.shape[2]
    if src_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch slots, not a square grid; pass src_grid=(h, w)")
        src_grid = (side, side)
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid[0] * src_grid[1] != n:
        raise ValueError(f"pos_embed has {n} patch slots but src_grid {src_grid} has {src_grid[0] * src_grid[1]}")
    if src_grid == dst_grid:
        return pos_embed
    grid = patches.float().reshape(-1, src_grid[0], src_grid[1], dim).permute(0, 3, 1, 2)  # fp32: CPU bicubic
    grid = F.interpolate(grid, size=dst_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(-1, dst_grid[0] * dst_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def expand_shared_rel_pos(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Replace the shared table by a clone in each of `depth` layers (fine-tuning starts every layer from
    the pretrained shared bias). Returns a new dict; no-op if there is no shared table."""
    if SHARED_TABLE not in sd:
        return dict(sd)
    out = {k: v for k, v in sd.items() if k != SHARED_TABLE}
    for i in range(depth):
        out[LAYER_TABLE.format(i)] = sd[SHARED_TABLE].clone()
    return out
