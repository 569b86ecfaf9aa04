"""k-NN classification on frozen features (InstDisc / DINO weighted vote).

features  f = L2-normalise(pooled_features(model, x))          [N, D]   (see evaluate.pooled_features)
sim       = f_test @ f_train.T                                   [B, N_train]  (cosine)
vote      = sum over the k nearest of exp(sim / T) * onehot(label)   [B, K]
top-1/top-5 = ranks of the vote.

The memory bank is the training split with the eval transform (no augmentation), restricted by
`data.label_fraction` / `data.train_subset` like every other command; queries are `train.eval_split`.
`knn_evaluate(model, cfg)` is the periodic signal for pretraining (`train.knn_every_epochs`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from beit.builders import build_eval_loader, build_model
from beit.config import Config
from beit.train.checkpoint import unwrap
from beit.train.evaluate import accuracy, pooled_features, run_over, write_results
from beit.train.runner import evaluation_processes, open_run_dir

log = logging.getLogger("beit")


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024, progress: bool = False) -> dict[str, float]:
    """Weighted k-NN over L2-normalised features. Returns {"top1": %, "top5": %}."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)  # [N, D]
    queries = F.normalize(test_feats.float(), dim=1)
    votes = []
    for q in tqdm(queries.split(chunk), desc="k-NN vote", leave=False, disable=None if progress else True):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [b, k]
        weight = (sim / temperature).exp()
        onehot = F.one_hot(train_labels[idx], num_classes).float()  # [b, k, K]
        votes.append((onehot * weight[..., None]).sum(1))  # [b, K]
    return accuracy(torch.cat(votes), test_labels)


def knn_evaluate(model: nn.Module, cfg: Config) -> dict[str, float]:
    """k-NN top-1/top-5 (percent) of `model`'s frozen features with cfg.train.knn_k / knn_temperature.

    Runs on the model's device under cfg.train.amp, in eval mode (the previous mode is restored), so the
    pretraining loop can call it every `train.knn_every_epochs`. Keys: knn_top1, knn_top5.
    """
    net = unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        fn = lambda x: pooled_features(net, x)  # noqa: E731
        train_feats, train_labels = run_over(build_eval_loader(cfg, "train"), fn, device, cfg.train.amp,
                                             "k-NN features (train)", cfg.train.progress)
        split = cfg.train.eval_split
        test_feats, test_labels = run_over(build_eval_loader(cfg, split), fn, device, cfg.train.amp,
                                           f"k-NN features ({split})", cfg.train.progress)
    finally:
        net.train(was_training)
    res = knn_classify(train_feats, train_labels, test_feats, test_labels, cfg.train.knn_k, cfg.train.knn_temperature,
                       progress=cfg.train.progress)
    return {f"knn_{k}": v for k, v in res.items()}


def run_knn(cfg: Config, overwrite: bool = False, resume: bool = False) -> Path | None:
    """`beit knn`: k-NN accuracy of `model.pretrained` (or a random init, as a floor) -> results.json. Under
    torchrun the ranks split the feature passes and rank 0 writes (the others return None)."""
    with evaluation_processes(cfg) as info:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg).to(info.device)  # fails before any run directory exists
        run_dir = open_run_dir(cfg, overwrite=overwrite or resume) if info.is_main else None
        if not cfg.model.pretrained:
            log.warning("model.pretrained is null: k-NN on a randomly initialised model (a floor, not a result)")
        t0 = time.time()
        res = knn_evaluate(model, cfg)
    if run_dir is None:
        return None
    results = {"command": "knn", "pretrained": cfg.model.pretrained, "k": cfg.train.knn_k,
               "temperature": cfg.train.knn_temperature, "label_fraction": cfg.data.label_fraction,
               "features": "fc_norm(mean patch tokens)" if model.fc_norm is not None else "mean of final normed "
               "patch tokens", "top1": res["knn_top1"], "top5": res["knn_top5"], "wall_time_s": time.time() - t0}
    write_results(run_dir, results)
    log.info(f"k-NN (k={cfg.train.knn_k}, T={cfg.train.knn_temperature}): top-1 {results['top1']:.2f}%  "
             f"top-5 {results['top5']:.2f}%")
    return run_dir
