"""Everything a command builds from a `Config`, in one place: model, tokenizer, datasets with their transforms.

    model     = build_model(cfg)                        # preset + overrides + model.pretrained, checked vs data
    tokenizer = build_tokenizer(cfg, device)            # frozen target generator (pretraining)
    tokenizer = create_tokenizer("fmnist_dvae")        # a tokenizer by name or path: its config and weight files
    train     = build_mim_dataset(cfg, model.grid)      # two views + block mask per image (pretraining)
    train     = build_labeled_dataset(cfg, "train", train_transform=True)   # fine-tuning / probing
    loader    = build_eval_loader(cfg, "test")          # sequential, eval transform

Each task (`beit.train.pretrain`, `finetune`, `linprobe`) turns these into a `Task` for the shared loop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
import torch.nn as nn
from torch.utils.data import DataLoader

from beit.config import SEG_DATASETS, Config, ConfigError
from beit.convert.runs import resolve_pretrained
from beit.data import (MIMDataset, MIMItem, ShardDataset, build_dataset, build_finetune_transform,
                       build_mask_generator, build_two_view_transform, collate_skip_bad, keyed_items)
from beit.data.segmentation import build_seg_dataset
from beit import models
from beit.convert import load_pretrained, read_checkpoint, unwrap_checkpoint, write_weights
from beit.convert.segmentation import load_pretrained_backbone
from beit.hub import ASSETS, PRETRAINED_TAGS, ZOO, resolve_path
from beit.models.segmentation import BeitSegmenter
from beit.models.segmentation import create_segmenter as _segmenter_architecture
from beit.tokenizers import FrozenTokenizer, TokenizerError, dalle_tokenizer, dvae_tokenizer, tokenizer_config
from beit.tokenizers.dalle import dalle_to_ours, split_encoder_decoder

log = logging.getLogger("beit")

SHIPPED_TOKENIZERS = {"fmnist_dvae": ASSETS / "fmnist_dvae.yaml"}  # name -> config; weights beside it (.safetensors)


def create_model(name: str, pretrained: str | None = None, **overrides) -> nn.Module:
    """Build preset `name` with keyword overrides (`beit.models.create_model`); `pretrained=PATH` loads a checkpoint
    of any supported layout (ours, official/timm, HF, OpenMMLab), adapting rel-pos tables and position
    embeddings, or names a shipped model (`pretrained="fmnist"` for `beit_fmnist_patch4_32`, see
    `beit.hub.PRETRAINED_TAGS`)."""
    model = models.create_model(name, **overrides)
    if pretrained:
        if (name, pretrained) in PRETRAINED_TAGS:  # a shipped model, e.g. pretrained="fmnist"
            pretrained = resolve_path(PRETRAINED_TAGS[name, pretrained])
        elif str(pretrained) in ZOO:  # e.g. pretrained="fmnist-backbone"
            pretrained = resolve_path(pretrained)
        load_pretrained(model, pretrained)
    return model


def create_segmenter(name: str, pretrained: str | None = None, **overrides) -> BeitSegmenter:
    """Build segmentation preset `name` (beit.models.presets.SEG_PRESETS) with keyword overrides; `pretrained`
    loads a backbone or a whole segmenter of any supported layout (`beit.convert.segmentation.load_segmenter`)."""
    model = _segmenter_architecture(name, **overrides)
    if pretrained:
        load_pretrained_backbone(model, pretrained)
    return model


def build_model(cfg: Config, need_pretrained: bool = False) -> nn.Module:
    """`create_model(cfg.model.name, pretrained, **overrides)` checked against the data config."""
    if need_pretrained and not cfg.model.pretrained:
        raise ConfigError("model.pretrained must name a checkpoint (file or run directory) for this command")
    pretrained = resolve_pretrained(cfg.model.pretrained)
    if pretrained:
        log.info(f"loading {pretrained}")
    model = create_model(cfg.model.name, pretrained, **cfg.model.overrides())
    problems = []
    inp = getattr(model, "patch_embed", model)  # a ViT's input sizes live on its patch embedding; a CNN's on itself
    if cfg.data.img_size != inp.img_size:
        problems.append(f"data.img_size {cfg.data.img_size} != model img_size {inp.img_size}")
    if cfg.data.in_chans != inp.in_chans:
        problems.append(f"data.in_chans {cfg.data.in_chans} != model in_chans {inp.in_chans}")
    if problems:
        raise ConfigError("model and data disagree: " + "; ".join(problems))
    return model


def build_tokenizer(cfg: Config, device: torch.device | str = "cpu") -> FrozenTokenizer:
    return create_tokenizer(cfg.tokenizer.name, weights=cfg.tokenizer.weights).to(device)


# ------------------------------------------------------------------------------------------------ tokenizer files
def create_tokenizer(name_or_path: str | Path, weights: str | Path | None = None, **overrides) -> FrozenTokenizer:
    """Build a frozen tokenizer (`beit.create_tokenizer`).

    name_or_path: "dall-e" (needs `weights=`; optional `decoder_weights=` for decode), a shipped name
        (see SHIPPED_TOKENIZERS), or a path to a trained tokenizer (run directory, tokenizer.yaml or
        tokenizer.safetensors).
    weights: weight file; for trained/shipped tokenizers it replaces the default file.
    overrides: TokenizerConfig fields for trained tokenizers (a mismatch with the weights is an error).
    """
    name = str(name_or_path)
    if name in ("dall-e", "dalle", "dall_e"):
        if weights is None:
            raise ValueError("the 'dall-e' tokenizer needs weights=PATH: OpenMMLab's dalle_encoder.pth, a dall_e "
                             "state dict, or a safetensors file from `beit tokenizer convert encoder.pkl DST --trust-pickle`")
        decoder_weights = overrides.pop("decoder_weights", None)
        if overrides:
            raise TypeError(f"the 'dall-e' tokenizer has a fixed architecture; unexpected options {sorted(overrides)}")
        decoder = read_tokenizer_weights(decoder_weights) if decoder_weights is not None else None
        return dalle_tokenizer(read_tokenizer_weights(weights), str(weights), decoder, str(decoder_weights))
    if name in SHIPPED_TOKENIZERS:
        return _load_trained(SHIPPED_TOKENIZERS[name], weights, overrides)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"unknown tokenizer '{name}': not 'dall-e', not a shipped name "
                                f"({', '.join(SHIPPED_TOKENIZERS)}), and no such file or directory")
    return _load_trained(path, weights, overrides)


def _load_trained(path: Path, weights: str | Path | None, overrides: dict) -> FrozenTokenizer:
    """Config from the yaml (or, failing that, the safetensors metadata), overrides on top; then weights."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer '{path}' does not exist (expected a run directory, tokenizer.yaml or tokenizer.safetensors)")
    cfg_path, weight_path = _tokenizer_files(path)
    weight_path = Path(weights) if weights is not None else weight_path
    if not weight_path.is_file():
        raise FileNotFoundError(f"tokenizer weight file '{weight_path}' does not exist")
    trained_as = _stored_tokenizer_config(weight_path)
    if cfg_path is not None and cfg_path.is_file():
        raw, source = _read_tokenizer_yaml(cfg_path), str(cfg_path)
    elif trained_as is not None:
        raw, source = dict(trained_as), f"{weight_path} metadata"
    else:
        raise FileNotFoundError(f"no tokenizer config for '{path}': expected '{cfg_path or path.with_suffix('.yaml')}' or a safetensors file written by beit")
    cfg = tokenizer_config({**raw, **overrides}, source, str(weight_path), trained_as)
    return dvae_tokenizer(cfg, read_tokenizer_weights(weight_path), str(weight_path))


def _tokenizer_files(path: Path) -> tuple[Path | None, Path]:
    """A run directory, its yaml, or its safetensors -> (config yaml or None, weight file)."""
    if path.is_dir():
        return path / "tokenizer.yaml", path / "tokenizer.safetensors"
    if path.suffix in (".yaml", ".yml"):
        return path, path.with_suffix(".safetensors")
    yaml_path = path.with_suffix(".yaml")
    return (yaml_path if yaml_path.is_file() else None), path


def _read_tokenizer_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TokenizerError(f"cannot parse tokenizer config '{path}': {e}") from None
    raw = raw.get("tokenizer", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise TokenizerError(f"'{path}' must be a mapping (optionally under a 'tokenizer:' key)")
    return raw


def _stored_tokenizer_config(weights: Path) -> dict | None:
    """The config `beit tokenizer train` stores in its safetensors metadata (None for other files)."""
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise TokenizerError(f"cannot read tokenizer weights '{weights}': {type(e).__name__}: {str(e)[:300]}") from None
    return json.loads(meta["tokenizer_config"]) if "tokenizer_config" in meta else None


def read_tokenizer_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A tokenizer's state dict from safetensors or a torch file, read by `beit.convert.read_checkpoint` (it never
    unpickles arbitrary objects) and unwrapped from `{'state_dict': …}` / `{'model': …}` containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer weight file '{path}' does not exist")
    try:
        state = read_checkpoint(path)
    except ValueError as e:  # corrupt, truncated, or a pickled module rather than a state dict
        hint = ""
        if "pickles Python objects" in str(e) or path.suffix == ".pkl":
            hint = " If it is OpenAI's pickled encoder.pkl/decoder.pkl, convert it once with `beit tokenizer convert SRC DST --trust-pickle`."
        raise TokenizerError(f"cannot read tokenizer weights '{path}': {str(e)[:300]}.{hint}") from None
    state = unwrap_checkpoint(state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenizerError(f"'{path}' does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def convert_dalle_pickle(src: str | Path, dst: str | Path, trust_pickle: bool = False) -> Path:
    """Convert OpenAI's pickled `encoder.pkl` / `decoder.pkl` into a safetensors state dict, once.

    Unpickling runs arbitrary code from the file, so it only happens when `trust_pickle=True` (CLI:
    `beit tokenizer convert SRC DST --trust-pickle`). It needs the `dall_e` package importable.
    The output holds our key names under `encoder.` or `decoder.`; load it with
    `create_tokenizer("dall-e", weights=DST)`.
    """
    src, dst = Path(src), Path(dst)
    if not trust_pickle:
        raise PermissionError(f"refusing to unpickle '{src}': a pickle can run arbitrary code. If you trust the file "
                              "(e.g. downloaded from cdn.openai.com), pass trust_pickle=True (CLI: --trust-pickle)")
    if not src.is_file():
        raise FileNotFoundError(f"'{src}' does not exist; download it from https://cdn.openai.com/dall-e/{src.name} (use wget -O, capital O)")
    try:
        import dall_e  # noqa: F401  (the pickle refers to dall_e.encoder.Encoder)
    except ImportError as e:
        raise ImportError("unpickling DALL-E's module needs `pip install DALL-E attrs`") from e
    obj = torch.load(src, map_location="cpu", weights_only=False)  # explicit, user-trusted pickle
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    enc, dec = split_encoder_decoder(dalle_to_ours(state), str(src))
    out = {f"encoder.{k}": v for k, v in enc.items()} | {f"decoder.{k}": v for k, v in dec.items()}
    return write_weights({k: v.float() for k, v in out.items()}, dst, metadata={"format": "beit-dalle", "source": src.name})


def build_mim_dataset(cfg: Config, grid: tuple[int, int], split: str = "train",
                      seed: int | None = None) -> MIMDataset | ShardDataset:
    """The pretraining set: (patch view, tokenizer view, block mask) per image, keyed by (seed, epoch, index).
    From shards (data.dataset=webdataset) the reader's workers make the same items."""
    seed = cfg.train.seed if seed is None else seed
    if cfg.data.dataset in SEG_DATASETS:  # pretraining on a segmentation set's own images (masks unused)
        base = build_seg_dataset(cfg, split)
    else:
        base = build_dataset(cfg.data, split)
    item = MIMItem(build_two_view_transform(cfg.data, cfg.tokenizer.image_size), build_mask_generator(cfg.data, grid),
                   seed)
    if isinstance(base, ShardDataset):
        return base.with_items(item, seed)
    return MIMDataset(base, item.two_view, item.mask_gen, seed=seed)


def build_labeled_dataset(cfg: Config, split: str, train_transform: bool = False, classes: list[str] | None = None):
    """`build_dataset` with the fine-tuning (train) or eval transform; bad label fractions become ConfigErrors.
    `classes` numbers an ImageFolder split by a checkpoint's class index (default: the training split's)."""
    try:
        ds = build_dataset(cfg.data, split, build_finetune_transform(cfg.data, train=train_transform),
                           label_seed=cfg.train.seed, classes=classes)
    except ValueError as e:  # e.g. a label fraction that leaves a class empty
        raise ConfigError(str(e)) from None
    # timm's random transforms draw from the global RNGs: key them by (seed, epoch, index) for exact resumes
    return keyed_items(ds, cfg.train.seed) if train_transform else ds


def build_eval_loader(cfg: Config, split: str = "test", dataset=None) -> DataLoader:
    """Sequential loader over `split` with the eval transform (Resize(size / crop_pct) + CenterCrop)."""
    dataset = dataset if dataset is not None else build_labeled_dataset(cfg, split)
    return DataLoader(dataset, batch_size=cfg.data.batch_size * 2, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=collate_skip_bad, pin_memory=torch.cuda.is_available())
