"""Typed run configuration.

A run is described by one YAML file with the sections `model`, `tokenizer`, `data`, `optim`, `train`,
`dist` and (segmentation) `seg`. Each section is a pydantic model that forbids unknown keys, so a typo is an error that names
the key (with a "did you mean"), never a silently ignored default. Command-line overrides use dotted
keys: `beit pretrain cfg.yaml optim.lr=1e-3 train.epochs=2`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    name: str = "beit_base_patch16_224_8k_vocab"  # a key of beit.models.presets.PRESETS
    pretrained: str | None = None  # checkpoint path (any supported layout); null = random init
    # Overrides of the preset; null keeps the preset's value.
    img_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_classes: int | None = None
    vocab_size: int | None = None
    drop_path_rate: float | None = None
    init_values: float | None = None  # LayerScale init; 0 disables LayerScale
    use_abs_pos_emb: bool | None = None
    use_rel_pos_bias: bool | None = None  # one table per layer (fine-tuning)
    use_shared_rel_pos_bias: bool | None = None  # one table for all layers (pretraining)
    use_mean_pooling: bool | None = None
    init_trunc: Literal["sigma", "abs"] | None = None
    # What presets fix and foreign checkpoints may not share (an HF BEiT folder of any size rebuilds from these).
    patch_size: int | None = Field(None, gt=0)
    mlp_ratio: float | None = Field(None, gt=0)
    layer_norm_eps: float | None = Field(None, gt=0)
    # Segmentation presets only (BeitSegmenter): 0-based blocks the neck reads, UperNet / auxiliary head sizes.
    out_indices: list[int] | None = None
    channels: int | None = Field(None, gt=0)
    pool_scales: list[int] | None = None
    use_aux_head: bool | None = None
    aux_channels: int | None = Field(None, gt=0)
    aux_num_convs: int | None = Field(None, ge=1)
    neck_scales: list[float] | None = None  # the neck's 4 resize factors (default: strides 4..32)
    grad_checkpointing: bool = False

    def overrides(self) -> dict[str, Any]:
        skip = {"name", "pretrained", "grad_checkpointing"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class TokenizerConfig(_Section):
    name: str = "dall-e"  # "dall-e", a shipped tokenizer name, or a path to a trained tokenizer directory
    weights: str | None = None  # weight file for "dall-e" (safetensors or a weights_only state dict)
    # Architecture of a tokenizer trained with `beit tokenizer train`.
    vocab_size: int = 8192
    hidden: int = 64  # width of the first stage
    blocks_per_group: int = 1
    downsample: Literal[4, 8] = 8
    in_chans: int = 3
    image_size: int = 112  # tokenizer view size
    # dVAE training recipe (DALL-E's, scaled down).
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_anneal_steps: int = 5000
    kl_weight: float = 1e-3
    kl_warmup_steps: int = 1000
    recon_loss: Literal["laplace", "mse"] = "laplace"
    # Dead-code countermeasures (ours, not DALL-E's; docs/tokenizer.md). Without them 20-23% of codes were used.
    usage_entropy_weight: float = Field(0.1, ge=0)  # weight of log V - H(batch-mean relaxed one-hot)
    revive_every: int = Field(100, ge=1)  # steps per window over which code use is counted
    revive_min_count: int = Field(1, ge=1)  # a code picked fewer times in a window is re-initialised
    revive_until: float = Field(0.75, ge=0, le=1)  # fraction of the run during which codes are revived
    revive_margin: float = Field(1.0, gt=0)  # logit lead of a revived code at the position it was seeded from
    final_steps: int = Field(150, ge=0)  # decoder-only steps after the final revival (at most 1/5 of the run)


# beit/data: datasets.py, extra.py, shards.py
DATASETS = ("fashion_mnist", "mnist", "image_folder", "cifar10", "cifar100", "hf", "webdataset")
SEG_DATASETS = ("ade20k", "seg_folder", "fmnist_scenes")  # `beit segment`: beit/data/segmentation.py


class DataConfig(_Section):
    # fashion_mnist | mnist | image_folder | cifar10 | cifar100 | hf (datasets on disk) | torchvision:<Class>
    # | webdataset (tar shards written by `beit data shard`, beit/data/shards.py);
    # segmentation (`beit segment`): ade20k (ADEChallengeData2016) | seg_folder (images/ + masks/) | fmnist_scenes
    dataset: str = "image_folder"
    root: str | None = None  # data directory; fashion_mnist defaults to the Debian package path
    # webdataset: brace patterns, relative to root unless absolute.
    shards: str | None = None  # training split, e.g. "train-{000000..000999}.tar"
    eval_shards: str | None = None  # test split (fine-tuning evaluation, k-NN)
    val_shards: str | None = None  # validation split (train.eval_split=val): shards cannot hold one out by data.val_size
    shuffle_buffer: int = Field(2000, ge=0)  # samples per loader worker shuffled together (encoded bytes)
    img_size: int = Field(224, gt=0)  # patch view
    in_chans: Literal[1, 3] = 3
    mean: list[float] = [0.5, 0.5, 0.5]
    std: list[float] = [0.5, 0.5, 0.5]
    batch_size: int = Field(64, gt=0)  # per device, per micro-batch
    num_workers: int = Field(4, ge=0)
    on_bad_file: Literal["skip", "fail"] = "skip"
    # An evaluation split's class folder that the training split lacks: "fail" (before any work) or "skip"
    # its images (counted by class name in the log). Every split is numbered by the training split's classes.
    on_unknown_class: Literal["fail", "skip"] = "fail"
    # Pretraining augmentation (shared crop, two views).
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = Field(0.4, ge=0)  # pretraining; fine-tuning too, but only where auto_augment is off (as in timm)
    hflip: float = Field(0.5, ge=0, le=1)
    # Block-wise masking (BEiT Alg. 1).
    num_mask_patches: int = Field(75, ge=0)
    min_mask_patches: int | None = Field(16, ge=0)  # null = proportional to the grid (16 / 196 of it)
    max_mask_patches: int | None = Field(None, ge=1)
    mask_min_aspect: float = Field(0.3, gt=0)
    mask_mode: Literal["official", "exact"] = "official"
    # Fine-tuning augmentation (timm's create_transform / Mixup).
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = Field(0.25, ge=0, le=1)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    crop_pct: float | None = Field(None, gt=0, le=1)  # eval: Resize(size / crop_pct) + CenterCrop; null = 0.875, 1.0 at >= 384
    # Validation split: this many training images (stratified, a fixed draw independent of train.seed) are
    # held out as split "val"; "train" is the rest, and label_fraction draws from that rest. 0 = no val split.
    val_size: int = Field(0, ge=0)
    label_fraction: float = Field(1.0, gt=0, le=1)  # class-balanced, seeded subset of the training labels
    train_subset: int | None = Field(None, gt=0)  # first N training samples (smoke tests)
    eval_subset: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_stats(cls, data):
        """mean/std left out default to 0.5 per channel, for 1 channel as for 3."""
        if isinstance(data, dict) and data.get("in_chans") in (1, "1"):
            data = {"mean": [0.5], "std": [0.5], **data}
        return data

    @model_validator(mode="after")
    def _check(self):
        for key in ("mean", "std"):
            if len(getattr(self, key)) != self.in_chans:
                raise ValueError(f"data.{key} has {len(getattr(self, key))} values but data.in_chans is {self.in_chans}")
        if min(self.std) <= 0:
            raise ValueError(f"data.std must be positive, got {self.std}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"data.crop_ratio must satisfy 0 < min <= max, got {list(self.crop_ratio)}")
        return self

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v in DATASETS or v in SEG_DATASETS or (v.startswith("torchvision:") and len(v) > len("torchvision:")):
            return v
        raise ValueError(f"unknown dataset {v!r}; use one of {', '.join(DATASETS + SEG_DATASETS)} or "
                         f"torchvision:<ClassName> "
                         f"(e.g. torchvision:STL10)")


class SegConfig(_Section):
    """Semantic segmentation (`beit segment`): the mmseg ADE20K pipeline. The crop is `data.img_size`."""

    scale: tuple[int, int] = (2048, 512)  # resize target (long, short edge), keep ratio; eval uses it at ratio 1
    ratio_range: tuple[float, float] = (0.5, 2.0)  # train: the scale is multiplied by U(ratio_range)
    cat_max_ratio: float = Field(0.75, gt=0, le=1)  # crop retries (10) while one class covers more than this
    photometric: bool = True  # mmseg PhotoMetricDistortion (brightness, contrast, saturation, hue)
    ignore_index: int = 255  # label excluded from loss and metrics; also the padding value of masks
    reduce_zero_label: bool | None = None  # 0 -> ignore, k -> k-1; null: on for ade20k, off otherwise
    class_names: str | None = None  # seg_folder: text file, one class name per line (default root/classes.txt)
    eval_mode: Literal["slide", "whole"] = "slide"
    stride: int | None = None  # sliding-window stride; null = 2/3 of the crop (341 for 512, as official)
    eval_batch_size: int = 1  # images per evaluation batch (sizes differ on ADE20K: keep 1 there)
    scenes: tuple[int, int] = (20000, 2000)  # fmnist_scenes: (train, test) scenes
    scene_seed: int = 0  # fmnist_scenes: the scenes are a function of this seed and the index
    # Fidelity switches (docs/deviations.md); each default is the official recipe (unilm + mmseg 0.x).
    sync_bn: bool = True  # under torchrun, BatchNorm statistics over the global batch (official SyncBN)
    loss_avg_non_ignore: bool = False  # false: CE summed over labelled pixels / all pixels (mmseg 0.x)
    resize_antialias: bool = False  # false: bilinear without antialiasing, as cv2 / mmcv.imresize
    eval_amp: bool = False  # false: evaluate in fp32 (official); true: under train.amp
    # Multi-scale + flip test (mmseg aug_test): sliding window at each ratio of seg.scale, softmax averaged.
    # null = single scale; the official `_ms` values are [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] with eval_flip.
    eval_scales: list[float] | None = None
    eval_flip: bool = False

    @field_validator("eval_scales")
    @classmethod
    def _positive_scales(cls, v):
        if v is not None and (not v or min(v) <= 0):
            raise ValueError(f"seg.eval_scales must be a non-empty list of positive ratios or null, got {v}")
        return v


class OptimConfig(_Section):
    lr: float = Field(1.5e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    warmup_steps: int | None = Field(None, ge=0)  # overrides warmup_epochs when set
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float | None = Field(3.0, gt=0)
    layer_decay: float | None = Field(None, gt=0, le=1)  # e.g. 0.65 for BEiT-B fine-tuning
    head_lr_scale: float = Field(1.0, gt=0)  # lr multiplier of the layer above the backbone (head, neck); mmseg's lr_mult
    accum_steps: int = Field(1, ge=1)
    recipe_batch_size: int | None = Field(None, gt=0)  # the global batch the lr was tuned for; a mismatch warns loudly
    decay_mask_token: bool = True  # official: mask_token is weight-decayed
    decay_rel_pos_bias: bool = True  # official: rel-pos tables are weight-decayed
    schedule: Literal["cosine", "poly"] = "cosine"  # after warmup: cosine to min_lr, or poly decay to min_lr
    poly_power: float = 1.0  # poly: lr = min_lr + (lr - min_lr) * (1 - progress) ** poly_power (mmseg)


class TrainConfig(_Section):
    epochs: float = Field(800, ge=0)
    max_steps: int | None = Field(None, ge=0)  # stop early (smoke runs); schedules still span `epochs` (or `steps`)
    steps: int | None = Field(None, gt=0)  # train length in optimizer steps (segmentation: 160k); overrides `epochs`
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 where the hardware has it (GPU, AMX CPU), else fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs"
    run_name: str | None = None  # default: the config file's stem
    log_every: int = Field(10, ge=1)
    save_every_steps: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=0)  # newest training checkpoints kept; 0 keeps all
    eval_every_epochs: float = Field(1, gt=0)
    eval_split: Literal["test", "val"] = "test"  # what periodic evaluation (and k-NN queries) read; "val" needs data.val_size
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    knn_every_epochs: float | None = Field(None, gt=0)
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    compile: bool = False
    progress: bool = True
    probe_cache_features: bool = False  # linprobe: embed once with the eval transform (no augmentation)
    # Written when fine-tuning / pretraining ends: <run>/<export_dir>/<format> (see `beit export`); [] = none.
    export: list[Literal["hf", "timm"]] = ["hf", "timm"]
    export_dir: str = "export"


class DistConfig(_Section):
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # ddp: every process holds the whole model. fsdp: FSDP2 `fully_shard` per block and on the root
    # (parameters, gradients and optimizer state sharded); bf16 params / fp32 gradient reduction under
    # train.amp=bf16; activation checkpointing is model.grad_checkpointing. Checkpoints are gathered to one
    # file either way (see docs/distributed.md).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    find_unused_parameters: bool = False  # ddp only
    fsdp_cpu_offload: bool = False  # fsdp on CUDA: parameters, gradients and optimizer state live on the CPU


class Config(_Section):
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    dist: DistConfig = DistConfig()
    seg: SegConfig = SegConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.train.eval_split == "val" and self.data.val_size == 0 and not self.data.val_shards:
            raise ValueError("train.eval_split=val needs a validation split: set data.val_size (e.g. 5000 training "
                             "images held out; data.val_shards for webdataset) or use train.eval_split=test")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr {self.optim.min_lr:g} is above optim.lr {self.optim.lr:g}")
        if self.dist.strategy == "fsdp":
            if self.train.amp == "fp16":
                raise ValueError("dist.strategy=fsdp supports train.amp=bf16 or none (fp16's loss scaler is not "
                                 "shard-aware here); use train.amp=bf16")
            if self.train.ema_decay is not None:
                raise ValueError("train.ema_decay needs a full copy of the model, which dist.strategy=fsdp does not "
                                 "keep; set train.ema_decay=null or use dist.strategy=ddp")
        elif self.dist.fsdp_cpu_offload:
            raise ValueError("dist.fsdp_cpu_offload=true needs dist.strategy=fsdp")
        return self

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step: per device x accumulation x processes."""
        return self.data.batch_size * self.optim.accum_steps * world_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_machine(cfg: Config, source: str = "config"):
    """Checks that depend on this machine, for a config about to run here. Not part of the schema, so that a
    config stored in a checkpoint (an fp16 GPU run, say) still loads on a CPU-only machine for evaluation."""
    if cfg.dist.fsdp_cpu_offload and not _cuda_for(cfg.train.device):
        raise ConfigError(f"{source}: dist.fsdp_cpu_offload=true offloads from a GPU, and train.device="
                          f"{cfg.train.device} has none here; set dist.fsdp_cpu_offload=false")
    if cfg.train.amp == "fp16" and not _cuda_for(cfg.train.device):
        raise ConfigError(f"{source}: train.amp=fp16 needs a CUDA device (dynamic loss scaling) and train.device="
                          f"{cfg.train.device} has none here; use train.amp=bf16 (or none) on CPU")


def _cuda_for(device: str) -> bool:
    """Whether `train.device` will run on CUDA (torch is imported only for fp16 configs: `--help` stays light)."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _section_fields(path: tuple) -> list[str]:
    """Field names that were valid at `path` (for "did you mean")."""
    cls: type[BaseModel] = Config
    for part in path:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _section_fields(e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f" Did you mean '{'.'.join(map(str, e['loc'][:-1] + (close[0],)))}'?" if close else ""
            lines.append(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}")
        elif e["type"] == "value_error":  # a check across keys; its message names them
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else e["msg"])
        else:
            lines.append(f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return ConfigError(f"{source}: " + "; ".join(lines))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "data.root=/x"]` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override '{item}': the key must name a section, e.g. optim.lr=1e-3")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); quote it, "
                              f"e.g. {key}='\"...\"'") from None
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what went wrong and where (1-based line and column), not PyYAML's report."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(e, "problem", None) or type(e).__name__)


def read_yaml_mapping(path: Path, kind: str, of: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (of `of`); a missing file, bad YAML or another top level is a
    one-line ConfigError naming the file (and the line and column)."""
    if not path.is_file():
        raise ConfigError(f"{kind} '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML at {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {of}")
    return raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Defaults of one command where they differ from the section defaults (which follow pretraining), applied
# under the file: official fine-tuning (unilm run_class_finetuning.py) clips nothing and warms up 5 epochs.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "finetune": {"optim": {"clip_grad": None, "warmup_epochs": 5}},
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, command: str | None = None) -> Config:
    """Read a YAML config (or defaults when `path` is None), apply dotted overrides, validate. `command`
    selects its COMMAND_DEFAULTS for keys the file and overrides leave out."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = read_yaml_mapping(path, "config file", "sections")
    raw = _merge(_merge(COMMAND_DEFAULTS.get(command, {}), raw), parse_overrides(overrides or []))
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, source) from None
    check_machine(cfg, source)
    if path is not None and cfg.train.run_name is None:
        cfg.train.run_name = path.stem
    return cfg


# Keys that may differ between a run and its --resume (docs/reliability.md): cadence, length, where it runs.
RESUME_MAY_CHANGE = ("train.epochs", "train.max_steps", "train.log_every", "train.save_every_steps", "train.keep_last",
                     "train.eval_every_epochs", "train.knn_every_epochs", "train.progress", "train.out_dir",
                     "train.run_name", "data.num_workers", "train.device", "train.compile", "dist.backend",
                     "dist.strategy", "dist.find_unused_parameters", "dist.fsdp_cpu_offload")
# ...and these two when the global batch they make with the process count is the checkpoint's (another
# number of processes at the same global batch).
RESUME_MAY_CHANGE_AT_SAME_GLOBAL_BATCH = ("data.batch_size", "optim.accum_steps")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(stored: dict, cfg: Config, source: str, same_global_batch: bool = False):
    """--resume with a config that differs from the run's stored one (`source`) is an error naming the keys,
    except RESUME_MAY_CHANGE (and RESUME_MAY_CHANGE_AT_SAME_GLOBAL_BATCH when `same_global_batch`)."""
    old, new = _flatten(config_from_dict(stored, source).to_dict()), _flatten(cfg.to_dict())
    free = RESUME_MAY_CHANGE + (RESUME_MAY_CHANGE_AT_SAME_GLOBAL_BATCH if same_global_batch else ())
    diff = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and k not in free]
    if diff:
        raise ConfigError(
            f"--resume: the config differs from the run's ({source}) in " + ", ".join(
                f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diff)
            + ". Resume with the run's values, or start a new run. Keys that may change on resume: "
            + ", ".join(RESUME_MAY_CHANGE) + "; and " + ", ".join(RESUME_MAY_CHANGE_AT_SAME_GLOBAL_BATCH)
            + " if the global batch (per device x accumulation x processes) stays the same")


def config_from_dict(d: dict[str, Any], source: str = "checkpoint config") -> Config:
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        raise _explain(e, source) from None
