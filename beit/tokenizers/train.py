"""Train a small dVAE tokenizer (DALL-E's recipe, scaled down): `beit tokenizer train CONFIG`.

Recipe: Gumbel-softmax relaxation with a cosine-annealed temperature, KL to the uniform prior with a
linearly warmed-up weight, logit-Laplace (or MSE) reconstruction, AdamW with warmup + cosine lr, bf16
autocast. Dead codes (tokens the encoder never picks) are the known failure of this model: we count them
during training and re-initialise each dead code by splitting a code that is in use (see `_revive_dead_codes`).

Outputs in `out_dir`: tokenizer.safetensors (weights; the TokenizerConfig is also in its metadata),
tokenizer.yaml (the `tokenizer:` section a pretraining config can use), metrics.json, recon.png.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import yaml
from safetensors.torch import save_file

from beit.config import Config, TokenizerConfig
from beit.data.datasets import build_dataset
from beit.tokenizers.dvae import DVAE, kl_to_uniform, map_pixels, recon_nll
from beit.train.loop import autocast
from beit.train.optim import lr_at as cosine_lr

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


def lr_at(cfg: Config, step: int, total: int) -> float:
    """The shared per-step schedule (linear warmup over optim.warmup_steps, then cosine to min_lr)."""
    o = cfg.optim
    return cosine_lr(step, o.lr, o.min_lr, o.warmup_steps or 0, total)


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
def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory '{out_dir}' exists and is not empty; pass overwrite=True (CLI: --overwrite) or pick another directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


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


def _dvae_step(model: DVAE, opt: torch.optim.Optimizer, x: torch.Tensor, cfg: Config, step: int, total: int,
               amp) -> dict:
    """One optimizer step of the relaxed dVAE objective on images x [B, C, S, S] in [0, 1]."""
    tcfg = cfg.tokenizer
    tau, beta = temperature_at(tcfg, step), kl_weight_at(tcfg, step)
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, step, total)
    with amp:
        logits = model.logits(x)  # [B, V, h, w]
        # The relaxation is computed in fp32: bf16 noise/softmax at tau=1/16 would round codes together.
        soft = F.gumbel_softmax(logits.float(), tau=tau, hard=False, dim=1)
        stats = model.decode_stats(soft)
    rec = recon_nll(stats, x, tcfg.recon_loss)
    kl = kl_to_uniform(logits)
    # Usage term (not in DALL-E): entropy of the batch's average relaxed one-hot. At low temperature the
    # samples are nearly one-hot, so this is the entropy of the code histogram; its gradient lifts rare
    # codes. Without it, revived codes die again within ~100 steps (the decoder fits busy codes better).
    usage = soft.mean((0, 2, 3))  # [V]
    usage_gap = math.log(tcfg.vocab_size) + (usage * usage.clamp_min(1e-12).log()).sum()
    loss = rec + beta * kl + tcfg.usage_entropy_weight * usage_gap
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    opt.step()
    return {"loss": loss.item(), "recon": rec.item(), "kl": kl.item(), "usage_gap": usage_gap.item(), "tau": tau,
            "kl_weight": beta, "ids": logits.detach().argmax(1)}  # ids [B, h, w]


def train_tokenizer(cfg: Config, out_dir: str | Path, overwrite: bool = False, log=print) -> dict:
    """Train a dVAE as described by `cfg.tokenizer` on `cfg.data`; returns the final held-out metrics."""
    from tqdm import tqdm

    tcfg, out_dir = cfg.tokenizer, Path(out_dir)
    if tcfg.in_chans != cfg.data.in_chans:
        raise ValueError(f"tokenizer.in_chans={tcfg.in_chans} but data.in_chans={cfg.data.in_chans}; make them equal")
    _prepare_out_dir(out_dir, overwrite)
    torch.manual_seed(cfg.train.seed)
    device = _device(cfg)
    amp = autocast(device, cfg.train.amp)

    t0 = time.time()
    train_x, test_x = _load_split(cfg, "train"), _load_split(cfg, "test")  # uint8 [N, C, S, S]
    if train_x.shape[1] != tcfg.in_chans:
        raise ValueError(f"the data has {train_x.shape[1]} channels but tokenizer.in_chans={tcfg.in_chans}")
    log(f"data: train {tuple(train_x.shape)}, held-out {tuple(test_x.shape)} ({time.time() - t0:.1f}s)")

    model = DVAE(tcfg).to(device)
    log(f"dVAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {tcfg.vocab_size}, ÷{tcfg.downsample}")
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    bs = cfg.data.batch_size
    steps_per_epoch = max(len(train_x) // bs, 1)
    total = int(cfg.train.epochs * steps_per_epoch)
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    counts = torch.zeros(tcfg.vocab_size, dtype=torch.long, device=device)  # argmax histogram of the window
    history, revived_total = [], 0
    gen = torch.Generator().manual_seed(cfg.train.seed)
    perm, pos = torch.randperm(len(train_x), generator=gen), 0

    bar = tqdm(total=total * bs, unit="img", unit_scale=True, disable=not cfg.train.progress, mininterval=2.0)
    t_train = time.time()
    model.train()
    for step in range(total):
        if pos + bs > len(perm):
            perm, pos = torch.randperm(len(train_x), generator=gen), 0
        x = train_x[perm[pos : pos + bs]].to(device).float() / 255  # [B, C, S, S] in [0, 1]
        pos += bs
        out = _dvae_step(model, opt, x, cfg, step, total, amp)
        counts += torch.bincount(out["ids"].flatten(), minlength=tcfg.vocab_size)
        bar.update(bs)
        if (step + 1) % tcfg.revive_every == 0:
            used = int((counts > 0).sum())
            revive = step < tcfg.revive_until * total
            revived = (_revive_dead_codes(model, opt, counts, x, tcfg.revive_min_count, tcfg.revive_margin)
                       if revive else 0)
            revived_total += revived
            history.append({"step": step + 1, **{k: v for k, v in out.items() if k != "ids"},
                            "codes_used_window": used, "revived": revived})
            bar.set_postfix(loss=f"{out['loss']:.3f}", tau=f"{out['tau']:.3f}", used=used, revived=revived)
            counts.zero_()
    bar.close()
    train_s = time.time() - t_train

    t_final = time.time()
    # At most a fifth of the main steps, so smoke runs stay short (the shipped config: 150 of 1000).
    final_revived = finalize_codes(model, train_x, device, steps=min(tcfg.final_steps, max(total // 5, 1)),
                                   min_count=tcfg.revive_min_count, margin=tcfg.revive_margin,
                                   batch_size=bs, amp=amp, log=log)
    train_s += time.time() - t_final
    metrics = evaluate(model, test_x, device)
    metrics.update({"train_steps": total, "train_images": total * bs, "train_seconds": round(train_s, 1),
                    "revived_codes_total": revived_total, "final_revived": final_revived, "device": str(device), "torch_threads": torch.get_num_threads(),
                    "history": history})
    log("held-out: " + json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    save_tokenizer(model.cpu(), out_dir, metrics)
    save_recon_grid(model, test_x, out_dir / "recon.png", torch.device("cpu"))
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    return metrics
