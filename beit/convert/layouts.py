"""Checkpoint key layouts and explicit maps between them.

"official" is the microsoft/unilm layout; timm uses the same names and so does our `Beit`, so it is the
hub every conversion goes through: `to_official(sd, layout)` and `from_official(sd, layout)`.

Every rename is one row of a table below, written out per direction (no derived inverses), matched with
`re.fullmatch` against the whole key. Only two things are more than a rename:
* HF splits the fused `qkv.weight` [3D, D] into query/key/value [D, D] (rows 0:D, D:2D, 2D:3D) and
  stores `q_bias`/`v_bias` as `query.bias`/`value.bias`; the key has no bias.
* The final `norm` is `layernorm` (HF MIM head) or `beit.layernorm` (HF cls-token classifier).
Keys that match no row pass through unchanged (the loader reports them as unexpected, by name).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

LAYOUTS = ("official", "hf", "mmpretrain")

# ------------------------------------------------------------------------------------------------ OpenMMLab
# mmselfsup 1.x / mmpretrain `BEiT` (pretraining: BEiTPretrainViT + BEiTV1Head) and `ImageClassifier`
# (BEiTViT + LinearClsHead). Final norm: `ln1` with final_norm=True (pretraining); `ln2` is the norm
# after average pooling (our `fc_norm`).
OFFICIAL_TO_MMPRETRAIN: list[tuple[str, str]] = [
    (r"cls_token", r"backbone.cls_token"),
    (r"mask_token", r"backbone.mask_token"),
    (r"pos_embed", r"backbone.pos_embed"),
    (r"patch_embed\.proj\.(weight|bias)", r"backbone.patch_embed.projection.\1"),
    (r"rel_pos_bias\.relative_position_bias_table", r"backbone.rel_pos_bias.relative_position_bias_table"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"backbone.layers.\1.ln1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"backbone.layers.\1.ln2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"backbone.layers.\1.attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"backbone.layers.\1.attn.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"backbone.layers.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.attn\.relative_position_bias_table", r"backbone.layers.\1.attn.relative_position_bias_table"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"backbone.layers.\1.ffn.layers.0.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"backbone.layers.\1.ffn.layers.1.\2"),
    (r"blocks\.(\d+)\.gamma_(1|2)", r"backbone.layers.\1.gamma_\2"),
    (r"norm\.(weight|bias)", r"backbone.ln1.\1"),
    (r"fc_norm\.(weight|bias)", r"backbone.ln2.\1"),
    (r"lm_head\.(weight|bias)", r"head.cls_head.\1"),
    (r"head\.(weight|bias)", r"head.fc.\1"),
]
MMPRETRAIN_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"backbone\.cls_token", r"cls_token"),
    (r"backbone\.mask_token", r"mask_token"),
    (r"backbone\.pos_embed", r"pos_embed"),
    (r"backbone\.patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"backbone\.rel_pos_bias\.relative_position_bias_table", r"rel_pos_bias.relative_position_bias_table"),
    (r"backbone\.layers\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"backbone\.layers\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"backbone\.layers\.(\d+)\.attn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"backbone\.layers\.(\d+)\.attn\.(q_bias|v_bias)", r"blocks.\1.attn.\2"),
    (r"backbone\.layers\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"backbone\.layers\.(\d+)\.attn\.relative_position_bias_table", r"blocks.\1.attn.relative_position_bias_table"),
    (r"backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"backbone\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"backbone\.layers\.(\d+)\.gamma_(1|2)", r"blocks.\1.gamma_\2"),
    (r"backbone\.ln1\.(weight|bias)", r"norm.\1"),
    (r"backbone\.ln2\.(weight|bias)", r"fc_norm.\1"),
    (r"head\.cls_head\.(weight|bias)", r"lm_head.\1"),
    (r"head\.fc\.(weight|bias)", r"head.\1"),
]
# Not model weights: the frozen DALL-E tokenizer inside an mmselfsup/mmpretrain BEiT, and preprocessors.
MMPRETRAIN_DROP = ("target_generator.", "data_preprocessor.")

# ------------------------------------------------------------------------------------------------ HF
# The hub layout: what `convert_beit_unilm_to_pytorch.py` wrote, what `save_pretrained` still writes in
# transformers 5.x (its conversion mapping renames back on save), and what every transformers version
# loads. `{L}` = `beit.encoder.layer.<i>`.
OFFICIAL_TO_HF: list[tuple[str, str]] = [
    (r"cls_token", r"beit.embeddings.cls_token"),
    (r"mask_token", r"beit.embeddings.mask_token"),
    (r"pos_embed", r"beit.embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"beit.embeddings.patch_embeddings.projection.\1"),
    (r"rel_pos_bias\.relative_position_bias_table", r"beit.encoder.relative_position_bias.relative_position_bias_table"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"beit.encoder.layer.\1.layernorm_before.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"beit.encoder.layer.\1.layernorm_after.\2"),
    # qkv.weight is split in code (see _split_qkv); the biases are plain renames.
    (r"blocks\.(\d+)\.attn\.q_bias", r"beit.encoder.layer.\1.attention.attention.query.bias"),
    (r"blocks\.(\d+)\.attn\.v_bias", r"beit.encoder.layer.\1.attention.attention.value.bias"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"beit.encoder.layer.\1.attention.output.dense.\2"),
    (r"blocks\.(\d+)\.attn\.relative_position_bias_table",
     r"beit.encoder.layer.\1.attention.attention.relative_position_bias.relative_position_bias_table"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"beit.encoder.layer.\1.intermediate.dense.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"beit.encoder.layer.\1.output.dense.\2"),
    (r"blocks\.(\d+)\.gamma_(1|2)", r"beit.encoder.layer.\1.lambda_\2"),  # HF's loader renames "gamma"
    # `norm.*` is `layernorm.*` (MIM) or `beit.layernorm.*` (cls-token classifier): chosen in code.
    (r"fc_norm\.(weight|bias)", r"beit.pooler.layernorm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
]
HF_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"beit\.embeddings\.cls_token", r"cls_token"),
    (r"beit\.embeddings\.mask_token", r"mask_token"),
    (r"beit\.embeddings\.position_embeddings", r"pos_embed"),
    (r"beit\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"beit\.encoder\.relative_position_bias\.relative_position_bias_table", r"rel_pos_bias.relative_position_bias_table"),
    (r"beit\.encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    # query/key/value weights are fused in code (see _fuse_qkv).
    (r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.query\.bias", r"blocks.\1.attn.q_bias"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.value\.bias", r"blocks.\1.attn.v_bias"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.relative_position_bias_table",
     r"blocks.\1.attn.relative_position_bias_table"),
    (r"beit\.encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.lambda_(1|2)", r"blocks.\1.gamma_\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),  # BeitForMaskedImageModeling's norm before lm_head
    (r"beit\.layernorm\.(weight|bias)", r"norm.\1"),  # BeitModel's final norm (cls-token pooling)
    (r"beit\.pooler\.layernorm\.(weight|bias)", r"fc_norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
]
# transformers ≥ 5 renames modules in memory (`BeitForX(...).state_dict()`), and converts on load/save.
# These rows take in-memory names to the hub layout and back; everything not listed is identical.
HF5_TO_HUB: list[tuple[str, str]] = [
    (r"beit\.shared_position_bias\.relative_position_bias_table",
     r"beit.encoder.relative_position_bias.relative_position_bias_table"),
    (r"beit\.layers\.(\d+)\.attention\.q_proj\.(weight|bias)", r"beit.encoder.layer.\1.attention.attention.query.\2"),
    (r"beit\.layers\.(\d+)\.attention\.k_proj\.(weight|bias)", r"beit.encoder.layer.\1.attention.attention.key.\2"),
    (r"beit\.layers\.(\d+)\.attention\.v_proj\.(weight|bias)", r"beit.encoder.layer.\1.attention.attention.value.\2"),
    (r"beit\.layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"beit.encoder.layer.\1.attention.output.dense.\2"),
    (r"beit\.layers\.(\d+)\.relative_position_bias\.relative_position_bias_table",
     r"beit.encoder.layer.\1.attention.attention.relative_position_bias.relative_position_bias_table"),
    (r"beit\.layers\.(\d+)\.layernorm_(before|after)\.(weight|bias)", r"beit.encoder.layer.\1.layernorm_\2.\3"),
    (r"beit\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"beit.encoder.layer.\1.intermediate.dense.\2"),
    (r"beit\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"beit.encoder.layer.\1.output.dense.\2"),
    (r"beit\.layers\.(\d+)\.lambda_(1|2)", r"beit.encoder.layer.\1.lambda_\2"),
]
HUB_TO_HF5: list[tuple[str, str]] = [
    (r"beit\.encoder\.relative_position_bias\.relative_position_bias_table",
     r"beit.shared_position_bias.relative_position_bias_table"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"beit.layers.\1.attention.q_proj.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"beit.layers.\1.attention.k_proj.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"beit.layers.\1.attention.v_proj.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"beit.layers.\1.attention.o_proj.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.relative_position_bias_table",
     r"beit.layers.\1.relative_position_bias.relative_position_bias_table"),
    (r"beit\.encoder\.layer\.(\d+)\.layernorm_(before|after)\.(weight|bias)", r"beit.layers.\1.layernorm_\2.\3"),
    (r"beit\.encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"beit.layers.\1.mlp.fc1.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"beit.layers.\1.mlp.fc2.\2"),
    (r"beit\.encoder\.layer\.(\d+)\.lambda_(1|2)", r"beit.layers.\1.lambda_\2"),
]
# A bare `BeitModel` is saved without the `beit.` prefix.
HF_BARE_PREFIXES = ("embeddings.", "encoder.", "layers.", "pooler.", "shared_position_bias.")

_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight")
_HF_QKV = re.compile(r"beit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


# ------------------------------------------------------------------------------------------------ helpers
def rename(sd: Mapping[str, torch.Tensor], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply the first matching row to each key; keys with no row are kept as they are."""
    compiled = [(re.compile(p), r) for p, r in table]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                new = pattern.sub(repl, key)
                break
        if new in out:
            raise ValueError(f"two checkpoint keys map to '{new}' (the second is '{key}')")
        out[new] = value
    return out


def unwrap_checkpoint(obj):
    """The one checkpoint unwrapper: descend into `model` / `module` / `state_dict`, however deep (official and
    our training checkpoints use `model`, DeepSpeed and BEiT v2 `module`, OpenMMLab `state_dict`). Returns the
    innermost mapping (or `obj` itself when nothing wraps it); what it holds is left to the caller."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("model", "module", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, whatever wraps them.

    Unwraps with `unwrap_checkpoint`, strips `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes and
    drops `*relative_position_index` buffers (rebuilt by the model).
    """
    obj = unwrap_checkpoint(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. epoch counters next to the weights
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        key = key.replace("._orig_mod.", ".")
        if key.endswith("relative_position_index"):
            continue
        out[key] = value
    if not out:
        raise ValueError(f"no tensors found in the checkpoint; its top-level keys are {list(obj)[:10]}")
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'official' (also timm and ours), 'hf' (hub or transformers ≥ 5 names) or 'mmpretrain'."""
    keys = list(sd)
    if any(k.startswith(("backbone.layers.", "backbone.patch_embed.projection.", "backbone.cls_token")) for k in keys):
        return "mmpretrain"
    if any(k.startswith(("beit.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf"
    if any(k.startswith(("blocks.", "patch_embed.proj.", "backbone.blocks.")) or k == "cls_token" for k in keys):
        return "official"
    raise ValueError(
        "unrecognised checkpoint layout: expected official/timm keys (blocks.0.attn.qkv.weight), HF keys "
        "(beit.encoder.layer.0...) or OpenMMLab keys (backbone.layers.0...); first keys are: "
        + ", ".join(keys[:8])
    )


def _fuse_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF query/key/value weights -> official fused qkv.weight ([3D, D], rows q|k|v)."""
    parts: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _HF_QKV.fullmatch(key)
        if m and m.group(3) == "weight":
            parts.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif m and m.group(2) == "key":
            # A key bias adds q·b_k to every score of a query: constant over keys, so softmax cancels
            # it. BEiT has none; drop it if some checkpoint carries one.
            log.info("dropping %s: a key bias does not change attention", key)
        else:
            out[key] = value
    for i, p in parts.items():
        if set(p) != {"query", "key", "value"}:
            raise ValueError(f"layer {i}: found only {sorted(p)} of query/key/value weights")
        if not (p["query"].shape == p["key"].shape == p["value"].shape):
            raise ValueError(f"layer {i}: query/key/value weight shapes differ: "
                             f"{[list(p[n].shape) for n in ('query', 'key', 'value')]}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([p["query"], p["key"], p["value"]], dim=0)
    return out


def _split_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official fused qkv.weight -> HF query/key/value weights; zero q/v biases if the model had none
    (HF always has them; a zero bias computes the same thing)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _QKV.fullmatch(key)
        if not m:
            out[key] = value
            continue
        i = m.group(1)
        if value.ndim != 2 or value.shape[0] != 3 * value.shape[1]:
            raise ValueError(f"{key}: expected a fused [3D, D] weight, got {list(value.shape)}")
        q, k, v = value.chunk(3, dim=0)
        prefix = f"beit.encoder.layer.{i}.attention.attention"
        out[f"{prefix}.query.weight"], out[f"{prefix}.key.weight"], out[f"{prefix}.value.weight"] = q, k, v
        for name in ("q_bias", "v_bias"):
            if f"blocks.{i}.attn.{name}" not in sd:
                out[f"blocks.{i}.attn.{name}"] = value.new_zeros(value.shape[1])
    return out


# ------------------------------------------------------------------------------------------------ API
def to_official(sd: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Rename a (unwrapped) state dict of `layout` (auto-detected if None) to official/timm/our names."""
    layout = layout or detect_layout(sd)
    if layout == "official":
        out = dict(sd)
        if any(k.startswith("backbone.blocks.") for k in out):  # official ADE20K (mmseg 0.x) files
            out = {k.removeprefix("backbone."): v for k, v in out.items()}
        return out
    if layout == "mmpretrain":
        kept = {k: v for k, v in sd.items() if not k.startswith(MMPRETRAIN_DROP)}
        return rename(kept, MMPRETRAIN_TO_OFFICIAL)
    if layout == "hf":
        sd = {("beit." + k if k.startswith(HF_BARE_PREFIXES) else k): v for k, v in sd.items()}
        if "layernorm.weight" in sd and "beit.layernorm.weight" in sd:
            raise ValueError(
                "this HF checkpoint has two final norms (beit.layernorm and layernorm: a MIM model built "
                "with use_mean_pooling=False); BEiT has one — it cannot be represented exactly"
            )
        return rename(_fuse_qkv(rename(sd, HF5_TO_HUB)), HF_TO_OFFICIAL)
    raise ValueError(f"unknown layout '{layout}'; expected one of {LAYOUTS}")


def from_official(
    sd: Mapping[str, torch.Tensor], layout: str, hf_names: str = "hub"
) -> dict[str, torch.Tensor]:
    """Rename an official/timm/our state dict to `layout`.

    For 'hf', `hf_names="hub"` gives the layout `save_pretrained` writes and every transformers version
    loads; `hf_names="transformers5"` gives the in-memory names of transformers ≥ 5 (for
    `model.load_state_dict`).
    """
    sd = dict(sd)
    if layout == "official":
        return sd
    if layout == "mmpretrain":
        return rename(sd, OFFICIAL_TO_MMPRETRAIN)
    if layout == "hf":
        if hf_names not in ("hub", "transformers5"):
            raise ValueError(f"hf_names must be 'hub' or 'transformers5', got '{hf_names}'")
        # One final norm, two homes: before lm_head in the MIM model, inside BeitModel otherwise.
        norm_home = "layernorm" if "lm_head.weight" in sd else "beit.layernorm"
        sd = {(norm_home + k[4:] if k in ("norm.weight", "norm.bias") else k): v for k, v in sd.items()}
        out = rename(_split_qkv(sd), OFFICIAL_TO_HF)
        return rename(out, HUB_TO_HF5) if hf_names == "transformers5" else out
    raise ValueError(f"unknown layout '{layout}'; expected one of {LAYOUTS}")
