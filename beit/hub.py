"""Self-describing checkpoints: `load(source)` builds the model a checkpoint holds, no architecture restated.

    model = beit.load("runs/fmnist_ft")            # run directory: its newest ckpt-*.pt (else best.pt, else export/)
    model = beit.load("runs/fmnist_ft/best.pt")    # any training checkpoint: it stores the run's config
    model = beit.load("runs/fmnist_ft/export/hf")  # a folder written by `beit export` (HF or timm)
    model = beit.load("fmnist-classifier")         # a model shipped with the package (see ZOO)
    model = beit.load("beit_base_patch16_224_pt22k_ft22kto1k.pth")   # a foreign layout: sizes from the tensors

The model comes back in eval mode with three attributes: `model.beit_config` (the run's `Config`, or one
inferred from the tensors), `model.class_names` (list[str], empty when unknown) and, for a masked-image-
modeling model, `model.tokenizer_name` (the tokenizer it was pretrained against).

What a checkpoint is (classifier, MIM model, backbone, segmenter) is read from its tensors; `KINDS` maps each
kind to the function that builds it. A checkpoint without our config is rebuilt from what it says about itself:
an HF folder from its config.json (any patch size, depth or width; a `BeitForSemanticSegmentation` with its
`out_indices` and head sizes), any other layout from its tensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from beit.config import (SEG_DATASETS, Config, ConfigError, ModelConfig, OptimConfig, TrainConfig, _merge,
                         config_from_dict, load_config, parse_overrides)
from beit.convert import hf_config_from_state_dict, load_pretrained, read_checkpoint, to_official, unwrap_state_dict
from beit.convert.runs import run_weights
from beit.convert.segmentation import load_whole_segmenter, segmenter_kwargs_from_hf_config
from beit.data.datasets import FASHION_MNIST_CLASSES
from beit.data.extra import MNIST_CLASSES, hf_dataset
from beit.data.segmentation import ADE20K_CLASSES, FMNIST_SCENES_CLASSES, read_class_names
from beit.models import create_model
from beit.models.presets import CNN_PRESETS, PRESETS, SEG_CNN_PRESETS, SEG_PRESETS
from beit.models.segmentation import create_segmenter

log = logging.getLogger("beit")

ASSETS = Path(__file__).resolve().parent / "assets"
# Shipped models: name -> safetensors file whose metadata holds the run config and class names
# (written by scripts/make_zoo.py; docs/model_zoo.md says how each was made).
ZOO = {
    "fmnist-backbone": ASSETS / "fmnist_backbone.safetensors",  # 20 pretraining epochs
    "fmnist-backbone-4ep": ASSETS / "fmnist_backbone_4ep.safetensors",  # 4 epochs: the earlier results' backbone
    "fmnist-classifier": ASSETS / "fmnist_classifier.safetensors",  # fmnist-backbone fine-tuned, recipe chosen on validation
}
# `create_model(name, pretrained=TAG)`: (preset, tag) -> zoo entry.
PRETRAINED_TAGS = {
    ("beit_fmnist_patch4_32", "fmnist"): "fmnist-backbone",
    ("beit_fmnist_patch4_32_512_vocab", "fmnist"): "fmnist-backbone",
}
# `beit linprobe CHECKPOINT`: the probe recipe that replaces the checkpoint's stored optim and train sections (the
# run's own recipe, not a probe's) and its batch size. It is the official protocol (unilm run_linear_eval.py) as
# configs/linprobe/fmnist.yaml states it (tests/test_docs.py checks that they agree); unset fields take the
# schema's defaults, as in a YAML file.
LINPROBE_RECIPE = {
    "optim": dict(lr=4.0e-3, min_lr=0.0, warmup_epochs=0, weight_decay=1.0e-4, clip_grad=None, layer_decay=None,
                  recipe_batch_size=1024),
    "train": dict(epochs=100, amp="auto", eval_every_epochs=10, save_every_steps=2000, probe_cache_features=True),
    "batch_size": 1024,
}
# Model fields that change nothing about a trained model's outputs (they act at init or in training only).
_TRAINING_ONLY = {"drop_path_rate", "init_trunc"}


@dataclass
class Source:
    """A checkpoint, resolved: the weights, and what is known about them."""

    path: Path  # the file (or HF folder) holding the weights
    raw: dict  # as read; `load_pretrained` unwraps it
    config: Config  # stored with the checkpoint, or inferred from its tensors (`inferred` then)
    class_names: list[str] = field(default_factory=list)
    inferred: bool = False


# ------------------------------------------------------------------------------------------------ resolving
def resolve_path(source: str | Path) -> Path:
    """Zoo name, run directory, export folder or file -> the file (or HF folder) that holds the weights."""
    name = str(source)
    if name in ZOO:
        path = ZOO[name]
        if not path.is_file():
            raise FileNotFoundError(f"the '{name}' weights are not shipped with this install ({path} is missing); "
                                    f"docs/model_zoo.md says how to make them with scripts/make_zoo.py")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        zoo = ", ".join(ZOO)
        raise FileNotFoundError(f"checkpoint '{name}' not found: not a file, a directory or a shipped model ({zoo})")
    if path.is_file():
        return path
    weights = run_weights(path)
    if weights:
        return weights
    for candidate in (path / "export" / "hf", path / "hf"):
        if candidate.exists():
            return candidate
    if (path / "config.json").is_file() or (path / "model.safetensors").is_file():
        return path  # an HF / timm folder
    raise FileNotFoundError(f"'{path}' holds no checkpoint: no ckpt-*.pt, best.pt, export/hf or model.safetensors")


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_source(source: str | Path) -> Source:
    """Read a checkpoint and what it says about itself (never unpickles: weights_only / safetensors)."""
    path = resolve_path(source)
    raw = read_checkpoint(path)
    stored, names, meta = None, [], {}
    if isinstance(raw.get("config"), dict):  # our training checkpoints (ckpt-*.pt, best.pt)
        stored = config_from_dict(raw["config"], f"{path} (stored config)")
        names = list(raw.get("class_names") or [])  # the run's class index (older checkpoints: none stored)
    elif path.suffix == ".safetensors":  # zoo files carry the config in the safetensors metadata
        meta = _safetensors_metadata(path)
        if "beit_config" in meta:
            stored = config_from_dict(json.loads(meta["beit_config"]), f"{path} (metadata)")
            names = json.loads(meta.get("class_names", "[]"))
    else:  # an exported folder: config.json (HF or timm) may carry our config and the labels
        meta = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if "beit_config" in meta:
            stored = config_from_dict(meta["beit_config"], f"{path / 'config.json'} (beit_config)")
        names = _label_names(meta)
    if stored is None:
        hf = meta if meta.get("model_type") == "beit" else None  # an HF BEiT folder's own config.json
        return Source(path, raw, infer_config(raw, path, hf), names, inferred=True)
    return Source(path, raw, stored, names or dataset_class_names(stored))


def _label_names(meta: dict) -> list[str]:
    if "id2label" in meta:
        labels = {int(k): v for k, v in meta["id2label"].items()}
        names = [labels[i] for i in range(len(labels))]
        return [] if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names
    return list(meta.get("pretrained_cfg", {}).get("label_names") or [])


# ------------------------------------------------------------------------------------------------ inferring
def model_kind(sd: dict) -> str:
    """'mim' (lm_head), 'classifier' (head), 'segmenter' (decode_head) or 'backbone', from official-layout keys."""
    if any(k.startswith("decode_head.") for k in sd):
        return "segmenter"
    if "lm_head.weight" in sd:
        return "mim"
    return "classifier" if "head.weight" in sd else "backbone"


def _kind_of(raw: dict) -> str:
    """`model_kind` of a checkpoint as read (any layout, any wrapper)."""
    return model_kind(to_official(unwrap_state_dict(raw)))


def checkpoint_kind(model: ModelConfig) -> str | None:
    """What `model.pretrained` holds ('classifier', 'mim', 'segmenter' or 'backbone'), read from its tensors, so
    that a command picks what to do from the checkpoint, never from the data's name; None without a checkpoint.
    A preset tag (`pretrained: fmnist`) names its shipped model; a CNN preset (the reference baseline of
    `beit study`) is a classifier, a U-Net preset a segmenter, whatever its tensors."""
    source = PRETRAINED_TAGS.get((model.name, model.pretrained), model.pretrained)
    if source is None:
        return None
    if model.name in CNN_PRESETS:
        return "classifier"
    if model.name in SEG_CNN_PRESETS:
        return "segmenter"
    return _kind_of(read_checkpoint(resolve_path(source)))


def infer_config(raw: dict, path: Path, hf: dict | None = None) -> Config:
    """A `Config` whose model section rebuilds the checkpoint: every size from the tensors (and from `hf`, an HF
    folder's config.json: layer-norm eps; a segmenter's out_indices and heads), on the preset of the same kind
    nearest in patch size and width; what differs from the preset is set explicitly. Data defaults follow the
    model (image size, channels; statistics from an HF folder's preprocessor_config.json)."""
    sd = unwrap_state_dict(raw)
    kind = model_kind(to_official(sd))
    model = _segmenter_section(path, hf) if kind == "segmenter" else _vit_section(to_official(sd), kind, hf)
    data: dict[str, Any] = dict(img_size=model["img_size"], in_chans=model["in_chans"])
    if kind == "segmenter":
        data["dataset"] = "seg_folder"  # `beit eval|predict` read it as segmentation data (data.root=...)
    pre = path / "preprocessor_config.json" if path.is_dir() else None
    if pre is not None and pre.is_file():  # an HF folder: the statistics it was trained with
        p = json.loads(pre.read_text())
        data.update(mean=p.get("image_mean", [0.5] * 3), std=p.get("image_std", [0.5] * 3))
    elif model["in_chans"] != 3:
        data.update(mean=[0.5] * model["in_chans"], std=[0.5] * model["in_chans"])
    return config_from_dict({"model": model, "data": data}, f"{path} (inferred from its tensors)")


def _nearest_preset(presets: dict[str, dict], patch: int, width: int) -> str:
    """The preset with the same patch size and width if there is one, else the same patch size, else any."""
    return min(presets, key=lambda n: (presets[n].get("patch_size", 16) != patch, presets[n]["embed_dim"] != width))


def _vit_section(sd: dict, kind: str, hf: dict | None) -> dict[str, Any]:
    """Model section of a classifier, MIM model or backbone (official-layout tensors)."""

    c = hf_config_from_state_dict(sd)
    mim = kind == "mim"
    presets = {n: p for n, p in PRESETS.items() if bool(p.get("vocab_size")) == mim}
    name = _nearest_preset(presets, c["patch_size"], c["hidden_size"])
    size = c["image_size"]
    model = dict(
        name=name, img_size=size if isinstance(size, int) else size[0], in_chans=c["num_channels"],
        embed_dim=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_classes=sd["head.weight"].shape[0] if kind == "classifier" else 0,
        vocab_size=c.get("vocab_size", 0), use_abs_pos_emb=c["use_absolute_position_embeddings"],
        use_rel_pos_bias=c["use_relative_position_bias"],
        use_shared_rel_pos_bias=c["use_shared_relative_position_bias"],
        use_mean_pooling=c["use_mean_pooling"] if kind != "mim" else False,
        init_values=c["layer_scale_init_value"],
    )
    # What presets fix: set only where the checkpoint differs (an HF folder's own eps: transformers' is 1e-12).
    eps = hf.get("layer_norm_eps", 1e-12) if hf else c["layer_norm_eps"]
    exact = dict(patch_size=c["patch_size"], mlp_ratio=c["intermediate_size"] / c["hidden_size"], layer_norm_eps=eps)
    base = {"patch_size": 16, "mlp_ratio": 4.0, "layer_norm_eps": 1e-6, **presets[name]}
    model.update({k: v for k, v in exact.items() if v != base[k]})
    return model


def _segmenter_section(path: Path, hf: dict | None) -> dict[str, Any]:
    """Model section of a segmenter: an HF `BeitForSemanticSegmentation` config.json says what tensors cannot
    (which blocks the neck reads)."""

    if hf is None:
        raise ValueError(f"{path}: a segmenter checkpoint without its config: which blocks the neck reads "
                         f"(out_indices) is not in its tensors; build it with beit.models.create_segmenter(NAME, "
                         f"out_indices=[...], pretrained=PATH)")
    kwargs = segmenter_kwargs_from_hf_config(hf)
    fields = set(ModelConfig.model_fields) - {"name", "pretrained", "grad_checkpointing"}
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k in fields}
    return {"name": _nearest_preset(SEG_PRESETS, kwargs["patch_size"], kwargs["embed_dim"]), **model}


def dataset_class_names(cfg: Config) -> list[str]:
    """Class names of the configured dataset, when cheap to know (no full dataset scan)."""
    d = cfg.data
    if d.dataset in SEG_DATASETS:  # older segmentation checkpoints store no class names
        return _seg_class_names(cfg)
    if d.dataset == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if d.dataset == "mnist":
        return list(MNIST_CLASSES)
    if d.dataset == "hf" and d.root and Path(d.root).expanduser().exists():
        return hf_dataset(d.root, "train", "RGB").classes  # memory-mapped: reads the features, not the images
    if d.dataset == "image_folder" and d.root:
        root = Path(d.root).expanduser()
        folder = root / "train" if (root / "train").is_dir() else root
        if folder.is_dir():
            return sorted(p.name for p in folder.iterdir() if p.is_dir())
    return []


def _seg_class_names(cfg: Config) -> list[str]:
    if cfg.data.dataset == "fmnist_scenes":
        return list(FMNIST_SCENES_CLASSES)
    if cfg.data.dataset == "ade20k":
        return list(ADE20K_CLASSES)
    s, root = cfg.seg, cfg.data.root
    listed = Path(s.class_names) if s.class_names else Path(root).expanduser() / "classes.txt" if root else None
    return read_class_names(listed) if listed is not None and listed.is_file() else []


# ------------------------------------------------------------------------------------------------ building
def effective_model_kwargs(m: ModelConfig) -> dict[str, Any]:
    """The model's kwargs for a model section (`Beit`, `BeitSegmenter` or a reference CNN): the preset with its
    overrides applied."""
    presets = {**PRESETS, **SEG_PRESETS, **CNN_PRESETS, **SEG_CNN_PRESETS}
    if m.name not in presets:
        raise ConfigError(f"unknown model preset '{m.name}'")
    return {**presets[m.name], **m.overrides()}


def check_model_overrides(stored: ModelConfig, requested: dict[str, Any], source: str):
    """An override of the model section must agree with the checkpoint: the checkpoint decides the architecture."""
    have = effective_model_kwargs(stored)
    wrong = []
    for key, value in requested.items():
        if key in ("pretrained", "grad_checkpointing") or key in _TRAINING_ONLY:
            continue
        if key == "name":
            if value != stored.name and effective_model_kwargs(stored.model_copy(update={"name": value})) != have:
                wrong.append(f"model.name={value} (checkpoint: {stored.name})")
        elif _plain(have.get(key)) != _plain(value) and not (key == "init_values" and not have.get(key) and not value):
            wrong.append(f"model.{key}={value} (checkpoint: {have.get(key)})")
    if wrong:
        raise ConfigError(f"{source}: the checkpoint fixes the architecture and these overrides contradict it: "
                          f"{'; '.join(wrong)}. Drop them (the checkpoint's stored config is used)")


def _plain(value):
    """Tuples (presets) and lists (configs) compare equal."""
    return list(value) if isinstance(value, tuple) else value


def _build_vit(src: Source) -> nn.Module:
    model = create_model(src.config.model.name, **src.config.model.overrides())
    load_pretrained(model, src.raw)
    return model


def _build_segmenter(src: Source) -> nn.Module:
    """BEiT + UperNet from the model section; every weight must come from the checkpoint (any layout)."""
    model = create_segmenter(src.config.model.name, **src.config.model.overrides())
    # an HF folder by path: its config.json's out_indices are checked against the model's
    load_whole_segmenter(model, src.path if src.path.is_dir() else src.raw, str(src.path))
    return model


# kind -> builder(Source) -> nn.Module.
KINDS: dict[str, Callable[[Source], nn.Module]] = {
    "classifier": _build_vit,
    "mim": _build_vit,
    "backbone": _build_vit,
    "segmenter": _build_segmenter,
}


def load(source: str | Path, **model_overrides) -> nn.Module:
    """The model a checkpoint holds, built from its stored config, in eval mode (see the module docstring).

    `model_overrides` (ModelConfig fields) may only restate what the checkpoint says; a contradiction is an
    error, so a wrong preset never loads half the weights silently.
    """
    src = read_source(source)
    check_model_overrides(src.config.model, model_overrides, str(source))
    kind = _kind_of(src.raw)
    model = KINDS[kind](src)
    model.beit_config = src.config
    model.class_names = list(src.class_names)
    if kind == "mim":
        model.tokenizer_name = src.config.tokenizer.name
    return model.eval()


# ------------------------------------------------------------------------------------------------ commands
def _beside(source: str) -> Path:
    """Where a command's output on a checkpoint goes: beside the checkpoint's run directory (runs/x/ckpt-*.pt
    and runs/x -> runs/), in the folder of a loose checkpoint file, in runs/ for a shipped model."""
    if str(source) in ZOO:
        return Path("runs")
    path = Path(source).expanduser()
    if path.is_file():
        path = path.parent
        if not (path / "config.yaml").is_file():
            return path  # a loose checkpoint file: its own folder
    return path.parent


def command_config(source: str, overrides: list[str], command: str) -> Config:
    """Config of `beit eval|knn|linprobe|predict SOURCE [key=value ...]`.

    SOURCE may be a YAML config (as before; a model section that contradicts `model.pretrained`'s stored
    config is an error) or any checkpoint `load` reads: then its stored config is the base (for linprobe
    with `LINPROBE_RECIPE`: optim, train, batch size), the run is named
    `<run>_<command>` beside the checkpoint's run (`_beside`), and only data/train/optim/... overrides may change
    anything.
    """
    if str(source).endswith((".yaml", ".yml")):
        cfg = load_config(source, overrides)
        if cfg.model.pretrained and Path(cfg.model.pretrained).exists() or cfg.model.pretrained in ZOO:
            if checkpoint_kind(cfg.model) == "segmenter":  # checked against the config when it is loaded
                return cfg
            src = read_source(cfg.model.pretrained)
            if not src.inferred:  # the YAML's model section, preset included, must describe the checkpoint
                fields = set(ModelConfig.model_fields) - {"name", "pretrained", "grad_checkpointing"}
                requested = {k: v for k, v in effective_model_kwargs(cfg.model).items() if k in fields}
                check_model_overrides(src.config.model, requested, f"{source}: model.pretrained={cfg.model.pretrained}")
        return cfg
    src = read_source(source)
    extra = parse_overrides(overrides)
    check_model_overrides(src.config.model, extra.get("model", {}), str(source))
    base = src.config.to_dict()
    base["model"]["pretrained"] = str(src.path)
    stem = base["train"].get("run_name") or Path(source).stem
    if command == "linprobe":  # the stored optim/train sections are the run's own recipe, not a probe's
        base["optim"] = OptimConfig(**LINPROBE_RECIPE["optim"]).model_dump(mode="json")
        base["train"] = TrainConfig(**LINPROBE_RECIPE["train"], out_dir=base["train"]["out_dir"],
                                    device=base["train"]["device"]).model_dump(mode="json")
        base["data"]["batch_size"] = LINPROBE_RECIPE["batch_size"]
    base["train"]["run_name"] = f"{stem}_{command}"
    base["train"]["out_dir"] = str(_beside(source))  # not the training machine's out_dir stored in the config
    extra.pop("model", None)
    return config_from_dict(_merge(base, extra), f"{source} + overrides")
