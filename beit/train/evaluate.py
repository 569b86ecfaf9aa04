"""Evaluation shared by finetune / linprobe / knn / eval: loaders, feature extraction, top-k, results files,
and the `beit eval` command (top-1/top-5, per-class accuracy, confusion matrix) on a checkpoint.

Everything that runs a frozen model over a dataset goes through `run_over(loader, fn, device, amp)`, so the
four commands share one eval loader (`build_eval_loader`) and one inference loop.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm import tqdm

from beit.builders import build_eval_loader, build_labeled_dataset, build_model, resolve_pretrained  # noqa: F401
from beit.config import SEG_DATASETS, Config, ConfigError
from beit.data.datasets import warn_bad_files
from beit.train.checkpoint import unwrap
from beit.train.distributed import all_gather_cat, all_reduce_max, rank_and_world, resolve_device
from beit.train.loop import autocast
from beit.train.runner import open_run_dir

log = logging.getLogger("beit")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def class_names(dataset, cfg: Config) -> list[str]:
    if cfg.data.dataset == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    while not hasattr(dataset, "classes") and hasattr(dataset, "base"):
        dataset = dataset.base  # SubsetDataset / torchvision wrapper
    names = getattr(dataset, "classes", None)
    return list(names) if names else []


# ------------------------------------------------------------------------------------------------ inference
def amp_context(device: torch.device, amp: str):
    return autocast(device, "none" if amp == "fp16" and device.type != "cuda" else amp)


def is_sharded(loader: DataLoader) -> bool:
    """Whether evaluation over `loader` is split across ranks: under a process group, unless the dataset is
    streamed (iterable shards have no random access, so every rank reads them whole)."""
    return rank_and_world()[1] > 1 and not isinstance(loader.dataset, IterableDataset)


@torch.no_grad()
def forward_share(loader: DataLoader, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                  amp: str = "bf16", desc: str = "eval", progress: bool = True):
    """Yield (images on CPU, labels, fn(images on `device`)) for each batch of this rank's share of `loader`.

    When `is_sharded(loader)`, each rank runs a contiguous 1/world share of the dataset (rank order = dataset
    order), and ranks with fewer batches repeat a forward at the end so that FSDP's per-forward collectives
    stay matched; the caller combines the ranks' results. Batches whose every file was undecodable (logged by
    the dataset) are skipped. A progress bar (`desc`) shows on the main process when stderr is a terminal."""
    max_batches = None
    if is_sharded(loader):
        loader, max_batches = shard_loader(loader, *rank_and_world())
    done, x = 0, None
    show = progress and is_main_process()
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None if show else True):
        warn_bad_files(getattr(batch, "bad_paths", []))  # skipped in a loader worker: said here, once per file
        images, labels = batch
        if images is None:
            continue
        done += 1
        x = images.to(device, non_blocking=True)
        with amp_context(device, amp):
            out = fn(x)
        yield images, labels, out
    for _ in range(max_batches - done if max_batches is not None and x is not None else 0):
        with amp_context(device, amp):
            fn(x)


def run_over(loader: DataLoader, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
             amp: str = "bf16", desc: str = "eval", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `fn` (images [B, C, H, W] -> [B, ...]) to every batch. Returns (outputs fp32 on CPU, labels).

    Under a process group (torchrun) the ranks split the work (`forward_share`) and the outputs are gathered
    in dataset order, so every rank returns what one process would."""
    outs, labels = [], []
    for _, y, out in forward_share(loader, fn, device, amp, desc, progress):
        outs.append(out.float().cpu())  # the device holds one batch of outputs at a time
        labels.append(y)
    if is_sharded(loader):
        shape = _gathered_shape(outs, device)
        # NCCL gathers device tensors: the whole set passes through the device once, then back to the CPU
        outs = [all_gather_cat((torch.cat(outs) if outs else torch.zeros(0, *shape)).to(device)).cpu()]
        labels = [all_gather_cat((torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)).to(device)).cpu()]
    if not outs or not len(outs[0]):
        raise RuntimeError("the evaluation set yielded no decodable images")
    return torch.cat(outs), torch.cat(labels)


def shard_loader(loader: DataLoader, rank: int, world: int) -> tuple[DataLoader, int]:
    """The same loader over this rank's contiguous share of the dataset (rank order = dataset order), and
    the batch count of the largest share (rank 0's), known without communicating."""
    n = len(loader.dataset)
    per = -(-n // world)
    part = Subset(loader.dataset, range(min(n, rank * per), min(n, (rank + 1) * per)))
    return (DataLoader(part, batch_size=loader.batch_size, num_workers=loader.num_workers,
                       collate_fn=loader.collate_fn, pin_memory=loader.pin_memory),
            -(-min(n, per) // loader.batch_size))


def _gathered_shape(outs: list[torch.Tensor], device) -> list[int]:
    """The per-sample output shape, agreed over ranks (a rank whose share was empty has none of its own)."""
    shape = torch.zeros(8, dtype=torch.long, device=device)  # [D1, D2, ...] padded with zeros
    if outs:
        shape[: outs[0].ndim - 1] = torch.tensor(outs[0].shape[1:])
    return [int(d) for d in all_reduce_max(shape) if d > 0]


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Frozen image features [B, D]: the classifier's pre-logits (fc_norm of the mean patch token) when the
    model has mean pooling, else (MIM / cls-token models) the mean of the final normalised patch tokens."""
    model = unwrap(model)
    tokens = model.forward_features(x)  # [B, N+1, D]
    if getattr(model, "fc_norm", None) is not None:
        return model.forward_head(tokens, pre_logits=True)
    return tokens[:, 1:].mean(1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample hit (bool [B]) of the label in the top-k scores, for each k (clamped to the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    pred = logits.topk(kmax, dim=-1).indices  # [B, kmax]
    hit = pred == labels[:, None]
    return {k: hit[:, : min(k, kmax)].any(-1) for k in ks}


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} (percent, as the paper reports)."""
    return {f"top{k}": 100.0 * v.float().mean().item() for k, v in topk_correct(logits, labels, ks).items()}


def classifier_evaluate(cfg: Config, device: torch.device) -> Callable[[nn.Module], dict]:
    """`evaluate(model)` for the training loop: top-1/top-5 and loss on `train.eval_split` (loader built once)."""
    split = cfg.train.eval_split
    loader = build_eval_loader(cfg, split)

    def evaluate(model: nn.Module) -> dict:
        logits, labels = run_over(loader, model, device, cfg.train.amp, f"eval ({split})", cfg.train.progress)
        return {**accuracy(logits, labels), "loss": nn.functional.cross_entropy(logits, labels).item()}

    return evaluate


# ------------------------------------------------------------------------------------------------ outputs
def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_results(run_dir: Path, results: dict) -> Path:
    path = Path(run_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2))
    log.info(f"results: {path}")
    return path


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes (true), num_classes (predicted)] counts."""
    idx = labels * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def plot_confusion(cm: torch.Tensor, names: list[str], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cm.shape[0]
    rates = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)  # row-normalised: recall per true class
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n) if n <= 20 else (12, 12))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        labels = names if len(names) == n else [str(i) for i in range(n)]
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ beit eval
def checkpoint_class_names(source: str | None) -> list[str]:
    """The class names a checkpoint was trained with (its run's class index), [] when it does not say."""
    from beit.hub import read_source  # hub reaches this module lazily too; both stay importable alone

    try:
        return list(read_source(source).class_names) if source else []
    except (OSError, ValueError, ConfigError):  # a foreign layout or preset tag: no names to compare
        return []


def eval_dataset(cfg: Config, checkpoint_names: list[str], allow_other_classes: bool = False):
    """The test split numbered by the checkpoint's class index; class names that differ from the checkpoint's
    are an error showing both lists (unless `allow_other_classes`: then the data's own numbering is scored)."""
    hint = "pass --allow-other-classes if they are meant to differ (labels are then compared by index)"
    if allow_other_classes or not checkpoint_names:
        return build_labeled_dataset(cfg, "test")
    if cfg.data.dataset in ("image_folder", "webdataset"):  # matched by name: a subset of the classes is fine
        try:
            return build_labeled_dataset(cfg, "test", classes=checkpoint_names)
        except ConfigError as e:
            raise ConfigError(f"the data's class names differ from the checkpoint's: {e}; {hint}") from None
    dataset = build_labeled_dataset(cfg, "test")
    names = class_names(dataset, cfg)
    if names and names != checkpoint_names:
        raise ConfigError(f"the data's class names {names} differ from the checkpoint's {checkpoint_names} "
                          f"({cfg.model.pretrained}); {hint}")
    return dataset


def run_eval(cfg: Config, overwrite: bool = False, resume: bool = False, allow_other_classes: bool = False) -> Path:
    """Evaluate `model.pretrained` on the test split: results.json (top-1/top-5, per-class accuracy, confusion
    matrix) and confusion.png in runs/<run_name>/. Segmentation data (`beit segment` runs): mIoU and friends.
    The data is read with the checkpoint's class index; other class names are an error unless
    `allow_other_classes`."""
    if cfg.data.dataset in SEG_DATASETS:
        from beit.train.segment import run_seg_eval  # segment imports this module

        return run_seg_eval(cfg, overwrite=overwrite or resume)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg, need_pretrained=True).to(device).eval()  # fails before any run directory exists
    if model.num_classes <= 0:
        raise ConfigError(f"model {cfg.model.name} has no classification head (num_classes=0); `beit eval` needs "
                          f"a fine-tuned classifier — use `beit knn` or `beit linprobe` for a pretrained backbone")
    own = checkpoint_class_names(cfg.model.pretrained)
    loader = build_eval_loader(cfg, "test", eval_dataset(cfg, own, allow_other_classes))
    run_dir = open_run_dir(cfg, overwrite=overwrite or resume)
    logits, labels = run_over(loader, model, device, cfg.train.amp, "eval (test)", cfg.train.progress)
    k = model.num_classes
    if int(labels.max()) >= k:
        raise ConfigError(f"the data has label {int(labels.max())} but the model has {k} classes")
    cm = confusion_matrix(logits.argmax(-1), labels, k)
    names = own if own and not allow_other_classes else class_names(loader.dataset, cfg)
    names = names if len(names) == k else [str(i) for i in range(k)]
    per_class = {names[i]: (100.0 * cm[i, i].item() / cm[i].sum().item()) if cm[i].sum() else None for i in range(k)}
    results = {
        "checkpoint": resolve_pretrained(cfg.model.pretrained), "split": "test", "num_samples": len(labels),
        **accuracy(logits, labels), "per_class_top1": per_class, "class_names": names,
        "confusion_matrix": cm.tolist(),
    }
    plot_confusion(cm, names, run_dir / "confusion.png",
                   f"{cfg.model.name}: top-1 {results['top1']:.2f}% ({len(labels)} test images)")
    write_results(run_dir, results)
    log.info(f"top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  ({len(labels)} images)")
    return run_dir
