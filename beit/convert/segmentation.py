"""Segmenter checkpoints (BEiT + UperNet): our layout, the official mmseg layout and HF `BeitForSemanticSegmentation`.

Three layouts, each a whole-model state dict:
* ours: `backbone.<official BEiT names>`, `neck.fpn{1..4}.*`, `decode_head.*`, `auxiliary_head.*` with mmseg
  module names (`conv`, `bn`, `psp_modules.i.1`, `bottleneck`, `conv_seg`, …; see beit/models/segmentation.py).
* mmseg: the official ADE20K files (unilm `beit/semantic_segmentation`, mmseg 0.x): identical except that the
  neck lives in the backbone (`backbone.fpn1.*`).
* mmseg1: mmsegmentation 1.x's port (OpenMMLab backbone names, `neck.upsample_4x` …); read only.
* hf: the hub layout of `BeitForSemanticSegmentation` (what `save_pretrained` writes): backbone under `beit.`
  (renamed by beit/convert/layouts.py), neck `fpn1.*`/`fpn2.*`, classifiers `classifier` instead of `conv_seg`.
  transformers ≥ 5 in-memory names (`fpn.fpn1.conv_transpose1`, `psp_bottleneck`, `convolution`, …) are read too.

HF's `out_indices` convention differs from the official one: `BeitForSemanticSegmentation` takes
`hidden_states[i - 1]` for each `i` in `config.out_indices`, where `hidden_states[0]` is the embedding output
and `hidden_states[k]` the output of block k − 1 (0-based). So HF index `i` reads block `i − 2`, and the last
block (official base: 11) is out of reach (`i` must be a valid stage index ≤ num_hidden_layers). To export
it exactly we append one all-zero layer (an exact identity: zero LayerScale / zero projections), so block
11 is `hidden_states[12]`, i.e. HF index 13; config.json records it as `beit_identity_layers` (transformers
keeps unknown fields and ignores them) and the reader drops it again. HF's own converter copies the
official indices verbatim, so the hub ADE20K models read blocks [1, 3, 5, 9] (base) / [5, 9, 13, 21]
(large); `segmenter_kwargs_from_hf_config` reproduces HF's behaviour exactly (that is what parity means) and
says so in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from beit.convert.layouts import from_official, rename, to_official, unwrap_state_dict
from beit.convert.runs import resolve_pretrained
from beit.convert.weights import LoadReport, _num_blocks, hf_config_from_state_dict, load_vit, read_checkpoint, write_weights
from beit.models.presets import SEG_PRESETS
from beit.models.segmentation import BeitSegmenter

log = logging.getLogger(__name__)

SEG_LAYOUTS = ("ours", "mmseg", "mmseg1", "hf")

# ------------------------------------------------------------------------------------------------ key maps
# Only the non-backbone keys; the backbone goes through beit/convert/layouts.py.
OURS_TO_MMSEG: list[tuple[str, str]] = [(r"neck\.(fpn\d\..+)", r"backbone.\1")]
MMSEG_TO_OURS: list[tuple[str, str]] = [(r"backbone\.(fpn\d\..+)", r"neck.\1")]
# mmsegmentation 1.x's own port (`configs/beit`, converted by its tools/model_converters/beit2mmseg.py): the
# backbone has OpenMMLab names (`backbone.layers.i.ln1`, `ffn.layers.0.0`, as mmpretrain) and the neck is a
# `Feature2Pyramid`. Read only.
MMSEG1_NECK_TO_OURS: list[tuple[str, str]] = [
    (r"neck\.upsample_4x\.(0|1|3)\.(.+)", r"neck.fpn1.\1.\2"),
    (r"neck\.upsample_2x\.0\.(.+)", r"neck.fpn2.0.\1"),
]
OURS_TO_HF: list[tuple[str, str]] = [
    (r"neck\.(fpn\d\..+)", r"\1"),
    (r"(decode_head|auxiliary_head)\.conv_seg\.(weight|bias)", r"\1.classifier.\2"),
]
HF_TO_OURS: list[tuple[str, str]] = [
    (r"(fpn\d\..+)", r"neck.\1"),
    (r"(decode_head|auxiliary_head)\.classifier\.(weight|bias)", r"\1.conv_seg.\2"),
]
# transformers ≥ 5 in-memory names -> hub names (its conversion mapping for BeitForSemanticSegmentation).
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
HF5_TO_HUB_SEG: list[tuple[str, str]] = [
    (r"fpn\.fpn1\.conv_transpose1\.(weight|bias)", r"fpn1.0.\1"),
    (rf"fpn\.fpn1\.normalization\.{_BN}", r"fpn1.1.\1"),
    (r"fpn\.fpn1\.conv_transpose2\.(weight|bias)", r"fpn1.3.\1"),
    (r"fpn\.fpn2\.(weight|bias)", r"fpn2.0.\1"),
    (r"decode_head\.psp_modules\.blocks\.(\d+)\.conv\.convolution\.weight",
     r"decode_head.psp_modules.\1.1.conv.weight"),
    (rf"decode_head\.psp_modules\.blocks\.(\d+)\.conv\.normalization\.{_BN}", r"decode_head.psp_modules.\1.1.bn.\2"),
    (r"decode_head\.psp_bottleneck\.convolution\.weight", r"decode_head.bottleneck.conv.weight"),
    (rf"decode_head\.psp_bottleneck\.normalization\.{_BN}", r"decode_head.bottleneck.bn.\1"),
    (r"(decode_head|auxiliary_head)\.(.+)\.convolution\.weight", r"\1.\2.conv.weight"),
    (rf"(decode_head|auxiliary_head)\.(.+)\.normalization\.{_BN}", r"\1.\2.bn.\3"),
]
_HEAD_PREFIXES = ("neck.", "decode_head.", "auxiliary_head.")
# config.json field (ignored by transformers) counting the all-zero layers appended on export; the reader drops them.
IDENTITY_LAYERS_KEY = "beit_identity_layers"


def _blocks_past(sd: Mapping[str, torch.Tensor], depth: int) -> list[str]:
    """Keys of backbone blocks at index >= depth (the all-zero identity layers an HF export appends)."""
    return [k for k in sd if (m := re.match(r"backbone\.blocks\.(\d+)\.", k)) and int(m.group(1)) >= depth]


# ------------------------------------------------------------------------------------------------ layouts
def detect_seg_layout(sd: Mapping[str, torch.Tensor]) -> str | None:
    """'ours', 'mmseg', 'mmseg1' or 'hf' for a whole-segmenter state dict; None when it has no decode head (a backbone)."""
    if not any(k.startswith("decode_head.") for k in sd):
        return None
    if any(k.startswith("beit.") for k in sd):
        return "hf"
    if any(k.startswith("backbone.fpn") for k in sd):
        return "mmseg"
    if any(k.startswith("backbone.layers.") for k in sd):
        return "mmseg1"
    return "ours"  # (a neck without weights, e.g. patch 4, makes ours and mmseg the same)


def seg_to_ours(sd: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """A segmenter state dict of `layout` (detected if None) -> our names."""
    layout = layout or detect_seg_layout(sd)
    if layout == "ours":
        return dict(sd)
    if layout == "mmseg":
        return rename(sd, MMSEG_TO_OURS)
    if layout == "mmseg1":
        backbone = to_official({k: v for k, v in sd.items() if k.startswith("backbone.")}, "mmpretrain")
        head = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
        return {**{f"backbone.{k}": v for k, v in backbone.items()}, **rename(head, MMSEG1_NECK_TO_OURS)}
    if layout == "hf":
        head = {k: v for k, v in sd.items() if not k.startswith("beit.")}
        backbone = to_official({k: v for k, v in sd.items() if k.startswith("beit.")}, "hf")
        return {**{f"backbone.{k}": v for k, v in backbone.items()}, **rename(rename(head, HF5_TO_HUB_SEG), HF_TO_OURS)}
    raise ValueError(f"not a segmenter checkpoint layout: {layout!r}; expected one of {SEG_LAYOUTS}")


def seg_from_ours(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our segmenter names -> `layout` (hf: hub names; pad the backbone first with `pad_for_hf`)."""
    if layout == "ours":
        return dict(sd)
    if layout == "mmseg":
        return rename(sd, OURS_TO_MMSEG)
    if layout == "hf":
        backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
        head = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
        return {**from_official(backbone, "hf"), **rename(head, OURS_TO_HF)}
    raise ValueError(f"unknown segmenter layout {layout!r}; expected one of {SEG_LAYOUTS}")


# ------------------------------------------------------------------------------------------------ HF indices
def hf_out_indices(out_indices: Sequence[int], depth: int) -> tuple[list[int], int]:
    """Official 0-based block indices -> (HF `out_indices`, identity layers to append to the HF model)."""
    pad = 1 if max(out_indices) == depth - 1 else 0  # HF cannot read the last block's output otherwise
    return [b + 2 for b in out_indices], pad


def blocks_from_hf_out_indices(hf_indices: Sequence[int], num_layers: int) -> list[int]:
    """HF `out_indices` (read as `hidden_states[i - 1]`, Python indexing) -> 0-based block indices."""
    blocks = []
    for i in hf_indices:
        j = (i - 1) % (num_layers + 1)  # index into hidden_states = (embeddings, block 0, …, block n-1)
        if j == 0:
            raise ValueError(f"HF out_index {i} selects the embedding output (hidden_states[0]), not a block; "
                             f"the BEiT segmenter reads block outputs only")
        blocks.append(j - 1)
    return blocks


def pad_for_hf(sd: Mapping[str, torch.Tensor], depth: int, pad: int) -> dict[str, torch.Tensor]:
    """Append `pad` all-zero blocks to an official-layout backbone (each is exactly the identity)."""
    out = dict(sd)
    for p in range(pad):
        for k, v in sd.items():
            if k.startswith(f"blocks.{depth - 1}."):
                out[k.replace(f"blocks.{depth - 1}.", f"blocks.{depth + p}.", 1)] = torch.zeros_like(v)
    return out


def segmenter_kwargs_from_hf_config(cfg: Mapping) -> dict:
    """An HF `BeitForSemanticSegmentation` config.json -> `BeitSegmenter(**kwargs)` computing the same logits."""
    if cfg.get("auxiliary_concat_input"):
        raise ValueError("HF config auxiliary_concat_input=true is not supported (the official FCN head has it off)")
    n = cfg.get("num_hidden_layers", 12)
    hf_idx = cfg.get("out_indices") or [3, 5, 7, 11]
    blocks = blocks_from_hf_out_indices(hf_idx, n)
    if cfg.get(IDENTITY_LAYERS_KEY, 0) and blocks[-1] >= n - cfg[IDENTITY_LAYERS_KEY]:
        raise ValueError(f"HF config: out_indices {hf_idx} read an appended identity layer ({IDENTITY_LAYERS_KEY})")
    if blocks != sorted(blocks):
        raise ValueError(f"HF out_indices {hf_idx} read blocks {blocks}, not in increasing order")
    if hf_idx in ([3, 5, 7, 11], [7, 11, 15, 23]):
        log.warning("HF out_indices %s read blocks %s (HF takes hidden_states[i-1]); the official model reads "
                    "blocks %s. Built to match HF exactly.", hf_idx, blocks, hf_idx)
    size = cfg.get("image_size", 224)
    heads = cfg.get("num_attention_heads", 12)
    if cfg.get("hidden_size", 768) % heads:
        raise ValueError(f"hidden_size {cfg.get('hidden_size')} is not divisible by num_attention_heads {heads}")
    return dict(
        img_size=size if isinstance(size, int) else size[0], patch_size=cfg.get("patch_size", 16),
        in_chans=cfg.get("num_channels", 3), embed_dim=cfg.get("hidden_size", 768),
        depth=n - cfg.get(IDENTITY_LAYERS_KEY, 0),
        num_heads=heads, mlp_ratio=cfg.get("intermediate_size", 3072) / cfg.get("hidden_size", 768),
        init_values=cfg.get("layer_scale_init_value", 0.1), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        use_abs_pos_emb=cfg.get("use_absolute_position_embeddings", False),
        use_rel_pos_bias=cfg.get("use_relative_position_bias", False),
        use_shared_rel_pos_bias=cfg.get("use_shared_relative_position_bias", False),
        drop_path_rate=cfg.get("drop_path_rate", 0.1),
        num_classes=len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2),
        out_indices=blocks, channels=cfg.get("hidden_size", 768),
        neck_scales=(4, 2, 1, 0.5),  # HF's fpn1..fpn4 at any patch size (ours defaults to strides 4..32)
        pool_scales=tuple(cfg.get("pool_scales", (1, 2, 3, 6))),
        use_aux_head=cfg.get("use_auxiliary_head", True), aux_channels=cfg.get("auxiliary_channels", 256),
        aux_num_convs=cfg.get("auxiliary_num_convs", 1), aux_weight=cfg.get("auxiliary_loss_weight", 0.4),
    )


def hf_seg_config(sd: Mapping[str, torch.Tensor], arch: Mapping) -> dict:
    """config.json for our segmenter state dict `sd` (our names) with architecture `arch` (BeitSegmenter kwargs:
    out_indices, pool_scales, aux_weight, …). Checks what HF's fixed head can express."""
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    dim = backbone["cls_token"].shape[-1]
    patch = backbone["patch_embed.proj.weight"].shape[-1]
    channels = sd["decode_head.conv_seg.weight"].shape[1]
    scales = tuple(arch.get("neck_scales") or (patch / 4 / 2**i for i in range(4)))  # FeaturePyramid's default
    if channels != dim or scales != (4, 2, 1, 0.5):  # HF's neck resizes the patch grid x4, x2, x1, /2 at any patch size
        raise ValueError(f"HF BeitForSemanticSegmentation has a fixed head (neck x4, x2, x1, /2, UperNet "
                         f"channels = hidden_size); this segmenter has patch {patch}, neck {scales}, channels "
                         f"{channels}, hidden {dim}: not representable in HF — convert to mmseg instead")
    hf_idx, pad = hf_out_indices(arch["out_indices"], _num_blocks(backbone))
    cfg = hf_config_from_state_dict(backbone, arch)
    k = sd["decode_head.conv_seg.weight"].shape[0]
    aux = "auxiliary_head.conv_seg.weight" in sd
    cfg.update(
        architectures=["BeitForSemanticSegmentation"], num_hidden_layers=_num_blocks(backbone) + pad,
        out_indices=hf_idx, **{IDENTITY_LAYERS_KEY: pad},
        use_mean_pooling=True,  # BeitModel's own final norm is Identity, as in the official backbone
        pool_scales=list(arch.get("pool_scales", (1, 2, 3, 6))), use_auxiliary_head=aux,
        auxiliary_channels=sd["auxiliary_head.conv_seg.weight"].shape[1] if aux else 256,
        auxiliary_num_convs=len({k2 for k2 in sd if re.match(r"auxiliary_head\.convs\.\d+\.conv\.weight", k2)}) or 1,
        auxiliary_concat_input=False, auxiliary_loss_weight=arch.get("aux_weight", 0.4),
        semantic_loss_ignore_index=255, id2label={str(i): f"LABEL_{i}" for i in range(k)},
        label2id={f"LABEL_{i}": i for i in range(k)},
    )
    return cfg


def to_hf_segmentation(sd: Mapping[str, torch.Tensor], arch: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Our segmenter state dict -> (hub-layout state dict, config.json) for `BeitForSemanticSegmentation`."""
    cfg = hf_seg_config(sd, arch)
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    depth = _num_blocks(backbone)
    backbone = pad_for_hf(backbone, depth, cfg["num_hidden_layers"] - depth)
    heads = {k: v for k, v in sd.items() if k.startswith(_HEAD_PREFIXES)}
    return seg_from_ours({**{f"backbone.{k}": v for k, v in backbone.items()}, **heads}, "hf"), cfg


def save_segmenter_as(sd: Mapping, path: str | os.PathLike, layout: str, arch: Mapping | None = None) -> Path:
    """Write a segmenter state dict (any supported layout) as `layout`: mmseg/ours `.pth` (`{"state_dict"}` /
    `{"model"}`) or `.safetensors`; hf a directory with model.safetensors + config.json (needs `arch`)."""
    ours = seg_to_ours(unwrap_state_dict(sd))
    if layout == "hf":
        if arch is None or "out_indices" not in arch:
            raise ValueError("converting a segmenter to HF needs its out_indices (0-based blocks): pass "
                             "--out-indices 3,5,7,11 or a checkpoint that carries its model config")
        tensors, config = to_hf_segmentation(ours, arch)
        return write_weights(tensors, path, config)
    return write_weights(seg_from_ours(ours, layout), path, wrapper="state_dict" if layout == "mmseg" else "model")


# ------------------------------------------------------------------------------------------------ loading
def _read(path_or_sd) -> tuple[Mapping, dict | None]:
    """(raw checkpoint, HF config.json or None); a run directory resolves to its newest checkpoint."""
    if isinstance(path_or_sd, Mapping):
        return path_or_sd, None
    path = Path(resolve_pretrained(str(path_or_sd)))
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    return read_checkpoint(path), cfg


def load_segmenter(model, path_or_sd, strict_shapes: bool = True):
    """Load what `model.pretrained` names into a segmenter (`model`) and return the `LoadReport`.

    A backbone checkpoint of any layout `beit.convert.load_pretrained` reads (ours, official/timm, HF,
    OpenMMLab; a run directory uses its newest checkpoint) goes into `.backbone` with the fine-tuning
    surgery: a shared rel-pos table is cloned into every layer, tables and abs pos_embed are resized to the
    new grid, lm_head / mask_token / norm are left out (reported as unexpected). A whole-segmenter checkpoint
    (ours, the official mmseg 0.x ADE20K layout, mmsegmentation 1.x's port, an HF `BeitForSemanticSegmentation`
    folder or state dict) loads everything; a classifier (`conv_seg`) of another class count is dropped and stays
    freshly initialised.
    """
    raw, hf_cfg = _read(path_or_sd)
    sd = unwrap_state_dict(raw)
    if not hasattr(model, "backbone"):  # not a ViT (a segmentation study's reference CNN): our checkpoints, exactly
        model.load_state_dict(sd)
        return LoadReport(layout="ours")
    layout = detect_seg_layout(sd)
    if layout is None:  # a backbone: classifier, MIM model, run directory, any layout
        return load_vit(model.backbone, sd, strict_shapes)
    if hf_cfg is not None:
        want = blocks_from_hf_out_indices(hf_cfg.get("out_indices") or [3, 5, 7, 11], hf_cfg["num_hidden_layers"])
        if want != list(model.out_indices):
            raise ValueError(f"the HF config's out_indices {hf_cfg.get('out_indices')} read blocks {want} (HF takes "
                             f"hidden_states[i-1]); the model reads {list(model.out_indices)}: build it with "
                             f"out_indices={want} (and depth >= {want[-1] + 1}) for the same logits")
    ours = seg_to_ours(sd, layout)
    # HF blocks past the model's depth (the identity layers of an export) cannot change the logits.
    dropped = _blocks_past(ours, model.depth) if layout == "hf" else []
    backbone = {k.removeprefix("backbone."): v for k, v in ours.items()
                if k.startswith("backbone.") and k not in dropped}
    report = load_vit(model.backbone, backbone, strict_shapes)
    report.layout, report.dropped = layout, report.dropped + dropped

    heads = {k: v for k, v in ours.items() if not k.startswith("backbone.")}
    model_sd = model.state_dict()
    for key in [k for k in heads if k in model_sd and heads[k].shape != model_sd[k].shape]:
        if key.endswith(("conv_seg.weight", "conv_seg.bias")):  # another dataset's classes: re-initialised
            report.dropped.append(key)
            del heads[key]
            continue
        raise ValueError(f"shape mismatch for '{key}': checkpoint {list(heads[key].shape)} vs model "
                         f"{list(model_sd[key].shape)}: different head channels / embed_dim / aux head settings?")
    result = model.load_state_dict(heads, strict=False)
    report.missing += [k for k in result.missing_keys if not k.startswith("backbone.")]
    report.unexpected += list(result.unexpected_keys)
    if report.missing or report.unexpected:
        log.warning("segmenter checkpoint: missing %s; not used %s", report.missing, report.unexpected)
    return report


load_pretrained_backbone = load_segmenter  # the name `beit segment` and older code use


def load_whole_segmenter(model, path_or_sd, source: str | None = None):
    """A whole segmenter checkpoint (any layout) into `model`, every weight accounted for: a backbone-only
    checkpoint, a weight the checkpoint lacks or a classifier of another class count is a ValueError naming
    `source`. Returns the `LoadReport`."""
    source = source or (str(path_or_sd) if not isinstance(path_or_sd, Mapping) else "the checkpoint")
    report = load_segmenter(model, path_or_sd)
    if report.layout not in SEG_LAYOUTS:
        raise ValueError(f"{source} holds a backbone ({report.layout} layout), not a whole segmenter: train one "
                         f"with `beit segment` (model.pretrained={source}) first")
    unfilled = report.missing + report.mismatched + [k for k in report.dropped if ".conv_seg." in k]
    if unfilled:
        raise ValueError(f"{source} is not a checkpoint of this segmenter: {len(unfilled)} weights not filled, e.g. "
                         f"{unfilled[0]} (another model size, class count or head setting)")
    return report


def segmenter_from_hf(path: str | os.PathLike):
    """Build a BeitSegmenter from an HF `BeitForSemanticSegmentation` folder, with HF's exact logits."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected an HF BeitForSemanticSegmentation folder)")
    model = BeitSegmenter(**segmenter_kwargs_from_hf_config(json.loads(cfg_path.read_text())))
    load_segmenter(model, path)
    return model


def seg_arch_from_checkpoint(raw: Mapping, hf_cfg: Mapping | None = None) -> dict | None:
    """What tensors cannot tell (out_indices, pool_scales, aux_weight): from an HF config.json, or from the
    `config` our training checkpoints carry (a SEG_PRESETS name plus overrides). None if neither is there."""
    if hf_cfg is not None:
        return segmenter_kwargs_from_hf_config(hf_cfg)
    model_cfg = raw.get("config", {}).get("model") if isinstance(raw.get("config"), Mapping) else None
    if not model_cfg:
        return None
    name = model_cfg.get("name")
    if name not in SEG_PRESETS:
        return None
    skip = ("name", "pretrained", "grad_checkpointing")  # everything else a model section sets is architecture
    return {**SEG_PRESETS[name], **{k: v for k, v in model_cfg.items() if v is not None and k not in skip}}


def convert_segmenter(src: str | os.PathLike, dst: str | os.PathLike, to: str,
                      out_indices: Sequence[int] | None = None) -> tuple[str, Path]:
    """`beit convert` for a segmenter checkpoint: `to` is 'official' (the official mmseg ADE20K layout) or 'hf'.
    Returns (source layout, written path)."""
    raw, hf_cfg = _read(src)
    sd = unwrap_state_dict(raw)
    layout = detect_seg_layout(sd)
    arch = seg_arch_from_checkpoint(raw, hf_cfg) or {}
    if out_indices is not None:
        arch["out_indices"] = [int(i) for i in out_indices]
    if to not in ("official", "hf"):
        raise ValueError(f"a segmenter converts to 'official' (mmseg ADE20K layout) or 'hf', not '{to}'")
    ours = seg_to_ours(sd, layout)
    if layout == "hf" and hf_cfg is not None:  # drop the identity layers an export appended
        extra = set(_blocks_past(ours, arch["depth"]))
        ours = {k: v for k, v in ours.items() if k not in extra}
    return layout, save_segmenter_as(ours, dst, "mmseg" if to == "official" else "hf", arch or None)
