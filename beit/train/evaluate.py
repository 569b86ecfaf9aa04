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

from beit.builders import build_eval_loader
from beit.config import Config
from beit.data.datasets import FASHION_MNIST_CLASSES, warn_bad_files
from beit.train.checkpoint import unwrap
from beit.train.distributed import all_gather_cat, all_reduce_max, rank_and_world
from beit.train.loop import autocast

log = logging.getLogger("beit")


def class_names(dataset, cfg: Config) -> list[str]:
    if cfg.data.dataset == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    while not hasattr(dataset, "classes") and hasattr(dataset, "base"):
        dataset = dataset.base  # a wrapper whose base holds the class names (e.g. MIMDataset)
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
                  amp: str = "auto", desc: str = "eval", progress: bool = True):
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
             amp: str = "auto", desc: str = "eval", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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
