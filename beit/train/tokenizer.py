"""Train a small dVAE tokenizer (DALL-E's recipe, scaled down): `beit tokenizer train CONFIG [--resume]`.

Recipe: Gumbel-softmax relaxation with a cosine-annealed temperature, KL to the uniform prior with a
linearly warmed-up weight, logit-Laplace (or MSE) reconstruction, AdamW with warmup + cosine lr, bf16
autocast. Dead codes (tokens the encoder never picks) are the known failure of this model: we count them
during training and re-initialise each dead code by splitting a code that is in use (see `_revive_dead_codes`).

Training runs on the shared loop (`beit.train.loop.fit`) as a `Task`: its step is the dVAE objective
(`dvae_objective`), the temperature and KL weight are functions of the step, and dead-code revival is the
task's `after_step` hook; so checkpoints, `--resume`, SIGTERM handling, DDP and metrics.jsonl/TensorBoard
are the loop's. The final phase (`finalize_codes`) and the held-out evaluation run after the loop.

Outputs in `out_dir` (the run directory): tokenizer.safetensors (weights; the TokenizerConfig is also in
its metadata), tokenizer.yaml (the `tokenizer:` section a pretraining config can use), metrics.json,
recon.png, and the loop's config.yaml, metrics.jsonl, summary.json and ckpt-*.pt.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import yaml
from safetensors.torch import save_file

from beit.config import Config, TokenizerConfig
from beit.data.build import build_dataset
from beit.tokenizers.dvae import DVAE, kl_to_uniform, map_pixels, recon_nll
from beit.train.distributed import all_reduce_sum, broadcast_, env_world_size
from beit.train.evaluate import is_main_process
from beit.train.loop import Task, autocast, steps_per_epoch_of
from beit.train.runner import launch

# Dead-code handling is configured by TokenizerConfig (revive_*, usage_entropy_weight, final_steps); these
# are the sample sizes of its final phase.
FINAL_PROBE = 4096  # training images on which dead codes are counted at the end
FINAL_SEED_IMAGES = 1024  # training images whose features seed the revived codes

# ----------------------------------------------------------------------------------------------- data
def _load_split(cfg: Config, split: str) -> torch.Tensor:
    """All images of a split as uint8 [N, C, S, S] at the tokenizer's image size (labels unused)."""
    size, subset = cfg.tokenizer.image_size, cfg.data.train_subset if split == "train" else cfg.data.eval_subset
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    ds = build_dataset(cfg.data, split, transform=tf)
    n = len(ds) if subset is None else min(subset, len(ds))
    return torch.stack([ds[i][0] for i in range(n)])  # [N, C, S, S] uint8


# ------------------------------------------------------------------------------------------ schedules
def temperature_at(cfg: TokenizerConfig, step: int) -> float:
    """Cosine anneal from temperature_start to temperature_end, then constant."""
    t = min(step / max(cfg.temperature_anneal_steps, 1), 1.0)
    return cfg.temperature_end + 0.5 * (cfg.temperature_start - cfg.temperature_end) * (1 + math.cos(math.pi * t))


def kl_weight_at(cfg: TokenizerConfig, step: int) -> float:
    """Linear warmup 0 -> kl_weight (DALL-E ramps its β the same way, so the encoder first learns to reconstruct)."""
    return cfg.kl_weight * min(step / max(cfg.kl_warmup_steps, 1), 1.0)


# ---------------------------------------------------------------------------------------- dead codes
@torch.no_grad()
def _revive_dead_codes(model: DVAE, opt: torch.optim.Optimizer, counts: torch.Tensor, x: torch.Tensor,
                       min_count: int, margin: float) -> int:
    """Re-initialise every dead code from an encoder output, as a split of the code that wins there.

    For a dead code k: pick a random position p of the batch, with top-level feature h_p and winning code j.
    k gets j's encoder row plus a step towards h_p, so that it beats j near p (by `margin` on average at
    p itself) and loses far from p; its codebook entry is j's plus noise. Each dead code gets its own p, so
    twins of a busy code split its region of feature space like k-means seeds.
    (Copying j with random noise is not enough: ReLU features share a large common direction, so the same
    twin wins everywhere.) Adam state is copied too, so a twin does not take a huge first step.
    """
    dead = (counts < min_count).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    conv = model.encoder.blocks.output.conv
    h = F.relu(model.encoder.features(map_pixels(x))).float()  # [B, C, h, w], what the projection sees
    h = h.permute(0, 2, 3, 1).flatten(0, 2)  # [N, C]
    w, b = conv.weight[:, :, 0, 0], conv.bias  # [V, C], [V]
    winners = (h @ w.T + b).argmax(1)  # [N]
    pick = torch.randint(0, h.shape[0], (dead.numel(),), device=h.device)
    donors = winners[pick]
    # Boost of k over j at q: s·[(h_p-mu)·(h_q-mu) - |h_p-mu|²/2], i.e. nearest-seed (Voronoi) among
    # twins of one donor, and +s·|h_p-mu|²/2 at p itself; s makes that `margin` on average.
    mu = h.mean(0)
    c = h - mu  # [N, C]
    s = 2 * margin / c.pow(2).sum(1).mean().clamp_min(1e-8)
    seed = c[pick]  # [D, C]
    conv.weight[dead] = (w[donors] + s * seed)[:, :, None, None]
    conv.bias[dead] = b[donors] - s * (seed @ mu) - s * seed.pow(2).sum(1) / 2
    cb = model.codebook
    cb[dead] = cb[donors] + 0.1 * cb.std() * torch.randn_like(cb[donors])
    for p in (conv.weight, conv.bias, cb):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = state[key][donors]
    return int(dead.numel())


def finalize_codes(model: DVAE, train_x: torch.Tensor, device: torch.device, steps: int, min_count: int,
                   margin: float, batch_size: int = 128, lr: float = 3e-4, amp=None, log=print) -> int:
    """Last phase: revive the codes that are dead on training images once more, then fit only the decoder and
    codebook to the (now frozen) encoder's hard tokens, so the new codes get their own reconstructions.

    Needed because, once revival stops, training with a low temperature lets the busy codes take over again
    (in our run: ~280 codes per 100-step window while reviving, ~130 after). With the encoder frozen
    nothing can take the revived codes' positions back.
    """
    V = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(1)
    probe = train_x[torch.randperm(len(train_x), generator=gen)[:FINAL_PROBE]].to(device).float() / 255
    with torch.no_grad():
        counts = torch.bincount(model.logits(probe).argmax(1).flatten(), minlength=V)
    revived = _revive_dead_codes(model, torch.optim.AdamW([torch.zeros(1)]), counts, probe[:FINAL_SEED_IMAGES],
                                 min_count, margin)
    log(f"final phase: {int((counts > 0).sum())} codes used on {len(probe)} training images, revived {revived}")
    params = list(model.decoder.parameters()) + [model.codebook]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x = train_x[torch.randint(0, len(train_x), (batch_size,), generator=gen)].to(device).float() / 255
        with torch.no_grad():
            ids = model.logits(x).argmax(1)  # [B, h, w], encoder frozen
        onehot = F.one_hot(ids, V).permute(0, 3, 1, 2).float()
        with amp or nullcontext():
            stats = model.decode_stats(onehot)
        loss = recon_nll(stats, x, model.cfg.recon_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return revived


# ---------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: DVAE, images: torch.Tensor, device: torch.device, batch_size: int = 500) -> dict:
    """Hard-token reconstruction error in [0, 1] pixel space and codebook usage on held-out images."""
    model.eval()
    V = model.cfg.vocab_size
    hist = torch.zeros(V, dtype=torch.long)
    se = ae = 0.0
    n_px = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float() / 255  # [B, C, S, S]
        ids = model.logits(x).argmax(1)  # [B, h, w]
        rec = model.decode_ids(ids)
        se += (rec - x).pow(2).sum().item()
        ae += (rec - x).abs().sum().item()
        n_px += x.numel()
        hist += torch.bincount(ids.flatten().cpu(), minlength=V)
    p = hist.float() / hist.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "recon_mse": se / n_px,
        "recon_mae": ae / n_px,
        "codes_used": int((hist > 0).sum()),
        "codes_used_frac": float((hist > 0).float().mean()),
        "perplexity": math.exp(entropy),
        "num_images": len(images),
    }


def save_recon_grid(model: DVAE, images: torch.Tensor, path: Path, device: torch.device, n: int = 32) -> None:
    """PNG with pairs original | reconstruction, 4 pairs per row, upscaled ×3 (nearest) to be legible."""
    from torchvision.utils import save_image

    with torch.no_grad():
        x = images[:n].to(device).float() / 255
        rec = model.decode_ids(model.logits(x).argmax(1))
    pairs = torch.stack([x, rec], 1).flatten(0, 1).cpu()  # [2n, C, S, S]: orig0, rec0, orig1, ...
    pairs = F.interpolate(pairs, scale_factor=3, mode="nearest")
    save_image(pairs, path, nrow=8, padding=2, pad_value=0.5)


# --------------------------------------------------------------------------------------------- train
def save_tokenizer(model: DVAE, out_dir: Path, metrics: dict | None = None, name: str | None = None) -> None:
    """Write tokenizer.safetensors (+ config in its metadata), tokenizer.yaml and metrics.json.
    `name` is what `tokenizer.name` should say (default: the directory, so the yaml works as-is)."""
    tcfg = model.cfg.model_copy(update={"name": name or str(out_dir), "weights": None})
    meta = {"format": "beit-dvae", "tokenizer_config": json.dumps(tcfg.model_dump(mode="json"))}
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "tokenizer.safetensors"), metadata=meta)
    (out_dir / "tokenizer.yaml").write_text(yaml.safe_dump({"tokenizer": tcfg.model_dump(mode="json")}, sort_keys=False))
    if metrics is not None:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def dvae_objective(model: nn.Module, x: torch.Tensor, tcfg: TokenizerConfig, step: int) -> tuple[dict, torch.Tensor]:
    """The relaxed dVAE loss on images x [B, C, S, S] in [0, 1] at optimizer step `step` (0-based).
    Returns ({"loss": Tensor, **scalars}, the encoder's argmax ids [B, h, w])."""
    tau, beta = temperature_at(tcfg, step), kl_weight_at(tcfg, step)
    logits, soft, stats = model(x, tau)  # [B, V, h, w] x2, decoder output; under the loop's autocast
    with torch.autocast(x.device.type, enabled=False):  # the loss terms in the tensors' own precision
        rec = recon_nll(stats, x, tcfg.recon_loss)
        kl = kl_to_uniform(logits)
        # Usage term (not in DALL-E): entropy of the batch's average relaxed one-hot. At low temperature the
        # samples are nearly one-hot, so this is the entropy of the code histogram; its gradient lifts rare
        # codes. Without it, revived codes die again within ~100 steps (the decoder fits busy codes better).
        usage = soft.mean((0, 2, 3))  # [V]
        usage_gap = math.log(tcfg.vocab_size) + (usage * usage.clamp_min(1e-12).log()).sum()
        loss = rec + beta * kl + tcfg.usage_entropy_weight * usage_gap
    out = {"loss": loss, "recon": rec.detach(), "kl": kl.detach(), "usage_gap": usage_gap.detach(), "tau": tau,
           "kl_weight": beta}
    return out, logits.detach().argmax(1)


class DVAERecipe:
    """What the dVAE adds to the shared loop: the step (`step`), dead-code revival after every
    `revive_every` steps (`after_step`), and their state (`state_dict`), which checkpoints keep so that
    a resumed run counts codes, revives and logs exactly as an uninterrupted one."""

    def __init__(self, cfg: Config, total: int, device: torch.device):
        self.tcfg, self.total = cfg.tokenizer, total
        self.steps_done = 0
        self.counts = torch.zeros(self.tcfg.vocab_size, dtype=torch.long, device=device)  # argmax histogram of the window
        self.history: list[dict] = []
        self.revived_total = 0
        self._last: tuple[torch.Tensor, dict] | None = None  # the latest batch and its scalars, for revival

    def step(self, model: nn.Module, batch: dict) -> dict:
        x = batch["image"].float() / 255  # [B, C, S, S] in [0, 1]
        out, ids = dvae_objective(model, x, self.tcfg, self.steps_done)
        self.counts += torch.bincount(ids.flatten(), minlength=self.tcfg.vocab_size)
        self._last = (x, {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items()})
        return out

    def after_step(self, model: DVAE, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.steps_done = step
        if step % self.tcfg.revive_every:
            return
        t = self.tcfg
        all_reduce_sum(self.counts)  # the window's use over all processes
        revived = 0
        if step - 1 < t.revive_until * self.total:
            revived = _revive_dead_codes(model, optimizer, self.counts, self._last[0], t.revive_min_count,
                                         t.revive_margin)
            _broadcast_revivable(model, optimizer)  # every process keeps rank 0's revived codes
        self.revived_total += revived
        self.history.append({"step": step, **self._last[1], "codes_used_window": int((self.counts > 0).sum()),
                             "revived": revived})
        self.counts.zero_()

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "counts": self.counts.cpu(), "history": self.history,
                "revived_total": self.revived_total}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.history = state["steps_done"], list(state["history"])
        self.counts.copy_(state["counts"])
        self.revived_total = state["revived_total"]


def _broadcast_revivable(model: DVAE, optimizer: torch.optim.Optimizer) -> None:
    """Revival draws seeds from each process's own batch: make rank 0's choice everyone's (weights and Adam
    state of the tensors it touches; a no-op in one process)."""
    conv = model.encoder.blocks.output.conv
    for p in (conv.weight, conv.bias, model.codebook):
        broadcast_(p.data)
        for v in optimizer.state.get(p, {}).values():
            if torch.is_tensor(v) and v.dim() > 0:
                broadcast_(v)


class _Images(torch.utils.data.Dataset):
    """uint8 images [N, C, S, S] as the loop's dict batches."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


def _schedule_config(cfg: Config, dataset: torch.utils.data.Dataset, world_size: int) -> Config:
    """The run's config with the tokenizer recipe's schedule made explicit, as `train.steps`: the given
    `train.steps` (then `train.max_steps` only stops early, as in pretraining), else `train.epochs` of the
    loop's optimizer steps per epoch (`steps_per_epoch_of`: one step takes a global batch, per device x
    accumulation x processes) shortened to `train.max_steps` (the recipe's meaning: the shipped config anneals
    over its 1000 steps); warmup is `optim.warmup_steps` or 0."""
    total = cfg.train.steps
    if total is None:
        total = int(cfg.train.epochs * steps_per_epoch_of(cfg, dataset, world_size))
        total = min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"steps": total}),
        "optim": cfg.optim.model_copy(update={"warmup_steps": cfg.optim.warmup_steps or 0}),
    })


def train_tokenizer(cfg: Config, out_dir: str | Path, overwrite: bool = False, log=print, resume: bool = False) -> dict:
    """Train a dVAE as described by `cfg.tokenizer` on `cfg.data` into the run directory `out_dir`
    (`resume=True` continues it from its newest checkpoint); returns the final held-out metrics."""

    tcfg, out_dir = cfg.tokenizer, Path(out_dir)
    if tcfg.in_chans != cfg.data.in_chans:
        raise ValueError(f"tokenizer.in_chans={tcfg.in_chans} but data.in_chans={cfg.data.in_chans}; make them equal")
    if out_dir.exists() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise FileExistsError(f"output directory '{out_dir}' exists and is not empty; pass overwrite=True (CLI: "
                              f"--overwrite) to replace it, resume=True (--resume) to continue it, or pick another")
    t0 = time.time()
    train_x = _load_split(cfg, "train")  # uint8 [N, C, S, S]
    if train_x.shape[1] != tcfg.in_chans:
        raise ValueError(f"the data has {train_x.shape[1]} channels but tokenizer.in_chans={tcfg.in_chans}")
    log(f"data: train {tuple(train_x.shape)} ({time.time() - t0:.1f}s)")
    dataset = _Images(train_x)
    cfg = _schedule_config(cfg, dataset, env_world_size())  # before launch: the run's config holds its length
    cfg.train.out_dir, cfg.train.run_name = str(out_dir.parent), out_dir.name
    task_of = {}

    def build_task(cfg: Config, device: torch.device) -> Task:
        model = DVAE(tcfg)
        log(f"dVAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {tcfg.vocab_size}, "
            f"÷{tcfg.downsample}")
        recipe = DVAERecipe(cfg, cfg.train.steps, device)
        task_of["task"] = Task(model=model, step=recipe.step, dataset=dataset, after_step=recipe.after_step,
                               extra_state=recipe)
        return task_of["task"]

    t_train = time.time()
    run_dir = launch(cfg, build_task, resume=resume, overwrite=overwrite)
    train_s = time.time() - t_train
    if not is_main_process():
        return {}
    return _finish(cfg, run_dir, task_of["task"], train_x, train_s, log)


def _finish(cfg: Config, out_dir: Path, task: Task, train_x: torch.Tensor, train_s: float, log) -> dict:
    """After the loop: the final phase, held-out evaluation and the tokenizer files."""
    tcfg, total, bs = cfg.tokenizer, cfg.train.steps, cfg.data.batch_size
    model, recipe = task.model, task.extra_state  # trained in place by the loop (on its device)
    device = next(model.parameters()).device
    amp = autocast(device, cfg.train.amp)
    t_final = time.time()
    # At most a fifth of the main steps, so smoke runs stay short (the shipped config: 150 of 1000).
    final_revived = finalize_codes(model, train_x, device, steps=min(tcfg.final_steps, max(total // 5, 1)),
                                   min_count=tcfg.revive_min_count, margin=tcfg.revive_margin,
                                   batch_size=bs, amp=amp, log=log)
    train_s += time.time() - t_final
    test_x = _load_split(cfg, "test")
    metrics = evaluate(model, test_x, device)
    global_batch = json.loads((out_dir / "summary.json").read_text())["global_batch"]  # all processes
    metrics.update({"train_steps": total, "train_images": total * global_batch, "train_seconds": round(train_s, 1),
                    "revived_codes_total": recipe.revived_total, "final_revived": final_revived,
                    "device": str(device), "torch_threads": torch.get_num_threads(), "history": recipe.history})
    log("held-out: " + json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    save_tokenizer(model.cpu(), out_dir, metrics)
    save_recon_grid(model, test_x, out_dir / "recon.png", torch.device("cpu"))
    return metrics
