"""The BEiT vision transformer, top to bottom as in the paper's figure.

image ─► patch embed ─► [mask token blend] ─► [cls] + patches (+ abs pos) ─► blocks (+ rel-pos bias)
      ─► norm ─► lm_head on masked positions             (masked image modeling, pretraining)
      ─► mean of patch tokens ─► fc_norm ─► head          (classification, fine-tuning)

Parameter names follow the official code (microsoft/unilm `beit/`), which timm shares, so official and
timm checkpoints load with no key mapping: `blocks.i.attn.qkv.weight`, `q_bias`, `v_bias`, `gamma_1`,
`rel_pos_bias.relative_position_bias_table`, `mask_token`, `lm_head`, `fc_norm`, `head`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def trunc_normal_(t: torch.Tensor, std: float, trunc: str) -> torch.Tensor:
    # The official pretraining model truncates at ±1σ (effective std ≈ 0.54·σ); its fine-tuning model,
    # timm and OpenMMLab use absolute bounds ±2, which for σ = 0.02 is a plain normal.
    bound = std if trunc == "sigma" else 2.0
    return nn.init.trunc_normal_(t, std=std, a=-bound, b=bound)


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """Index into a rel-pos table for every (query, key) pair of `[cls] + patches`. Returns [N+1, N+1].

    Patch pairs use (dy + gh−1)·(2gw−1) + (dx + gw−1); the 3 extra slots at the end of the table are
    cls→patch, patch→cls and cls→cls, in the official order.
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
    num_rel = rel_pos_table_size(grid)
    index = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)
    index[0, :] = num_rel - 3  # cls as query
    index[:, 0] = num_rel - 2  # cls as key
    index[0, 0] = num_rel - 1
    return index


def rel_pos_table_size(grid: tuple[int, int]) -> int:
    """Rows of a rel-pos table: every (dy, dx) of the grid plus the 3 cls rows."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def lookup_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[num_rel, H] table -> [H, N+1, N+1] additive attention bias."""
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.in_chans:  # a channel mismatch is not fixed by resizing: say so, not img_size
            raise ValueError(
                f"expected images with {self.in_chans} channel(s), got {C} (shape {list(x.shape)}); give the model "
                f"{self.in_chans}-channel images (data.in_chans={self.in_chans}: grey images are converted to "
                f"{'RGB' if self.in_chans == 3 else 'grey'} on load), or use a model built with in_chans={C}")
        if (H, W) != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images of shape [B, {self.in_chans}, {self.img_size}, {self.img_size}], got "
                f"{list(x.shape)}; the position tables are sized for {self.img_size} px — build the model "
                f"with img_size={H} (checkpoints are resized on load) or resize the images"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class RelativePositionBias(nn.Module):
    """One table shared by all layers (pretraining): computed once per forward, passed to every block."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rel_pos_table_size(grid), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        return lookup_bias(self.relative_position_bias_table, self.relative_position_index)  # [H, N+1, N+1]


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        # Fused qkv without bias, plus separate q and v biases: BEiT has no key bias (it would cancel in
        # the softmax anyway), and the official checkpoints store exactly these three tensors.
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if grid is not None:  # one table per layer (fine-tuning)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rel_pos_table_size(grid), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> q, k, v stacked: [3, B, H, N, hd]."""
        B, N, D = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3D]
        return qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def _bias(self, shared_bias: torch.Tensor | None) -> torch.Tensor | None:
        """The additive attention bias [H, N, N]: the shared table's, this layer's own, or their sum."""
        if self.relative_position_bias_table is None:
            return shared_bias
        own = lookup_bias(self.relative_position_bias_table, self.relative_position_index)
        return own if shared_bias is None else shared_bias + own

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self._qkv(x)  # each [B, H, N, hd]
        attn_bias = self._bias(shared_bias)
        if attn_bias is not None:
            attn_bias = attn_bias.unsqueeze(0).to(q.dtype)  # [1, H, N, N]; SDPA wants the query dtype
        # SDPA's default scale is head_dim**-0.5, as in the official code.
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0
        )  # [B, H, N, hd]
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))

    def attention_probs(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax weights `forward` applies, [B, H, N, N], built explicitly (SDPA never materialises
        them): for drawing where tokens attend."""
        q, k, _ = self._qkv(x)
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # [B, H, N, N]
        bias = self._bias(shared_bias)
        return (logits if bias is None else logits + bias).softmax(-1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        # The same probability as a tensor, for torch.compile: `bernoulli_(float)` bakes the float into the
        # graph, so per-block compilation recompiled once per block's rate and stopped at dynamo's limit of 8.
        self.register_buffer("keep_prob", torch.tensor(1.0 - p), persistent=False)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        shape = (x.shape[0], *([1] * (x.ndim - 1)))  # one draw per sample
        if torch.compiler.is_compiling():
            keep = torch.bernoulli(self.keep_prob.to(x.dtype).expand(shape))
        else:  # eager keeps timm's exact random stream
            keep = x.new_empty(shape).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, init_values, grid, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, grid)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        # LayerScale: per-channel residual scale, 0.1 for base and 1e-5 for large (0 disables it).
        if init_values:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, shared_bias=None):  # [B, N+1, D]
        a = self.attn(self.norm1(x), shared_bias)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)


class Intermediates(NamedTuple):
    """What `Beit.forward_intermediates` returns."""

    tokens: torch.Tensor  # [B, N+1, D]: the final norm of the last block run
    outputs: list[torch.Tensor]  # each [B, N+1, D]: the raw output of each block asked for, in block order
    attentions: list[torch.Tensor]  # each [B, H, N+1, N+1]: those blocks' attention probabilities (if asked)


class Beit(nn.Module):
    """BEiT ViT. With `vocab_size > 0` it is the masked-image-modeling model (`lm_head`), with
    `num_classes > 0` a classifier; `use_mean_pooling` picks mean-of-patches + `fc_norm` over the cls token.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        vocab_size=0,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        init_values=0.1,
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=False,
        use_mask_token=False,
        use_mean_pooling=True,
        init_std=0.02,
        init_trunc="abs",
        head_init_scale=0.001,
        layer_norm_eps=1e-6,
    ):
        super().__init__()
        if use_rel_pos_bias and use_shared_rel_pos_bias:
            raise ValueError("use_rel_pos_bias (per layer) and use_shared_rel_pos_bias are exclusive")
        if vocab_size and not use_mask_token:
            raise ValueError("a masked-image-modeling model (vocab_size > 0) needs use_mask_token=True")
        self.num_classes, self.vocab_size = num_classes, vocab_size
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.init_std, self.init_trunc = init_std, init_trunc
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if use_shared_rel_pos_bias else None

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], init_values,
                  grid if use_rel_pos_bias else None, layer_norm_eps)
            for i in range(depth)
        )
        self.use_mean_pooling = use_mean_pooling
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.lm_head = nn.Linear(embed_dim, vocab_size) if vocab_size > 0 else None
        self._init_weights(head_init_scale)

    # ---------------------------------------------------------------- init (official recipe)
    def _init_weights(self, head_init_scale: float):
        std, trunc = self.init_std, self.init_trunc
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std, trunc)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std, trunc)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Rescale the residual-branch outputs by 1/sqrt(2·layer) (from XLM-E, unilm#949) so the residual
        # stream's variance does not grow with depth at init.
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
            if isinstance(self.head, nn.Linear):  # a tiny head keeps early fine-tuning gradients sane
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    # ---------------------------------------------------------------- uniform backbone interface
    @property
    def grid(self) -> tuple[int, int]:
        return self.patch_embed.grid

    def no_weight_decay(self) -> set[str]:
        # Official: only these two. mask_token and rel-pos tables are decayed (configurable in the optimizer).
        return {"pos_embed", "cls_token"}

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, everything else on top."""
        if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1  # shared rel_pos_bias, norm, fc_norm, head, lm_head

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def _run_block(self, blk, x, shared_bias):
        if self.grad_checkpointing and self.training:
            return checkpoint(blk, x, shared_bias, use_reentrant=False)
        return blk(x, shared_bias)

    def embed(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, N, D]
        B, N, _ = x.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask_token; build it with use_mask_token=True")
            # The mask token replaces the patch embedding *before* any position information is added,
            # so a masked position still knows where it is.
            w = bool_masked_pos.reshape(B, N, 1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # [B, N+1, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Sequence[int] | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        attention: bool = False,
        stop_early: bool = False,
        output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Intermediates:
        """The one block loop (after timm's `forward_intermediates`): images [B, C, H, W] through embed and the
        blocks, keeping the raw outputs of the blocks in `indices` (0-based, negative from the end; None = every
        block) and, with `attention`, those blocks' softmax weights. `stop_early` skips the blocks after the
        last one asked for (their output could not change what is returned). `output_fn` maps each kept output
        as soon as its block has run (the segmenter's patch maps): made there, the map's gradient meets the
        next block's in backward in the same order as ever, so gradients stay bitwise those of earlier
        versions. Everything else that runs the blocks (features, MIM, the segmenter's neck, attention maps)
        calls this."""
        take = self._block_indices(indices)
        last = max(take, default=-1) if stop_early else self.depth - 1
        x = self.embed(x, bool_masked_pos)  # [B, N+1, D]
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # once per forward
        outputs, attentions = [], []
        for i, blk in enumerate(self.blocks[: last + 1]):
            if attention and i in take:
                attentions.append(blk.attn.attention_probs(blk.norm1(x), shared_bias))  # [B, H, N+1, N+1]
            x = self._run_block(blk, x, shared_bias)
            if i in take:
                outputs.append(x if output_fn is None else output_fn(x))
        return Intermediates(self.norm(x), outputs, attentions)

    def _block_indices(self, indices: Sequence[int] | None) -> list[int]:
        if indices is None:
            return list(range(self.depth))
        bad = [i for i in indices if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"block indices {bad} are out of range for a model of depth {self.depth}; use 0 .. "
                             f"{self.depth - 1} (or negative indices from the end)")
        return sorted({i % self.depth for i in indices})

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> normalised tokens [B, N+1, D] (norm is Identity with mean pooling)."""
        return self.forward_intermediates(x, (), bool_masked_pos).tokens

    def get_intermediate_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw output of every block, before any final norm (the linear-probe protocol). Each [B, N+1, D]."""
        return self.forward_intermediates(x).outputs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens [B, N+1, D] -> logits [B, num_classes] (or pooled features [B, D] with pre_logits)."""
        x = self.fc_norm(x[:, 1:].mean(1)) if self.fc_norm is not None else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward_mim(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] + mask [B, N] (or [B, gh, gw]) -> logits [num_masked, vocab] at masked positions.

        Only masked positions reach the head, as in the official code (the head never sees visible tokens).
        """
        if self.lm_head is None:
            raise ValueError("this model has no lm_head; use a *_vocab preset or set vocab_size > 0")
        if bool_masked_pos.dtype != torch.bool:  # an int mask would index tokens instead of selecting them
            raise ValueError(f"bool_masked_pos must be a bool tensor (True = masked), got {bool_masked_pos.dtype}; "
                             f"convert a 0/1 mask with mask.bool()")
        x = self.forward_features(x, bool_masked_pos)[:, 1:]  # [B, N, D]
        return self.lm_head(x[bool_masked_pos.flatten(1)])  # [num_masked, vocab]

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        if bool_masked_pos is not None:
            return self.forward_mim(x, bool_masked_pos)
        return self.forward_head(self.forward_features(x))
