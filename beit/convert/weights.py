"""The one reader and writer of weight files, and the loader of a ViT checkpoint of any layout.

    read_checkpoint(path) -> dict                 # safetensors, or torch.load(weights_only=True); never unpickles
    load_vit(model, path_or_sd) -> LoadReport     # `beit.convert.load_pretrained` for a Beit
    write_weights(tensors, path, config=None)     # the one writer: a folder with config.json, .safetensors or .pth
    save_checkpoint_as(sd, path, layout)          # official | hf | mmpretrain, through write_weights

`load_vit` does, in the official order (unilm `run_class_finetuning.py`):
unwrap `model`/`module`/`state_dict` and prefixes, drop `relative_position_index`, detect the layout and
rename to official keys, drop a wrong-size `head` (re-initialised), clone a shared rel-pos table into
every layer if the model uses per-layer tables, resize tables (geometric-grid cubic) and `pos_embed`
(bicubic) to the model's grid, then load. Unlike the official loader, a shape mismatch is an error.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from beit.convert.layouts import LAYOUTS, detect_layout, from_official, to_official, unwrap_state_dict
from beit.convert.resize import (
    LAYER_TABLE,
    SHARED_TABLE,
    expand_shared_rel_pos,
    grid_from_table_rows,
    resize_pos_embed,
    resize_rel_pos_table,
)

log = logging.getLogger("beit.convert")  # the name it logged under before the split into modules

_SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


# ------------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file without executing code: `.safetensors` with safetensors, anything else with
    `torch.load(weights_only=True)`. An HF directory reads its `model.safetensors` (or
    `pytorch_model.bin`), or every shard its `*.index.json` lists. Errors name the path."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_checkpoint(path / name)
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / name).is_file():
                return _read_sharded(path / name)
        raise FileNotFoundError(f"{path} is a directory without model.safetensors, pytorch_model.bin or a "
                                f"sharded *.index.json")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"cannot read {path} as safetensors (corrupt or truncated?): {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # the pickle references a class/function: more than weights
            raise ValueError(
                f"{path}: weights_only loading failed because the file pickles Python objects besides "
                f"tensors (e.g. argparse args or an optimizer); beit does not unpickle arbitrary objects "
                f"(that can execute code). Re-save just the weights, e.g. "
                f"torch.save(ckpt['model'], 'weights.pth') in a session you trust, or convert to "
                f".safetensors. Detail: {str(e).strip().splitlines()[-3] if str(e).strip() else e}"
            ) from e
        raise ValueError(f"cannot read checkpoint {path}: not a valid torch file, truncated or corrupt "
                         f"({type(e).__name__}); re-create or re-copy it") from None
    except Exception as e:  # zip errors, truncation, EOF; torch's own text advises unpickling, which is wrong here
        raise ValueError(f"cannot read checkpoint {path}: truncated or corrupt ({type(e).__name__}); "
                         f"re-create or re-copy it") from None


def _read_sharded(index: Path) -> dict:
    """HF sharded checkpoint: the index's `weight_map` names the shard of every tensor."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{index}: not an HF shard index (expected a JSON object with 'weight_map'): {e}") from e
    sd: dict = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(read_checkpoint(index.parent / shard))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise ValueError(f"{index}: {len(missing)} tensors listed in weight_map are in none of the shards, "
                         f"e.g. {missing[:3]}; the download is incomplete")
    return sd


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class LoadReport:
    layout: str
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (left as initialised)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model (ignored)
    dropped: list[str] = field(default_factory=list)  # removed on purpose, e.g. a head of another size
    resized: list[str] = field(default_factory=list)  # rel-pos tables / pos_embed adapted to the model grid
    mismatched: list[str] = field(default_factory=list)  # wrong shape, skipped (only with strict_shapes=False)
    expanded_shared_rel_pos: bool = False
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded a '{self.layout}' checkpoint"]
        for name in ("missing", "unexpected", "dropped", "resized", "mismatched"):
            if getattr(self, name):
                lines.append(f"  {name}: {', '.join(getattr(self, name))}")
        if self.expanded_shared_rel_pos:
            lines.append("  shared rel-pos table cloned into every layer")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _num_blocks(keys) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _shape_hint(key: str, ckpt: torch.Tensor, want: torch.Tensor, sd: Mapping, model_sd: Mapping) -> str:
    """A likely cause for a shape mismatch, from the tensors that define the model's size."""
    dim_c = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    dim_m = model_sd["cls_token"].shape[-1] if "cls_token" in model_sd else None
    if dim_c is not None and dim_m is not None and dim_c != dim_m:
        names = f" ({_SIZE_NAMES.get(dim_c, '?')} vs {_SIZE_NAMES.get(dim_m, '?')})"
        return f"checkpoint embed_dim {dim_c} vs model {dim_m}: wrong model size{names}?"
    if key.endswith("relative_position_bias_table"):
        if ckpt.shape[1] != want.shape[1]:
            return f"checkpoint has {ckpt.shape[1]} heads, model {want.shape[1]}: wrong num_heads / model size?"
        return "table not resizable to the model's grid: check img_size / patch_size (non-square source grid?)"
    if key == "patch_embed.proj.weight":
        return (f"patch kernel/in_chans differ ({list(ckpt.shape[1:])} vs {list(want.shape[1:])}): "
                f"wrong patch_size or in_chans?")
    if key == "lm_head.weight" or key == "lm_head.bias":
        return f"checkpoint vocab {ckpt.shape[0]} vs model {want.shape[0]}: set vocab_size to match the tokenizer"
    if key.startswith("blocks.") and ".mlp." in key:
        return "MLP hidden size differs: wrong mlp_ratio?"
    if key == "pos_embed":
        return "position embedding cannot be resized to the model: check img_size / patch_size"
    return "wrong model configuration for this checkpoint?"


def _resize_to_grid(sd: dict, model_sd: dict, grid: tuple[int, int], checkpoint_grid, report: LoadReport):
    """Resize the checkpoint's rel-pos tables and abs pos_embed (in place) to the model's patch grid."""
    for key in [k for k in sd if k.endswith("relative_position_bias_table")]:
        want = model_sd.get(key)
        if want is None or sd[key].shape == want.shape or sd[key].shape[1:] != want.shape[1:]:
            continue  # absent (reported), equal, or a head-count mismatch (error below)
        src = checkpoint_grid or grid_from_table_rows(sd[key].shape[0])
        if src is None:
            continue  # error below, with the hint to pass checkpoint_grid
        sd[key] = resize_rel_pos_table(sd[key], grid, src)
        report.resized.append(key)
    if "pos_embed" in sd and "pos_embed" in model_sd:
        want = model_sd["pos_embed"]
        if sd["pos_embed"].shape != want.shape and sd["pos_embed"].shape[-1] == want.shape[-1]:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, checkpoint_grid)
            report.resized.append("pos_embed")
    if report.resized:
        log.info("resized to grid %s: %s", grid, ", ".join(report.resized))


def load_vit(
    model: torch.nn.Module,
    path_or_sd: str | os.PathLike | Mapping,
    strict_shapes: bool = True,
    checkpoint_grid: tuple[int, int] | None = None,
) -> LoadReport:
    """Load a checkpoint of any supported layout into our `Beit` (or a `SmallCNN`: our own checkpoints), adapting
    it like the official fine-tuning script. Missing/unexpected keys are logged and returned by name; a shape
    mismatch raises ValueError (or, with `strict_shapes=False`, is skipped and reported). `checkpoint_grid` is
    the checkpoint's patch grid when it is not square (square grids are inferred from the tensor sizes)."""
    sd = unwrap_state_dict(path_or_sd if isinstance(path_or_sd, Mapping) else read_checkpoint(path_or_sd))
    if not hasattr(model, "patch_embed"):  # not a ViT (the study's reference CNN): our own checkpoints, exactly
        model.load_state_dict(sd)
        return LoadReport(layout="ours")
    layout = detect_layout(sd)
    sd, report, model_sd = to_official(sd, layout), LoadReport(layout=layout), model.state_dict()
    _check_depth(sd, model_sd, strict_shapes, report)
    _drop_other_head(sd, model_sd, report)
    sd = _expand_shared_table(sd, model_sd, report)
    _resize_to_grid(sd, model_sd, tuple(model.patch_embed.grid), checkpoint_grid, report)
    _drop_mismatched(sd, model_sd, strict_shapes, report)
    _load_and_report(model, sd, report)
    return report


def _check_depth(sd: Mapping, model_sd: Mapping, strict_shapes: bool, report: LoadReport) -> None:
    """A deeper/shallower checkpoint would otherwise load partially with only key reports."""
    ckpt_depth, depth = _num_blocks(sd), _num_blocks(model_sd)
    if ckpt_depth and ckpt_depth != depth:
        msg = f"checkpoint has {ckpt_depth} blocks, model has {depth}: wrong model size / depth?"
        if strict_shapes:
            raise ValueError(msg)
        report.notes.append(msg)


def _drop_other_head(sd: dict, model_sd: Mapping, report: LoadReport) -> None:
    """A classifier head of another size (other dataset) is dropped and stays freshly initialised."""
    for key in ("head.weight", "head.bias"):
        if key in sd and key in model_sd and sd[key].shape != model_sd[key].shape:
            log.info("dropping %s %s: the model's head is %s (re-initialised)", key,
                     list(sd[key].shape), list(model_sd[key].shape))
            report.dropped.append(key)
            del sd[key]


def _expand_shared_table(sd: dict, model_sd: Mapping, report: LoadReport) -> dict:
    """A shared rel-pos table becomes one clone per layer when the model has per-layer tables."""
    if SHARED_TABLE in sd and LAYER_TABLE.format(0) in model_sd and SHARED_TABLE not in model_sd:
        if not any(k.endswith("attn.relative_position_bias_table") for k in sd):
            report.expanded_shared_rel_pos = True
            return expand_shared_rel_pos(sd, _num_blocks(model_sd))
    return sd


def _drop_mismatched(sd: dict, model_sd: Mapping, strict_shapes: bool, report: LoadReport) -> None:
    """After resizing, shapes must agree: a mismatch is an error with its likely cause (or, not strict, skipped)."""
    for key in [k for k in sd if k in model_sd and sd[k].shape != model_sd[k].shape]:
        hint = _shape_hint(key, sd[key], model_sd[key], sd, model_sd)
        msg = (f"shape mismatch for '{key}': checkpoint {list(sd[key].shape)} vs model "
               f"{list(model_sd[key].shape)}. {hint}")
        if strict_shapes:
            raise ValueError(msg)
        log.warning(msg)
        report.mismatched.append(key)
        del sd[key]


def _load_and_report(model: torch.nn.Module, sd: Mapping, report: LoadReport) -> None:
    """Load what is left; report (and log) what did not match by name."""
    result = model.load_state_dict(sd, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if "pos_embed" in report.unexpected and not any(k.endswith("gamma_1") for k in sd):
        report.notes.append(
            "the checkpoint has an absolute pos_embed and no LayerScale (the pt1k_800ep variant): build the "
            "model with use_abs_pos_emb=True, init_values=0, use_rel_pos_bias=False"
        )
    if report.missing:
        log.warning("missing from the checkpoint (left as initialised): %s", ", ".join(report.missing))
    if report.unexpected:
        log.warning("not used by the model: %s", ", ".join(report.unexpected))
    for note in report.notes:
        log.warning(note)


# ------------------------------------------------------------------------------------------------ writing
def hf_config_from_state_dict(sd: Mapping[str, torch.Tensor], model_config: Mapping | None = None) -> dict:
    """A transformers `BeitConfig` (as a config.json dict) describing an official-layout state dict.

    Sizes come from the tensors; `model_config` (our Beit kwargs) supplies what tensors cannot tell:
    num_heads when there is no rel-pos table, and init_values. layer_norm_eps is 1e-6, BEiT's value
    (transformers' default 1e-12 would change the outputs slightly).
    """
    cfg = dict(model_config or {})
    dim = sd["cls_token"].shape[-1]
    depth = _num_blocks(sd)
    table = sd.get(SHARED_TABLE, sd.get(LAYER_TABLE.format(0)))
    heads = table.shape[1] if table is not None else cfg.get("num_heads", max(dim // 64, 1))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    if table is not None and grid_from_table_rows(table.shape[0]):
        g = grid_from_table_rows(table.shape[0])
    elif "pos_embed" in sd:
        side = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
        g = (side, side)
    else:
        size = cfg.get("img_size", 224)
        g = (size // patch, size // patch)
    out = {
        "model_type": "beit",
        "hidden_size": dim,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": sd["blocks.0.mlp.fc1.weight"].shape[0],
        "hidden_act": "gelu",
        "image_size": g[0] * patch if g[0] == g[1] else [g[0] * patch, g[1] * patch],
        "patch_size": patch,
        "num_channels": sd["patch_embed.proj.weight"].shape[1],
        "layer_norm_eps": cfg.get("layer_norm_eps", 1e-6),
        "use_mask_token": "mask_token" in sd,
        "use_absolute_position_embeddings": "pos_embed" in sd,
        "use_relative_position_bias": LAYER_TABLE.format(0) in sd,
        "use_shared_relative_position_bias": SHARED_TABLE in sd,
        "layer_scale_init_value": (cfg.get("init_values", 0.1) or 0.1) if "blocks.0.gamma_1" in sd else 0.0,
        "drop_path_rate": cfg.get("drop_path_rate", 0.1),
        # MIM: BeitModel's own final norm must be Identity (the MIM norm is `layernorm`), i.e. mean
        # pooling on; a classifier says which pooling it uses by having fc_norm.
        "use_mean_pooling": "lm_head.weight" in sd or "fc_norm.weight" in sd,
    }
    if "lm_head.weight" in sd:
        out["vocab_size"] = sd["lm_head.weight"].shape[0]
        out["architectures"] = ["BeitForMaskedImageModeling"]
    elif "head.weight" in sd:
        n = sd["head.weight"].shape[0]
        out["architectures"] = ["BeitForImageClassification"]
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    else:
        out["architectures"] = ["BeitModel"]
    return out


def hf_checkpoint(sd: Mapping[str, torch.Tensor], model_config: Mapping | None = None) -> tuple[dict, dict]:
    """An official/our state dict (any wrapper) -> (HF hub-layout tensors, its config.json): what
    `BeitFor*.from_pretrained` reads. Callers may add fields to the config before `write_weights` writes it."""
    sd = to_official(unwrap_state_dict(sd))
    return from_official(sd, "hf"), hf_config_from_state_dict(sd, model_config)


def write_weights(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, config: Mapping | None = None,
                  wrapper: str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """The one writer of weight files. With `config` (the final config.json, written once) `path` is a folder
    holding `model.safetensors` and `config.json`; else a `.safetensors` file (its header's metadata is
    `{"format": "pt", **metadata}`) or a `.pth`/`.pt`/`.bin` torch file (`{wrapper: tensors}`, flat without one)."""
    from safetensors.torch import save_file

    path = Path(path)
    # safetensors refuses shared or non-contiguous storage (e.g. cloned views from the qkv split).
    out = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}
    if config is not None:
        path.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path / "model.safetensors"), metadata=meta)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(out, str(path), metadata=meta)
    elif path.suffix in (".pth", ".pt", ".bin"):
        torch.save({wrapper: out} if wrapper else out, path)
    else:
        raise ValueError(f"{path}: unknown extension; use .safetensors or .pth (or a directory for hf)")
    return path


def save_checkpoint_as(
    sd: Mapping[str, torch.Tensor], path: str | os.PathLike, layout: str, model_config: Mapping | None = None
) -> Path:
    """Write an official/our state dict (any wrapper is unwrapped first) in `layout`.

    official/mmpretrain: `.safetensors` (flat) or `.pth`/`.pt`/`.bin` (`{"model": sd}` resp.
    `{"state_dict": sd}`, as those projects save them). hf: a directory with `model.safetensors` and
    `config.json` in the hub layout, loadable by `BeitFor*.from_pretrained` (or a single `.safetensors`).
    """
    path = Path(path)
    sd = to_official(unwrap_state_dict(sd))
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; expected one of {LAYOUTS}")
    if layout == "hf" and path.suffix not in (".safetensors", ".bin", ".pth", ".pt"):
        tensors, config = hf_checkpoint(sd, model_config)
        return write_weights(tensors, path, config)
    return write_weights(from_official(sd, layout), path,
                         wrapper={"official": "model", "mmpretrain": "state_dict"}.get(layout))
