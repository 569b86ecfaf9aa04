"""BEiT + UperNet semantic segmentation, as in the paper's ADE20K experiment.

image ─► BEiT blocks (per-layer rel-pos bias) ─► tokens of 4 blocks (`out_indices`, 0-based) as patch-grid maps
      ─► neck: maps at strides 4, 8, 16, 32 (transposed convs / identity / max-pool; `neck_scales`)
      ─► UperNet decode head (PPM on the coarsest map + FPN)   ─► logits at stride 4      [B, K, H/4, W/4]
      ─► FCN auxiliary head on the stride-16 map (training only) ─► aux logits at stride 16 [B, K, H/16, W/16]
(strides for the default neck; a preset's `neck_scales` may shift them, as the Fashion-MNIST scenes one does)

This follows the official code (microsoft/unilm `beit/semantic_segmentation`: the backbone with `fpn1..fpn4`,
and mmsegmentation 0.x `UPerHead` / `FCNHead` / `PPM`). Module names are the mmseg ones (`conv`, `bn`,
`psp_modules.i.1`, `bottleneck`, `lateral_convs`, `fpn_convs`, `fpn_bottleneck`, `conv_seg`, `convs`), so the
official ADE20K checkpoints and HF hub files map onto ours by a few renames (beit/convert/segmentation.py).
BatchNorm is plain `nn.BatchNorm2d` here; under torchrun `beit segment` converts it from outside
(`beit.train.distributed.sync_batchnorm`, `seg.sync_bn`) so its statistics are the global batch's, as the
official config's SyncBN.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.models.cnn import SmallUNet, create_cnn
from beit.models.presets import SEG_CNN_PRESETS, SEG_PRESETS
from beit.models.vit import Beit


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, K, h, w] -> [B, K, *size], bilinear with align_corners=False (mmseg `resize` in the official config)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """conv (no bias: BN follows) -> BN -> ReLU; mmcv's `ConvModule` with its parameter names."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class FeaturePyramid(nn.Module):
    """Patch-grid maps [B, D, H/p, W/p] -> four maps, each resized by its factor in `scales`.

    Official (patch 16): fpn1 = ConvT·BN·GELU·ConvT (×4), fpn2 = ConvT (×2), fpn3 = identity, fpn4 = max-pool
    (÷2), i.e. strides 4, 8, 16, 32 of the image. The default keeps those strides for patch 8 (×2, ×1, ÷2, ÷4)
    and patch 4 (×1, ÷2, ÷4, ÷8); a preset may set other factors (powers of 2 from ÷8 to ×4).
    """

    def __init__(self, dim: int, patch_size: int, scales: Sequence[float] | None = None):
        super().__init__()
        if scales is None:
            if patch_size not in (4, 8, 16):
                raise ValueError(f"the default segmentation neck (strides 4..32) needs patch_size 16, 8 or 4, got "
                                 f"{patch_size}; set neck_scales for other patch sizes")
            scales = [patch_size / 4 / 2**i for i in range(4)]
        if len(scales) != 4 or any(s not in (4, 2, 1, 1 / 2, 1 / 4, 1 / 8) for s in scales):
            raise ValueError(f"neck_scales must be 4 factors from (4, 2, 1, 0.5, 0.25, 0.125), got {list(scales)}")
        self.scales = tuple(float(s) for s in scales)
        up = lambda: nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)  # noqa: E731
        ops = {4: lambda: nn.Sequential(up(), nn.BatchNorm2d(dim), nn.GELU(), up()), 2: lambda: nn.Sequential(up()),
               1: nn.Identity}
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = (
            ops[s]() if s >= 1 else nn.MaxPool2d(kernel_size=int(1 / s), stride=int(1 / s)) for s in self.scales)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class UPerHead(nn.Module):
    """UperNet: a pyramid pooling module on the coarsest map, a top-down FPN over all four, fused at the finest."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_ch, channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvModule(in_ch + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(in_ch, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [upsample_logits(ppm(x), x.shape[2:]) for ppm in self.psp_modules]  # each [B, C, h, w]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)] + [self.psp_forward(maps[3])]
        for i in range(3, 0, -1):  # top-down: add the coarser level, upsampled
            laterals[i - 1] = laterals[i - 1] + upsample_logits(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        outs = [outs[0]] + [upsample_logits(x, outs[0].shape[2:]) for x in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))  # [B, K, *maps[0] size]


class FCNHead(nn.Module):
    """Auxiliary head: `num_convs` 3×3 ConvModules, then a 1×1 classifier (mmseg FCNHead, concat_input=False)."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, num_convs: int = 1, dropout=0.1):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"aux_num_convs must be >= 1, got {num_convs}")
        self.convs = nn.Sequential(*(ConvModule(in_ch if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class BeitSegmenter(nn.Module):
    """BEiT backbone (per-layer rel-pos bias, LayerScale, drop path) + multi-scale neck + UperNet (+ FCN aux head).

    `forward(images)` returns decode-head logits [B, K, H/4, W/4] with the default neck (what HF's
    `BeitForSemanticSegmentation` returns as `.logits`); `upsample_logits` brings them to the image size.
    `out_indices` are 0-based block indices, as in the official config ([3, 5, 7, 11] for base).
    """

    def __init__(self, num_classes: int = 150, out_indices: Sequence[int] = (3, 5, 7, 11), channels: int = 768,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), use_aux_head: bool = True, aux_channels: int = 256,
                 aux_num_convs: int = 1, aux_weight: float = 0.4, dropout_ratio: float = 0.1,
                 neck_scales: Sequence[float] | None = None, **backbone_kwargs):
        super().__init__()
        out_indices = [int(i) for i in out_indices]
        depth = backbone_kwargs.get("depth", 12)
        if len(out_indices) != 4 or sorted(set(out_indices)) != out_indices or not 0 <= out_indices[0] \
                or out_indices[-1] >= depth:
            raise ValueError(f"out_indices must be 4 increasing 0-based block indices below depth {depth}, "
                             f"got {out_indices}")
        backbone_kwargs.update(num_classes=0, vocab_size=0, use_mean_pooling=True)
        self.backbone = Beit(**backbone_kwargs)
        self.backbone.fc_norm = None  # no pooling: the neck reads the tokens (keeps DDP free of unused params)
        dim = self.backbone.embed_dim
        self.num_classes, self.aux_weight = num_classes, aux_weight
        self.out_indices, self.channels, self.pool_scales = out_indices, channels, tuple(pool_scales)
        self.img_size, self.in_chans = self.backbone.patch_embed.img_size, self.backbone.patch_embed.in_chans
        self.neck = FeaturePyramid(dim, self.backbone.patch_embed.patch_size, neck_scales)
        self.decode_head = UPerHead(dim, channels, num_classes, pool_scales, dropout_ratio)
        self.auxiliary_head = (FCNHead(dim, aux_channels, num_classes, aux_num_convs, dropout_ratio)
                               if use_aux_head else None)
        self._init_head_weights()

    def _init_head_weights(self):
        # mmcv defaults: kaiming-normal (fan_out, relu) convs in ConvModule; normal(0, 0.01) classifiers;
        # ConvTranspose2d keeps PyTorch's default (the official backbone does not re-initialise it).
        for head in filter(None, (self.decode_head, self.auxiliary_head)):
            for m in head.modules():
                if isinstance(m, ConvModule):
                    nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(head.conv_seg.weight, std=0.01)
            nn.init.zeros_(head.conv_seg.bias)

    # ---------------------------------------------------------------- interface for the trainer
    @property
    def depth(self) -> int:
        return self.backbone.depth

    def no_weight_decay(self) -> set[str]:
        # None: the official segmentation constructor (unilm mmcv_custom LayerDecayOptimizerConstructor) exempts
        # names equal to 'pos_embed' / 'cls_token', but its names carry the "backbone." prefix, so both are
        # decayed there; we match it. 1-D parameters and biases are exempt as everywhere (beit/train/loop.py).
        return set()

    def layer_id(self, name: str) -> int:
        """Backbone params keep their layer ids (embeddings 0, block i -> i + 1); neck and heads sit on top."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name.removeprefix("backbone."))
        return self.depth + 1

    def set_grad_checkpointing(self, enable: bool = True):
        self.backbone.set_grad_checkpointing(enable)

    # ---------------------------------------------------------------- forward
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, C, H, W] -> the neck's four maps [B, D, H/4, W/4] … [B, D, H/32, W/32]."""
        bb = self.backbone
        B, gh, gw = images.shape[0], *bb.grid

        def patch_map(x: torch.Tensor) -> torch.Tensor:  # [B, N+1, D] -> drop cls -> [B, D, gh, gw]
            return x[:, 1:].transpose(1, 2).reshape(B, -1, gh, gw)

        # later blocks cannot change the output: stop after the last one read
        maps = bb.forward_intermediates(images, self.out_indices, stop_early=True, output_fn=patch_map).outputs
        return self.neck(maps)

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, K, H/4, W/4], aux logits [B, K, H/16, W/16] or None without an auxiliary head)."""
        maps = self.features(images)
        aux = self.auxiliary_head(maps[2]) if self.auxiliary_head is not None else None
        return self.decode_head(maps), aux

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.features(images))


# ------------------------------------------------------------------------------------------------ construction
def create_segmenter(name: str, **overrides) -> BeitSegmenter | SmallUNet:
    """Build segmentation preset `name` (beit.models.presets.SEG_PRESETS, or SEG_CNN_PRESETS: a small U-Net) with
    keyword overrides, freshly initialised; `beit.builders.create_segmenter(name, pretrained=...)` loads a backbone or a whole segmenter."""
    if "pretrained" in overrides:
        raise TypeError("beit.models.segmentation.create_segmenter builds the architecture only; load weights with "
                        "beit.builders.create_segmenter(name, pretrained=PATH)")
    if name in SEG_CNN_PRESETS:  # the reference CNN of a segmentation study
        return create_cnn(SmallUNet, name, SEG_CNN_PRESETS[name], overrides)
    if name not in SEG_PRESETS:
        names = [*SEG_PRESETS, *SEG_CNN_PRESETS]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown segmentation preset '{name}'.{hint} Available: {', '.join(names)}")
    return BeitSegmenter(**{**SEG_PRESETS[name], **overrides})
