"""`beit study`: does pretraining on my unlabeled images help, and by how much? A protocol a reviewer accepts.

For each label fraction:
  1. every arm (BEiT-pretrained, the same ViT from scratch, optionally a small CNN from scratch) trains once per
     point of its grid (e.g. lr x layer decay; the same number of points for every arm) on the training split
     minus a held-out validation split, and is scored on validation only;
  2. each arm keeps its best grid point (its own recipe) and trains it with `seeds` seeds; seed s draws the same
     labelled subset for every arm, so the arms' test scores pair up by seed;
  3. each final run is evaluated on the test split once, at its end;
  4. a raw-pixel k-NN (k chosen on validation) on the same labelled subsets places the numbers.
The report gives each arm's validation grid, its recipe, test mean ± std over seeds, and the pretrained arm's
paired gain over every other arm and the pixel k-NN with its 95% t-interval -> results.json, results.md, study.png.

Segmentation (`task: segment`) runs the same protocol on mIoU, without label fractions: the CNN is a small U-Net
and the pixel k-NN classifies each patch of the token grid by its pixel neighbourhood (`seg_pixel_knn`).

Every run is an ordinary `beit finetune` (or `beit segment`) run in its own directory under the output folder; rerunning the
command skips finished runs and resumes a stopped one.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from beit.builders import build_eval_loader
from beit.config import Config, ConfigError, load_config, parse_overrides, read_yaml_mapping
from beit.data.segmentation import build_seg_dataset
from beit.experiments.fashion_mnist import Stage, run_stages, two_panel_figure
from beit.models.presets import SEG_PRESETS
from beit.train.runner import setup_logging
from beit.train.segment import intersect_and_union, seg_metrics
from beit.tasks import run

log = logging.getLogger("beit")
ARMS = ("pretrained", "scratch")  # + "cnn" when the study names a reference CNN


class StudyConfig(BaseModel):
    """A study file (configs/study/*.yaml). Paths are relative to the working directory."""

    model_config = ConfigDict(extra="forbid")
    config: str  # the pretrained arm's fine-tuning (or segmentation) config; scratch is it with model.pretrained=null
    task: Literal["finetune", "segment"] = "finetune"
    pretrained: str | None = None  # run directory, checkpoint or zoo name; null = run `pretrain` first
    pretrain: str | None = None  # pretraining config, run when `pretrained` is null (the training images, no labels)
    pretrain_overrides: list[str] = []
    val_size: int = Field(5000, ge=0)  # training images held out for validation (stratified, fixed); 0 with data.val_shards
    fractions: dict[float, list[str]]  # label fraction -> overrides of its runs (epochs, warmup, cadence)
    seeds: int = Field(3, ge=1)
    grid: dict[str, list[Any]]  # dotted key -> values; both ViT arms train every combination
    # Reference CNN from scratch (a CNN preset, e.g. cnn_fmnist_32) with its own grid of as many points.
    cnn: str | None = None
    cnn_overrides: list[str] = []  # e.g. model.drop_path_rate=null (keys a CNN does not take)
    cnn_grid: dict[str, list[Any]] = {}
    knn_ks: list[int] = [1, 3, 5, 10, 20]  # pixel k-NN: k is chosen on validation among these
    knn_windows: list[int] = [4, 8, 12, 16]  # segmentation: pixel window sides around each patch (chosen on validation)
    knn_bank: int = Field(50_000, ge=1)  # segmentation: training patches in the k-NN bank (a random draw per seed)
    overrides: list[str] = []  # applied to every run (data.root=..., train.compile=true, ...)


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study file; `overrides` are study keys (`seeds=1`) or run keys with a section (`data.root=/x`),
    the latter appended to `overrides`. Every run config is validated here, before any work."""
    path = Path(path)
    raw = read_yaml_mapping(path, "study file", "study keys")
    run_keys = [o for o in overrides or [] if "." in o.split("=", 1)[0]]
    for key, value in parse_overrides([f"study.{o}" for o in overrides or [] if o not in run_keys]).get("study", {}).items():
        raw[key] = value
    raw["overrides"] = list(raw.get("overrides") or []) + run_keys
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    if study.pretrained is None and study.pretrain is None:
        raise ConfigError(f"{path}: set `pretrained` (a run, checkpoint or zoo name) or `pretrain` (a config to run)")
    if study.task == "segment" and set(study.fractions) != {1.0}:
        raise ConfigError(f"{path}: task segment trains on every labelled image (fractions: {{1.0: [...]}})")
    if study.cnn and len(grid_points(study, "cnn")) != len(grid_points(study, "scratch")):
        raise ConfigError(f"{path}: cnn_grid has {len(grid_points(study, 'cnn'))} points and grid "
                          f"{len(grid_points(study, 'scratch'))}: every arm gets the same number of trials")
    for arm in arms(study):
        for point in grid_points(study, arm):
            for frac in study.fractions:
                _config(study, arm, frac, point, 0, "val", Path("."))  # a bad key or value fails now
    return study


def arms(study: StudyConfig) -> tuple[str, ...]:
    return ARMS + (("cnn",) if study.cnn else ())


def grid_points(study: StudyConfig, arm: str) -> list[dict[str, Any]]:
    grid = study.cnn_grid if arm == "cnn" else study.grid
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def _tag(point: dict[str, Any]) -> str:
    return "_".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()).replace("layer_decay", "ld") or "default"


def _pct(frac: float) -> str:
    return f"{frac * 100:g}pct"


def run_name(arm: str, frac: float, point: dict[str, Any], seed: int) -> str:
    return f"{_pct(frac)}_{arm}_{_tag(point)}_seed{seed}"


def _overrides(study: StudyConfig, arm: str, frac: float, point: dict, seed: int, split: str, out: Path) -> list[str]:
    init = [f"model.pretrained={study.pretrained or out / 'pretrain'}" if arm == "pretrained" else "model.pretrained=null"]
    if arm == "cnn":
        init += [f"model.name={study.cnn}", *study.cnn_overrides]
    grid = [f"{k}={'null' if v is None else v}" for k, v in point.items()]
    fixed = [f"data.val_size={study.val_size}", f"data.label_fraction={frac}", f"train.seed={seed}",
             f"train.eval_split={split}", f"train.out_dir={out}", f"train.run_name={run_name(arm, frac, point, seed)}",
             "train.export=[]"]
    return study.overrides + study.fractions[frac] + init + grid + fixed


def _config(study: StudyConfig, arm: str, frac: float, point: dict, seed: int, split: str, out: Path) -> Config:
    return load_config(study.config, _overrides(study, arm, frac, point, seed, split, out), command=study.task)


def _stage(study: StudyConfig, arm: str, frac: float, point: dict, seed: int, out: Path) -> Stage:
    # Every training run scores validation (at its end: set train.eval_every_epochs to the run's length);
    # the test split is read once per final run, by `test_score`.
    return Stage(run_name(arm, frac, point, seed), study.task, Path(study.config),
                 _overrides(study, arm, frac, point, seed, "val", out), init=arm, label_fraction=frac)


# ------------------------------------------------------------------------------------------------ scores
def metric(study: StudyConfig) -> str:
    return "mIoU" if study.task == "segment" else "top1"


def val_score(run_dir: Path, key: str) -> float:
    return json.loads((run_dir / "results.json").read_text())[key]


TEST_RESULTS = "test/results.json"  # in a final run's directory: its one `beit eval` on the test split


def test_score(cfg: Config, run_dir: Path, key: str) -> float:
    """The run's final weights scored on the test split (top-1 % or mIoU) by `beit eval`, once: the evaluation
    lives in <run>/test/ (results.json, and the confusion matrix of a classifier) and is read from there after."""
    path = run_dir / TEST_RESULTS
    if not path.exists():
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": str(run_dir)}),
                                     "train": cfg.train.model_copy(update={"out_dir": str(run_dir), "run_name": "test"})})
        run("eval", cfg, overwrite=True)  # overwrite: an evaluation stopped half-way is redone, not numbered -2
    return json.loads(path.read_text())[key]


def _pixels(cfg: Config, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened, normalised eval-transform pixels of a split: [N, C*H*W], labels [N]."""
    loader = build_eval_loader(cfg, split)
    xs, ys = zip(*((x.flatten(1), y) for x, y in loader))
    return torch.cat(xs), torch.cat(ys)


def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: list[int],
              chunk: int = 512) -> dict[int, torch.Tensor]:
    """k -> majority vote of the k nearest (Euclidean) bank rows, for every k in `ks` from one neighbour search;
    ties go to the class of the nearest tied neighbour."""
    num_classes = int(bank_labels.max()) + 1
    top = min(max(ks), len(bank))
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    sq = (bank * bank).sum(1)  # [N]
    for q in queries.split(chunk):
        d = sq[None] - 2 * q @ bank.T  # [b, N]: squared distance up to a per-query constant
        idx = d.topk(top, dim=1, largest=False).indices  # [b, top], nearest first
        onehot = torch.nn.functional.one_hot(bank_labels[idx], num_classes).float()  # [b, top, K]
        for k in ks:
            kk = min(k, top)
            rank_bonus = torch.linspace(1e-3, 0, kk)[None, :, None]  # breaks ties toward the nearer neighbour
            preds[k].append((onehot[:, :kk] * (1 + rank_bonus)).sum(1).argmax(1))
    return {k: torch.cat(p) for k, p in preds.items()}


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
                chunk: int = 512) -> torch.Tensor:
    return knn_votes(bank, bank_labels, queries, [k], chunk)[k]


def pixel_knn(study: StudyConfig, frac: float, out: Path) -> dict:
    """Raw-pixel k-NN on the labelled subset of each seed: k chosen on validation (seed 0), test per seed."""
    path = out / f"pixel_knn_{_pct(frac)}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    point = grid_points(study, "scratch")[0]  # only its data keys matter here
    cfgs = [_config(study, "scratch", frac, point, s, "val", out) for s in range(study.seeds)]
    val_x, val_y = _pixels(cfgs[0], "val")
    test_x, test_y = _pixels(cfgs[0], "test")
    banks = [_pixels(c, "train") for c in cfgs]  # the seed's labelled subset, eval transform
    val = {k: 100.0 * (p == val_y).float().mean().item() for k, p in knn_votes(*banks[0], val_x, study.knn_ks).items()}
    k = max(val, key=val.get)
    test = [100.0 * (knn_predict(*b, test_x, k) == test_y).float().mean().item() for b in banks]
    res = {"val_top1_by_k": {str(kk): v for kk, v in val.items()}, "k": k, "test_top1": test,
           "wall_time_s": time.time() - t0}
    path.write_text(json.dumps(res, indent=2))
    return res


def cell_windows(image: torch.Tensor, mask: torch.Tensor, cell: int, window: int, num_classes: int,
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A segmentation pixel k-NN's samples of one image [C, H, W] with its mask [H, W]: for every `cell` x `cell`
    patch (the ViT's token grid), its `window` x `window` pixel neighbourhood centred on it (replicate-padded at
    the border) [g, C, window, window], and the class most of its labelled pixels have [g] (`ignore_index` where
    none is labelled); g = (H // cell) * (W // cell), row-major."""
    c, pad = image.shape[0], (window - cell) // 2
    h, w = (n // cell * cell for n in image.shape[-2:])
    x = F.pad(image[None, :, :h, :w].float(), (pad, pad, pad, pad), mode="replicate")
    feats = F.unfold(x, window, stride=cell)[0].T.reshape(-1, c, window, window)  # [g, C, window, window]
    onehot = F.one_hot(mask[:h, :w].long().clamp(max=num_classes), num_classes + 1)[..., :num_classes]  # ignored: 0
    counts = F.avg_pool2d(onehot.permute(2, 0, 1)[None].float(), cell)[0].flatten(1)  # [K, g]
    labels = counts.argmax(0)
    labels[counts.sum(0) == 0] = ignore_index
    return feats, labels


def _centre(feats: torch.Tensor, window: int) -> torch.Tensor:
    """[g, C, W, W] -> the centred window x window crop, flattened [g, C*window*window]."""
    o = (feats.shape[-1] - window) // 2
    return feats[..., o:o + window, o:o + window].flatten(1)


def _eval_items(cfg: Config, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image, mask) pairs of a split, eval transform, read once for every window and seed scored on it."""
    dataset = build_seg_dataset(cfg, split)
    return [it for it in (dataset[i] for i in range(len(dataset))) if isinstance(it, tuple)]


def _seg_knn_miou(items: list, bank: torch.Tensor, bank_labels: torch.Tensor, window: int, ks: list[int], cell: int,
                  names: list[str], ignore_index: int) -> dict[int, float]:
    """k -> mIoU of the cell-level k-NN on (image, mask) `items`, each cell's class painted over its pixels."""
    k_cls, totals = len(names), {k: torch.zeros(4, len(names), dtype=torch.float64) for k in ks}
    for start in range(0, len(items), 200):
        chunk = items[start:start + 200]
        q = [_centre(cell_windows(x, y, cell, window, k_cls, ignore_index)[0], window) for x, y in chunk]
        uniq, inverse = torch.unique(torch.cat(q), dim=0, return_inverse=True)  # identical windows: one search
        votes = knn_votes(bank, bank_labels, uniq, ks)
        for k, pred in votes.items():
            for (x, y), p in zip(chunk, pred[inverse].split([len(t) for t in q])):
                gh, gw = (n // cell for n in x.shape[-2:])
                pix = F.interpolate(p.reshape(1, 1, gh, gw).float(), size=tuple(y.shape), mode="nearest")[0, 0]
                totals[k] += intersect_and_union(pix.long(), y, k_cls, ignore_index)
    return {k: seg_metrics(t, names)["mIoU"] for k, t in totals.items()}


def seg_pixel_knn(study: StudyConfig, out: Path) -> dict:
    """Raw-pixel k-NN for segmentation: each token-grid cell of an image is classified by the k nearest
    training cells (a `window` x `window` pixel neighbourhood each, from a bank of `knn_bank` cells drawn at random
    from the training images, a new draw per seed), its class painted over the cell's pixels. Window and k are
    chosen on validation mIoU (seed 0's bank); test mIoU per seed."""
    path = out / f"pixel_knn_{_pct(1.0)}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    cfg = _config(study, "scratch", 1.0, grid_points(study, "scratch")[0], 0, "val", out)
    cell = cfg.model.patch_size or SEG_PRESETS[cfg.model.name].get("patch_size", 16)
    bad = [w for w in study.knn_windows if w < cell or (w - cell) % 2]
    if bad:
        raise ConfigError(f"knn_windows {bad}: each window must be at least the patch size {cell} and exceed it by "
                          f"an even number of pixels (centred on the patch)")
    train = build_seg_dataset(cfg, "train", train_transform=False)
    names, ignore = list(train.classes), cfg.seg.ignore_index
    gens = [torch.Generator().manual_seed(s) for s in range(study.seeds)]
    feats: list[list[torch.Tensor]] = [[] for _ in gens]
    labels: list[list[torch.Tensor]] = [[] for _ in gens]
    for i in range(len(train)):
        item = train[i]
        if not isinstance(item, tuple):  # a bad file the data policy skips
            continue
        f, lab = cell_windows(*item, cell, max(study.knn_windows), len(names), ignore)
        labelled = (lab != ignore).nonzero()[:, 0]
        quota = study.knn_bank // len(train) + (i < study.knn_bank % len(train))  # knn_bank in all
        for s, g in enumerate(gens):
            pick = labelled[torch.randperm(len(labelled), generator=g)[:quota]]
            feats[s].append(f[pick])
            labels[s].append(lab[pick])
    banks = [(torch.cat(f), torch.cat(lab)) for f, lab in zip(feats, labels)]
    val_data = _eval_items(cfg, "val")
    val = {w: _seg_knn_miou(val_data, _centre(banks[0][0], w), banks[0][1], w, study.knn_ks, cell, names, ignore)
           for w in study.knn_windows}
    window, k = max(((w, k) for w in val for k in val[w]), key=lambda wk: val[wk[0]][wk[1]])
    test_data = _eval_items(cfg, "test")
    test = [_seg_knn_miou(test_data, _centre(f, window), lab, window, [k], cell, names, ignore)[k] for f, lab in banks]
    res = {"val_mIoU_by_window_k": {str(w): {str(kk): v for kk, v in by_k.items()} for w, by_k in val.items()},
           "window": window, "k": k, "bank_cells": len(banks[0][0]), "test_mIoU": test,
           "wall_time_s": time.time() - t0}
    path.write_text(json.dumps(res, indent=2))
    return res


# ------------------------------------------------------------------------------------------------ statistics
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
            "runs": xs}


def paired_interval(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over pairs with its 95% t-interval (none for one pair)."""
    d = [x - y for x, y in zip(a, b)]
    m = statistics.mean(d)
    if len(d) < 2:
        return {"mean": m, "ci95": None, "n": len(d)}
    half = (_T975[len(d) - 2] if len(d) <= 31 else 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return {"mean": m, "ci95": [m - half, m + half], "n": len(d)}


# ------------------------------------------------------------------------------------------------ driver
def _run_dir_done(out: Path, name: str) -> bool:
    return (out / name / "results.json").exists()


def select(study: StudyConfig, arm: str, frac: float, out: Path) -> tuple[list[dict], dict | None]:
    """The arm's validation grid (finished points) and its best point, once every point has finished."""
    grid = [{"point": p, "run": run_name(arm, frac, p, 0),
             "val": val_score(out / run_name(arm, frac, p, 0), metric(study)) if _run_dir_done(out, run_name(arm, frac, p, 0))
             else None} for p in grid_points(study, arm)]
    if any(g["val"] is None for g in grid):
        return grid, None
    return grid, max(grid, key=lambda g: g["val"])["point"]  # ties: the first in grid order


def run_fraction(study: StudyConfig, frac: float, out: Path, wall: dict[str, float],
                 only_arms: list[str] | None = None):
    """Pixel k-NN, then every arm's grid (seed 0), then each selected recipe's other seeds and its test scores.
    `only_arms`: run these arms now (another process may run the others: an arm's runs depend on no other arm)."""
    if study.task == "finetune":
        pixel_knn(study, frac, out)
    else:
        seg_pixel_knn(study, out)
    for arm in only_arms or arms(study):
        run_stages(out, [_stage(study, arm, frac, p, 0, out) for p in grid_points(study, arm)], wall)
        best = select(study, arm, frac, out)[1]
        run_stages(out, [_stage(study, arm, frac, best, s, out) for s in range(1, study.seeds)], wall)
        for s in range(study.seeds):
            test_score(_config(study, arm, frac, best, s, "test", out), out / run_name(arm, frac, best, s), metric(study))


# What an arm's runs depend on, besides its own grid and model keys (an earlier report's arm is reused only if
# these agree).
_SHARED = ("config", "task", "val_size", "seeds", "fractions", "overrides")
_ARM_KEYS = {"pretrained": ("pretrained", "pretrain", "pretrain_overrides", "grid"), "scratch": ("grid",),
             "cnn": ("cnn", "cnn_overrides", "cnn_grid")}


def carried_arm(study: StudyConfig, arm: str, frac: float, out: Path, earlier: dict | None) -> dict | None:
    """The arm's entry in an earlier report of this folder (`earlier`: its results.json) when none of the arm's
    run directories is here (deleted to save space, or a committed study copied in to add an arm to it) and the
    settings its runs depend on are unchanged; None otherwise (a changed setting is logged by name)."""
    if earlier is None or any((out / run_name(arm, frac, p, 0)).exists() for p in grid_points(study, arm)):
        return None
    entry = earlier["rows"].get(_pct(frac), {}).get("arms", {}).get(arm)
    if entry is None:
        return None
    now = json.loads(json.dumps(study.model_dump(mode="json")))  # the form results.json stores
    changed = [k for k in _SHARED + _ARM_KEYS[arm] if earlier["study"].get(k) != now.get(k)]
    if changed:
        log.warning(f"{out / 'results.json'}: the earlier {arm} arm is not reused: {', '.join(changed)} changed")
        return None
    return {**entry, "carried": True}


def collect(study: StudyConfig, out: Path) -> dict:
    """results.json's content: per label fraction, each arm's grid, selection and test scores, and the paired
    gains of the pretrained arm over every other arm and the pixel k-NN (same seeds, same labelled subsets).
    An arm with no run directory here keeps its entry of the folder's earlier results.json (`carried_arm`)."""
    path = out / "results.json"
    earlier = json.loads(path.read_text()) if path.exists() else None
    rows = {}
    for frac in sorted(study.fractions):
        row: dict[str, Any] = {"label_fraction": frac, "arms": {}, "gains": {}}
        tests: dict[str, list[float]] = {}
        for arm in arms(study):
            carried = carried_arm(study, arm, frac, out, earlier)
            if carried is not None:
                row["arms"][arm] = carried
                if "test" in carried:
                    tests[arm] = carried["test"]["runs"]
                continue
            grid, best = select(study, arm, frac, out)
            row["arms"][arm] = {"grid": grid, "selected": best}
            files = [out / run_name(arm, frac, best, s) / TEST_RESULTS for s in range(study.seeds)] if best else []
            if files and all(f.exists() for f in files):
                tests[arm] = [json.loads(f.read_text())[metric(study)] for f in files]
                row["arms"][arm]["test"] = mean_std(tests[arm])
        knn = out / f"pixel_knn_{_pct(frac)}.json"
        if knn.exists():
            k = json.loads(knn.read_text())  # its choices (k; a segmentation window too), validation scores, tests
            tests["pixel_knn"] = k[f"test_{metric(study)}"]
            row["pixel_knn"] = {**{key: v for key, v in k.items() if not key.startswith("test_") and key != "wall_time_s"},
                                "test": mean_std(tests["pixel_knn"])}
        if "pretrained" in tests:
            row["gains"] = {other: paired_interval(tests["pretrained"], tests[other]) for other in tests
                            if other != "pretrained"}
        pre, scr = row["arms"]["pretrained"], row["arms"]["scratch"]
        if pre["selected"] and scr["selected"]:  # the paper's comparison: both arms at the pretrained arm's recipe
            same = next(g["val"] for g in scr["grid"] if g["point"] == pre["selected"])
            best = next(g["val"] for g in pre["grid"] if g["point"] == pre["selected"])
            row["same_recipe_val"] = {"recipe": pre["selected"], "pretrained": best, "scratch": same,
                                      "gain": best - same}
        rows[_pct(frac)] = row
    return {"study": study.model_dump(mode="json"), "metric": metric(study), "rows": rows}


# ------------------------------------------------------------------------------------------------ report
NAMES = {"pretrained": "BEiT pretrained", "scratch": "ViT from scratch", "cnn": "small CNN", "pixel_knn": "pixel k-NN"}


def _cell(r: dict | None) -> str:
    if not r:
        return "—"
    return f"{r['mean']:.2f} ± {r['std']:.2f} (n={r['n']})" if r["n"] > 1 else f"{r['mean']:.2f} (n=1)"


def _gain(g: dict | None) -> str:
    if not g:
        return "—"
    ci = f" [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]" if g.get("ci95") else " (one pair: no interval)"
    return f"{g['mean']:+.2f}{ci}"


def _label(results: dict) -> str:
    return {"top1": "top-1 (%)", "mIoU": "mIoU (%)"}[results["metric"]]


def _val(v: float | None) -> str:
    return "pending" if v is None else f"{v:.2f}"


def render_md(results: dict) -> str:
    """results.md: test over seeds for every arm and the pixel k-NN, the pretrained arm's paired gains with their
    95% intervals, then per label fraction each arm's validation grid and selected recipe."""
    cols = [a for a in NAMES if a != "pretrained" and any(a in r["arms"] or a in r for r in results["rows"].values())]
    lines = ["# Study: BEiT pretrained vs from scratch, each arm tuned on validation", "",
             f"Test {_label(results)}, mean ± std over seeds; gains are paired by seed (same labelled subset), with 95% "
             "t-intervals.", "",
             "| labels | " + " | ".join(NAMES[a] for a in ["pretrained", *cols]) + " | "
             + " | ".join(f"pretrained − {NAMES[a]}" for a in cols) + " |",
             "|---|" + "---|" * (1 + 2 * len(cols))]
    for row in results["rows"].values():
        get = lambda a: row.get("pixel_knn") if a == "pixel_knn" else row["arms"].get(a)  # noqa: E731
        lines.append(f"| {row['label_fraction'] * 100:g}% | " + " | ".join(_cell((get(a) or {}).get("test"))
                     for a in ["pretrained", *cols]) + " | " + " | ".join(_gain(row["gains"].get(a)) for a in cols) + " |")
    for row in results["rows"].values():
        lines += ["", f"## {row['label_fraction'] * 100:g}% labels: validation grids (seed 0)", ""]
        for arm, r in row["arms"].items():
            keys = list(r["grid"][0]["point"]) if r["grid"] else []
            note = " (reused from this folder's earlier results.json: its run directories are not here)" \
                if r.get("carried") else ""
            lines += [f"{NAMES[arm]}{note}:", "", "| " + " | ".join(keys) + f" | validation {_label(results)} |", "|" + "---|" * (len(keys) + 1)]
            for g in r["grid"]:
                b = "**" if g["point"] == r["selected"] else ""
                lines.append("| " + " | ".join(str(g["point"][k]) for k in keys) + f" | {b}{_val(g['val'])}{b} |")
            lines.append("")
        if row.get("same_recipe_val"):
            sr = row["same_recipe_val"]
            lines.append(f"The paper's same-recipe comparison (validation, seed 0, both arms at the pretrained arm's "
                         f"recipe): {sr['pretrained']:.2f} vs {sr['scratch']:.2f}, {sr['gain']:+.2f}.")
        lines.append("Selected (bold) on validation: " + "; ".join(
            f"{NAMES[a]} " + (", ".join(f"{k}={v}" for k, v in r["selected"].items()) if r["selected"] else "pending")
            for a, r in row["arms"].items()))
        knn = row.get("pixel_knn")
        if knn and "val_top1_by_k" in knn:
            lines.append("Pixel k-NN on validation by k: " + ", ".join(
                f"k={k}: {v:.2f}" for k, v in knn["val_top1_by_k"].items()) + f"; k={knn['k']} selected")
        elif knn:
            lines.append(f"Pixel k-NN ({knn['bank_cells']:,} training patches) on validation mIoU by window: " + "; ".join(
                f"{w} px: " + ", ".join(f"k={k} {v:.2f}" for k, v in by_k.items())
                for w, by_k in knn["val_mIoU_by_window_k"].items()) + f". Selected: {knn['window']} px, k={knn['k']}")
    return "\n".join(lines) + "\n"


def plot_study(results: dict, path: Path):
    """Left: the test metric vs label fraction, mean ± std over seeds, every arm and the pixel k-NN. Right: each arm's
    validation grid points per label fraction."""
    rows = list(results["rows"].values())
    with two_panel_figure(path) as (ax, ax2):
        for i, name in enumerate(NAMES):
            get = lambda r: (r.get("pixel_knn") if name == "pixel_knn" else r["arms"].get(name)) or {}  # noqa: E731
            pts = [(r["label_fraction"] * 100, get(r)["test"]) for r in rows if "test" in get(r)]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                            marker="os^D"[i], capsize=4, color=f"C{i}", label=NAMES[name])
            for j, r in enumerate(rows):
                vals = [g["val"] for g in r["arms"].get(name, {}).get("grid", []) if g["val"] is not None]
                ax2.scatter([j + 0.12 * (i - 1.5)] * len(vals), vals, marker="os^D"[i], color=f"C{i}",
                            label=NAMES[name] if j == 0 and vals else None)
        ax.set_xscale("log")
        ax.set_xticks([r["label_fraction"] * 100 for r in rows], [f"{r['label_fraction'] * 100:g}%" for r in rows])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(f"test {_label(results)}, mean ± std over seeds")
        ax.set_title(f"test {_label(results).removesuffix(' (%)')} by label fraction")
        ax.legend(fontsize=8)
        ax2.set_xticks(range(len(rows)), [f"{r['label_fraction'] * 100:g}%" for r in rows])
        ax2.set_xlim(-0.5, len(rows) - 0.5)  # each row's points centred on its tick, also for one row
        ax2.set_xlabel("labelled training images")
        ax2.set_ylabel(f"validation {_label(results)}")
        ax2.set_title("validation grid points (seed 0); each arm keeps its best")
        if ax2.get_legend_handles_labels()[0]:
            ax2.legend(fontsize=8)


def report(study: StudyConfig, out: Path) -> dict:
    results = collect(study, out)
    wall = out / "stage_wall_time.json"
    results["stage_wall_time_s"] = json.loads(wall.read_text()) if wall.exists() else {}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = render_md(results)
    (out / "results.md").write_text(md)
    plot_study(results, out / "study.png")
    print(f"\n{md}\nresults: {out / 'results.json'}, {out / 'results.md'}, {out / 'study.png'}")
    return results


def run_study(study: StudyConfig, out: Path, only: list[float] | None = None, report_only: bool = False,
              only_arms: list[str] | None = None) -> dict:
    """Run (or continue) the study in `out`, then report what has finished. `only`: these label fractions;
    `only_arms`: these arms. A fraction or arm the study lacks is an error before any work."""
    if only and not set(only) <= set(study.fractions):
        raise ConfigError(f"--fractions {only}: the study has {sorted(study.fractions)}")
    if only_arms and not set(only_arms) <= set(arms(study)):
        raise ConfigError(f"--arms {','.join(only_arms)}: the study has the arms {', '.join(arms(study))}")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(None, True)
    if not report_only:
        wall_path = out / "stage_wall_time.json"
        wall = json.loads(wall_path.read_text()) if wall_path.exists() else {}
        if study.pretrained is None:
            run_stages(out, [Stage("pretrain", "pretrain", Path(study.pretrain), study.pretrain_overrides + [
                f"train.out_dir={out}", "train.run_name=pretrain"])], wall)
        for frac in sorted(study.fractions):
            if only is None or frac in only:
                run_fraction(study, frac, out, wall, only_arms)
    return report(study, out)

