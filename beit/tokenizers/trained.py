"""Load a dVAE trained by `beit tokenizer train` (a run directory, its files, or a shipped asset) as a frozen tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from beit.config import TokenizerConfig
from beit.tokenizers.base import FrozenTokenizer, TokenizerError, check_state_dict, load_state_dict_file
from beit.tokenizers.dvae import DVAE

ARCH_FIELDS = ("vocab_size", "hidden", "blocks_per_group", "downsample", "in_chans", "recon_loss")


class DVAETokenizer(FrozenTokenizer):
    """Frozen wrapper of a trained `DVAE`: encode images in [0, 1] -> [B, H/ds, W/ds] ids."""

    def __init__(self, model: DVAE, source: str = ""):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.vocab_size, self.downsample, self.in_chans = model.cfg.vocab_size, model.cfg.downsample, model.cfg.in_chans
        self.decoder = model.decoder
        self.source = source
        self.freeze()

    def logits(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        return self.model.logits(self.check_images(images, check_range))  # map_pixels happens inside

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode_ids(ids)


def _read_yaml_config(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TokenizerError(f"cannot parse tokenizer config '{path}': {e}") from None
    raw = raw.get("tokenizer", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise TokenizerError(f"'{path}' must be a mapping (optionally under a 'tokenizer:' key)")
    return raw


def _metadata_config(weights: Path) -> dict | None:
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise TokenizerError(f"cannot read tokenizer weights '{weights}': {type(e).__name__}: {str(e)[:300]}") from None
    return json.loads(meta["tokenizer_config"]) if "tokenizer_config" in meta else None


def resolve_files(path: Path) -> tuple[Path | None, Path]:
    """A run directory, its yaml, or its safetensors -> (config yaml or None, weight file)."""
    if path.is_dir():
        return path / "tokenizer.yaml", path / "tokenizer.safetensors"
    if path.suffix in (".yaml", ".yml"):
        return path, path.with_suffix(".safetensors")
    yaml_path = path.with_suffix(".yaml")
    return (yaml_path if yaml_path.is_file() else None), path


def load_trained(path: str | Path, weights: str | Path | None = None, **overrides) -> DVAETokenizer:
    """Config from the yaml (or, failing that, the safetensors metadata), overrides on top; then weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer '{path}' does not exist (expected a run directory, tokenizer.yaml or tokenizer.safetensors)")
    cfg_path, weight_path = resolve_files(path)
    weight_path = Path(weights) if weights is not None else weight_path
    if not weight_path.is_file():
        raise FileNotFoundError(f"tokenizer weight file '{weight_path}' does not exist")
    meta_cfg = _metadata_config(weight_path)
    if cfg_path is not None and cfg_path.is_file():
        raw, source = _read_yaml_config(cfg_path), str(cfg_path)
    elif meta_cfg is not None:
        raw, source = dict(meta_cfg), f"{weight_path} metadata"
    else:
        raise FileNotFoundError(f"no tokenizer config for '{path}': expected '{cfg_path or path.with_suffix('.yaml')}' or a safetensors file written by beit")
    raw.update(overrides)
    raw.pop("weights", None)
    try:
        cfg = TokenizerConfig.model_validate(raw)
    except ValidationError as e:
        raise TokenizerError(f"{source}: bad tokenizer config: {e.errors()[0]['loc']} {e.errors()[0]['msg']}") from None
    if meta_cfg is not None:  # the weights say what they were trained as; a config that disagrees is a mix-up
        diff = [f"{k}: config {getattr(cfg, k)!r} vs checkpoint {meta_cfg[k]!r}" for k in ARCH_FIELDS
                if k in meta_cfg and meta_cfg[k] != getattr(cfg, k)]
        if diff:
            raise TokenizerError(f"'{weight_path}' was trained with a different architecture than {source} (+ overrides) asks for: {'; '.join(diff)}")
    model = DVAE(cfg)
    state = load_state_dict_file(weight_path)
    check_state_dict(model, state, f"'{weight_path}'")
    model.load_state_dict(state)
    return DVAETokenizer(model, source=str(weight_path))
