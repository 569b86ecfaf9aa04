"""`beit export SRC DIR --to hf|timm`: a folder other libraries load unchanged.

hf    config.json (BeitConfig, id2label/label2id from the dataset's class names, our run config under
      `beit_config`), model.safetensors (transformers key layout), preprocessor_config.json (the eval
      transform: Resize(size / crop_pct) bicubic + CenterCrop(size), mean/std of the run). Loads with
      `AutoModelForImageClassification` / `AutoImageProcessor` / `pipeline("image-classification")`;
      an MIM checkpoint loads as `BeitForMaskedImageModeling`.
      Grayscale models are exported with 3 input channels (patch kernel / 3 per channel, statistics
      repeated): HF's pipeline converts every image to RGB, and on a gray image R = G = B, so the
      outputs equal the 1-channel model's up to float rounding.
      A segmenter (`beit segment` run) is written as `BeitForSemanticSegmentation` (HF's own head layout:
      the neck resizes the patch grid x4, x2, x1, /2 and UperNet has hidden_size channels; other heads
      are refused) with its class names as id2label; `AutoModelForSemanticSegmentation` loads it and
      `AutoImageProcessor` resizes to the training crop.
timm  config.json in timm's hub format (architecture, num_classes, model_args, pretrained_cfg: input size,
      mean/std, interpolation, crop) + model.safetensors (official keys = timm keys):
      `timm.create_model("local-dir:DIR", pretrained=True)`. num_classes is stored, so timm never
      re-initialises the head. An MIM checkpoint is exported as its backbone (timm has no MIM head).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from beit.config import Config
from beit.convert import hf_checkpoint, write_weights
from beit.convert.segmentation import to_hf_segmentation
from beit.data.transforms import eval_crop_pct
from beit.hub import effective_model_kwargs, load

log = logging.getLogger("beit")

FORMATS = ("hf", "timm")
_PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as HF image processors store it
_PIL_BILINEAR = 2


def _crop_pct(cfg: Config) -> float:
    return eval_crop_pct(cfg.data.img_size, cfg.data.crop_pct)


def _as_rgb(sd: dict, cfg: Config, prefix: str = "") -> tuple[dict, Config]:
    """A 1-channel model as a 3-channel one that gives the same outputs on gray RGB images."""
    sd = dict(sd)
    key = f"{prefix}patch_embed.proj.weight"
    sd[key] = sd[key].repeat(1, 3, 1, 1) / 3  # [D, 3, p, p]
    d = cfg.data
    cfg = cfg.model_copy(deep=True)
    cfg.model.in_chans = 3
    cfg.data = d.model_copy(update=dict(in_chans=3, mean=list(d.mean) * 3, std=list(d.std) * 3))
    return sd, cfg


def _hf_preprocessor(cfg: Config) -> dict:
    size = cfg.data.img_size
    resize = int(size / _crop_pct(cfg))
    return {
        "image_processor_type": "BeitImageProcessor",
        "do_resize": True, "size": {"height": resize, "width": resize}, "resample": _PIL_BICUBIC,
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(cfg.data.mean), "image_std": list(cfg.data.std),
        "do_reduce_labels": False,
    }


def export_hf(sd: dict, cfg: Config, names: list[str], out: Path) -> Path:
    if cfg.model.in_chans == 1 or (cfg.model.in_chans is None and cfg.data.in_chans == 1):
        sd, cfg = _as_rgb(sd, cfg)
    tensors, config = hf_checkpoint(sd, effective_model_kwargs(cfg.model))
    if "head.weight" in sd:
        config.update(_labels(names, sd["head.weight"].shape[0]))
    config["beit_config"] = cfg.to_dict()
    write_weights(tensors, out, config)
    (out / "preprocessor_config.json").write_text(json.dumps(_hf_preprocessor(cfg), indent=2))
    return out


def _labels(names: list[str], n: int) -> dict:
    labels = names if len(names) == n else [f"LABEL_{i}" for i in range(n)]
    return {"id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


def _hf_seg_preprocessor(cfg: Config) -> dict:
    """Resize to the training crop (bilinear, as mmseg's test-time Resize), rescale, normalise; masks
    reduced as the run's data was (seg.reduce_zero_label, on for ADE20K)."""
    size = cfg.data.img_size
    reduce = cfg.seg.reduce_zero_label if cfg.seg.reduce_zero_label is not None else cfg.data.dataset == "ade20k"
    return {
        "image_processor_type": "BeitImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": _PIL_BILINEAR,
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(cfg.data.mean), "image_std": list(cfg.data.std),
        "do_reduce_labels": bool(reduce),
    }


def export_hf_segmenter(sd: dict, cfg: Config, names: list[str], out: Path) -> Path:
    """A BeitSegmenter state dict -> an HF `BeitForSemanticSegmentation` folder (see the module docstring)."""
    if cfg.model.in_chans == 1:
        sd, cfg = _as_rgb(sd, cfg, prefix="backbone.")
    hf_sd, config = to_hf_segmentation(sd, effective_model_kwargs(cfg.model))  # refuses heads HF cannot hold
    config.update(_labels(names, sd["decode_head.conv_seg.weight"].shape[0]), beit_config=cfg.to_dict())
    write_weights(hf_sd, out, config)
    (out / "preprocessor_config.json").write_text(json.dumps(_hf_seg_preprocessor(cfg), indent=2))
    return out


def timm_model_args(cfg: Config, num_classes: int) -> dict:
    """timm `Beit(...)` kwargs for our model section (every architecture field explicit)."""
    k = effective_model_kwargs(cfg.model)
    return {
        "img_size": k.get("img_size", 224), "patch_size": k.get("patch_size", 16), "in_chans": k.get("in_chans", 3),
        "num_classes": num_classes, "global_pool": "avg" if k.get("use_mean_pooling", True) else "token",
        "embed_dim": k["embed_dim"], "depth": k["depth"], "num_heads": k["num_heads"],
        "mlp_ratio": k.get("mlp_ratio", 4.0), "qkv_bias": k.get("qkv_bias", True),
        "use_abs_pos_emb": k.get("use_abs_pos_emb", False), "use_rel_pos_bias": k.get("use_rel_pos_bias", False),
        "use_shared_rel_pos_bias": k.get("use_shared_rel_pos_bias", False),
        "init_values": k.get("init_values") or None,  # timm: None = no LayerScale
    }


def export_timm(sd: dict, cfg: Config, names: list[str], out: Path) -> Path:
    sd = {k: v for k, v in sd.items() if not k.startswith(("lm_head.", "mask_token"))}  # timm has no MIM head
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    args = timm_model_args(cfg, num_classes)
    name = cfg.model.name.split("_8k_vocab")[0]
    import timm

    arch = name if timm.is_model(name) else "beit_base_patch16_224"  # model_args set every size explicitly
    pretrained_cfg = {
        "input_size": [args["in_chans"], args["img_size"], args["img_size"]], "fixed_input_size": True,
        "interpolation": "bicubic", "crop_pct": _crop_pct(cfg), "crop_mode": "center",
        "mean": list(cfg.data.mean), "std": list(cfg.data.std), "num_classes": num_classes,
        "first_conv": "patch_embed.proj", "classifier": "head",
    }
    if num_classes and len(names) == num_classes:
        pretrained_cfg["label_names"] = list(names)
    config = {"architecture": arch, "num_classes": num_classes, "num_features": args["embed_dim"],
              "global_pool": args["global_pool"], "model_args": args, "pretrained_cfg": pretrained_cfg,
              "beit_config": cfg.to_dict()}
    return write_weights(sd, out, config)


def export(source: str | Path, out: str | Path, to: str = "hf", overwrite: bool = False) -> Path:
    """Write `source` (anything `beit.load` reads) as an HF or timm folder at `out`."""
    import torch

    if to not in FORMATS:
        raise ValueError(f"unknown export format '{to}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export destination '{out}' is a file, not a folder; choose a folder path (it is "
                              f"created), or remove the file")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"'{out}' exists and is not empty; pass --overwrite or choose another folder")
    model = load(source)
    segmenter = hasattr(model, "decode_head")
    if segmenter and to == "timm":
        raise ValueError(f"'{source}' is a segmenter and timm has no segmentation models: export it with --to hf, "
                         f"or convert its checkpoint for mmsegmentation: `beit convert CKPT FILE.pth --to official`")
    if model.beit_config.model.in_chans is None:  # make the channel count explicit for the writers
        model.beit_config.model.in_chans = model.in_chans if segmenter else model.patch_embed.in_chans
    with torch.no_grad():
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    writer = export_hf_segmenter if segmenter else export_hf if to == "hf" else export_timm
    if not (out.exists() and any(out.iterdir())):
        return writer(sd, model.beit_config, model.class_names, out)
    # --overwrite: the old folder is replaced only once the new one is complete
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        writer(sd, model.beit_config, model.class_names, partial)
        shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def export_run(cfg: Config, run_dir: Path) -> list[Path]:
    """After training: write every format in `train.export` to `run_dir/train.export_dir/<format>`.

    A failure is logged loudly with the command that retries it; the finished run is never lost to it.
    """
    written = []
    for fmt in cfg.train.export:
        out = Path(run_dir) / cfg.train.export_dir / fmt
        try:
            written.append(export(run_dir, out, fmt, overwrite=True))
            log.info(f"exported ({fmt}): {out}")
        except Exception as e:  # noqa: BLE001 - training is done; the export can be redone by hand
            log.error(f"export to {fmt} failed ({type(e).__name__}: {e}); retry with "
                      f"`beit export {run_dir} {out} --to {fmt} --overwrite`")
    return written
