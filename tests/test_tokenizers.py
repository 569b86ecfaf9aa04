"""Tokenizers: DALL-E parity with the `dall_e` package, the shipped Fashion-MNIST dVAE, errors, training."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from beit.config import load_config
from beit.data.datasets import read_idx
from beit.builders import SHIPPED_TOKENIZERS as SHIPPED
from beit.builders import convert_dalle_pickle, create_tokenizer
from beit.tokenizers import TokenizerError
from beit.tokenizers.dalle import DalleTokenizer

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------ DALL-E
@pytest.fixture(scope="module")
def dalle_states():
    """Random dall_e Encoder/Decoder state dicts (biases made non-zero so the bias mapping is tested)."""
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    enc, dec = dall_e.Encoder(), dall_e.Decoder()
    with torch.no_grad():
        for m in (enc, dec):
            for name, p in m.named_parameters():
                if name.endswith(".b"):
                    p.normal_(std=0.01)
    return enc, dec


def test_dalle_encoder_decoder_match_dall_e_package(dalle_states, tmp_path):
    enc, dec = dalle_states
    from dall_e.utils import map_pixels

    # OpenMMLab's dalle_encoder.pth holds the same `blocks.…w/b` keys; in an mmengine checkpoint they
    # sit under `state_dict` with a `target_generator.` prefix. Build both layouts by renaming.
    mm_path = tmp_path / "dalle_encoder.pth"
    torch.save({"state_dict": {f"target_generator.{k}": v for k, v in enc.state_dict().items()}}, mm_path)
    enc_path, dec_path = tmp_path / "enc.pth", tmp_path / "dec.pth"
    torch.save(enc.state_dict(), enc_path)
    torch.save(dec.state_dict(), dec_path)

    tok = create_tokenizer("dall-e", weights=enc_path, decoder_weights=dec_path)
    tok_mm = create_tokenizer("dall-e", weights=mm_path)
    assert isinstance(tok, DalleTokenizer) and tok.vocab_size == 8192 and tok.downsample == 8 and tok.in_chans == 3

    torch.manual_seed(1)
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        ref = enc(map_pixels(x))  # [2, 8192, 14, 14], fp32 on CPU
        ours = tok.logits(x)
        ours_mm = tok_mm.logits(x)
    assert ours.shape == ref.shape == (2, 8192, 14, 14)
    assert _rel_err(ours, ref) <= 1e-5
    assert torch.equal(ours_mm, ours)
    ids = tok.encode(x)
    assert ids.dtype == torch.long and ids.shape == (2, 14, 14)
    assert torch.equal(ids, ref.argmax(1))

    onehot = F.one_hot(ids, 8192).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ref_stats = dec(onehot)  # [2, 6, 112, 112]
        our_stats = tok.decoder(onehot)
    assert _rel_err(our_stats, ref_stats) <= 1e-5
    img = tok.decode(ids)
    assert img.shape == (2, 3, 112, 112) and 0 <= img.min() and img.max() <= 1


def test_convert_dalle_pickle_requires_trust(tmp_path):
    dall_e = pytest.importorskip("dall_e")
    small = dall_e.Encoder(n_hid=64, vocab_size=512)  # the converter only renames keys; keep the pickle small
    src = tmp_path / "encoder.pkl"
    torch.save(small, src)
    with pytest.raises(PermissionError, match="trust_pickle"):
        convert_dalle_pickle(src, tmp_path / "enc.safetensors", trust_pickle=False)
    assert not (tmp_path / "enc.safetensors").exists()
    dst = convert_dalle_pickle(src, tmp_path / "enc.safetensors", trust_pickle=True)
    from safetensors.torch import load_file

    out = load_file(str(dst))
    assert torch.equal(out["encoder.blocks.input.weight"], small.blocks.input.w)
    assert torch.equal(out["encoder.blocks.output.conv.bias"], small.blocks.output.conv.b)
    # The pickle itself is refused by the normal loader, with a pointer to the converter.
    with pytest.raises(TokenizerError, match="--trust-pickle"):
        create_tokenizer("dall-e", weights=src)
    # Width 64 / vocab 512 is not DALL-E's architecture: the converted file loads with a named mismatch.
    with pytest.raises(TokenizerError, match="shape mismatch"):
        create_tokenizer("dall-e", weights=dst)


# ------------------------------------------------------------------------------ shipped tokenizer
def _fmnist_test_images(n: int) -> torch.Tensor:
    """First n Fashion-MNIST test images as [n, 1, 32, 32] floats in [0, 1] (28 -> 32 bilinear)."""
    x = torch.from_numpy(read_idx(FMNIST_TEST)[:n].copy())[:, None].float()  # [n, 1, 28, 28]
    return (F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).round().clamp(0, 255)) / 255


@pytest.fixture(scope="module")
def fmnist_tok():
    return create_tokenizer("fmnist_dvae")


@pytest.mark.skipif(not FMNIST_TEST.is_file(), reason="Fashion-MNIST not installed")
def test_shipped_fmnist_tokenizer_uses_most_codes(fmnist_tok):
    tok = fmnist_tok
    assert (tok.vocab_size, tok.downsample, tok.in_chans) == (512, 4, 1)
    x = _fmnist_test_images(2000)
    ids = tok.encode(x)
    assert ids.shape == (2000, 8, 8) and ids.dtype == torch.long
    used = ids.unique().numel() / tok.vocab_size
    assert used >= 0.5, f"only {used:.1%} of codes used on 2000 test images"
    rec = tok.decode(ids[:64])
    assert rec.shape == (64, 1, 32, 32)
    assert F.mse_loss(rec, x[:64]).item() < 0.03  # a blank image would give ~0.17


def test_tokenizer_is_frozen(fmnist_tok):
    tok = fmnist_tok
    tok.train()
    assert not tok.training and not any(m.training for m in tok.modules())
    assert not any(p.requires_grad for p in tok.parameters())
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    ids = tok.encode(x)
    assert ids.is_inference()


# ------------------------------------------------------------------------------------------ errors
def test_bad_images_are_named(fmnist_tok):
    with pytest.raises(ValueError, match="expects 1 channel.*got 3"):
        fmnist_tok.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"min -0\.5.*max 1\.5"):
        fmnist_tok.encode(_out_of_range())
    assert fmnist_tok.encode(_out_of_range(), check_range=False).shape == (2, 8, 8)  # the training step's sync-free path
    with pytest.raises(ValueError, match="uint8"):
        fmnist_tok.encode(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not divisible"):
        fmnist_tok.encode(torch.rand(2, 1, 30, 30))


def _out_of_range() -> torch.Tensor:
    x = torch.rand(2, 1, 32, 32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -0.5, 1.5
    return x


def test_missing_and_corrupt_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_tokenizer("dall-e", weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="needs weights"):
        create_tokenizer("dall-e")
    with pytest.raises(FileNotFoundError, match="unknown tokenizer"):
        create_tokenizer(str(tmp_path / "no_such_run"))
    for name in ("bad.pth", "bad.safetensors"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(TokenizerError, match=f"cannot read tokenizer weights .*{name}"):
            create_tokenizer("dall-e", weights=tmp_path / name)
    # A trained-tokenizer directory whose weight file is truncated.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(SHIPPED["fmnist_dvae"], run / "tokenizer.yaml")
    data = SHIPPED["fmnist_dvae"].with_suffix(".safetensors").read_bytes()
    (run / "tokenizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match="tokenizer.safetensors"):
        create_tokenizer(run)
    (run / "tokenizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.safetensors"):
        create_tokenizer(run)


def test_checkpoint_config_mismatch_is_named(tmp_path):
    # Overrides that contradict the checkpoint's recorded architecture.
    with pytest.raises(TokenizerError, match="vocab_size: config 1024 vs checkpoint 512"):
        create_tokenizer("fmnist_dvae", vocab_size=1024)
    with pytest.raises(TokenizerError, match="hidden"):
        create_tokenizer("fmnist_dvae", hidden=32)
    # Weights without metadata (e.g. re-saved by hand) still fail on the shapes, with the key named.
    tok = create_tokenizer("fmnist_dvae")
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in tok.model.state_dict().items()}, str(run / "tokenizer.safetensors"))
    (run / "tokenizer.yaml").write_text(SHIPPED["fmnist_dvae"].read_text().replace("vocab_size: 512", "vocab_size: 256"))
    with pytest.raises(TokenizerError, match=r"shape mismatch.*codebook: checkpoint \(512, \d+\) vs model \(256"):
        create_tokenizer(run)


# -------------------------------------------------------------------------------------------- train
@pytest.mark.skipif(not FMNIST_TEST.is_file(), reason="Fashion-MNIST not installed")
def test_tiny_train_run_writes_loadable_tokenizer(tmp_path):
    """30 steps on 64 images: the written tokenizer loads, its metrics.json are what the loaded tokenizer gives
    on the 32 held-out images (recomputed here), it reconstructs them better than the best constant image,
    and recon.png shows those images beside their reconstructions."""
    from PIL import Image
    from torchvision import transforms as T

    from beit.data import build_dataset
    from beit.train.tokenizer import train_tokenizer

    cfg = load_config(None, [
        "tokenizer.vocab_size=64", "tokenizer.hidden=16", "tokenizer.downsample=4", "tokenizer.in_chans=1",
        "tokenizer.image_size=32", "tokenizer.temperature_anneal_steps=4", "tokenizer.kl_warmup_steps=2",
        "data.dataset=fashion_mnist", "data.in_chans=1", "data.batch_size=16", "data.train_subset=64",
        "data.eval_subset=32", "train.max_steps=30", "train.progress=false", "train.device=cpu",
    ])
    out = tmp_path / "tok"
    metrics = train_tokenizer(cfg, out, log=lambda *_: None)
    for f in ("tokenizer.safetensors", "tokenizer.yaml", "metrics.json", "recon.png"):
        assert (out / f).is_file(), f
    tok = create_tokenizer(out)
    held_out = build_dataset(cfg.data, "test", T.Compose([T.Resize(32), T.CenterCrop(32), T.PILToTensor()]))
    x = torch.stack([held_out[i][0] for i in range(32)]).float() / 255  # [32, 1, 32, 32]
    ids = tok.encode(x)  # [32, 8, 8]
    rec = tok.decode(ids)  # [32, 1, 32, 32]
    hist = torch.bincount(ids.flatten(), minlength=64).double()
    p = hist[hist > 0] / hist.sum()
    assert metrics["codes_used"] == int((hist > 0).sum()) and metrics["codes_used_frac"] == (hist > 0).double().mean()
    assert metrics["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-3)
    mse = float((rec - x).pow(2).mean())
    assert metrics["recon_mse"] == pytest.approx(mse, rel=1e-4)
    # learned something: below the error of the best constant image (the held-out mean pixel, ~0.110;
    # the untrained tokenizer's error is ~0.16, this run's ~0.092)
    assert mse < float((x - x.mean()).pow(2).mean()) - 0.01
    # recon.png: rows of 4 (original, reconstruction) pairs, each tile x3 nearest, 2 px padding (grey)
    png = np.asarray(Image.open(out / "recon.png").convert("L")).astype(int)
    assert png.shape == (8 * 98 + 2, 8 * 98 + 2)  # 32 pairs = 64 tiles of 96 px, 8 a row
    for k in (0, 5, 15):  # image k: tile 2k (original) and 2k + 1 (reconstruction)
        for tile, want in ((2 * k, x[k, 0]), (2 * k + 1, rec[k, 0])):
            r, c = divmod(tile, 8)
            got = png[2 + 98 * r: 98 * (r + 1), 2 + 98 * c: 98 * (c + 1)]
            expect = np.kron((want.numpy() * 255 + 0.5).clip(0, 255).astype(int), np.ones((3, 3), int))
            assert np.abs(got - expect).max() <= 1, (k, tile)
    ids = tok.encode(torch.rand(3, 1, 32, 32))
    assert ids.shape == (3, 8, 8) and int(ids.max()) < 64
    assert create_tokenizer(out / "tokenizer.safetensors").vocab_size == 64  # config from the metadata
    with pytest.raises(FileExistsError, match="overwrite"):
        train_tokenizer(cfg, out, log=lambda *_: None)


TINY_TRAIN = [
    "tokenizer.vocab_size=64", "tokenizer.hidden=16", "tokenizer.downsample=4", "tokenizer.in_chans=1",
    "tokenizer.image_size=32", "tokenizer.temperature_anneal_steps=4", "tokenizer.kl_warmup_steps=2",
    "tokenizer.revive_every=2", "data.dataset=fashion_mnist", "data.in_chans=1", "data.batch_size=16",
    "data.train_subset=64", "data.eval_subset=32", "data.num_workers=0", "train.steps=8", "train.log_every=1",
    "train.progress=false", "train.device=cpu",
]


@pytest.mark.skipif(not FMNIST_TEST.is_file(), reason="Fashion-MNIST not installed")
def test_tokenizer_train_resume_matches_an_uninterrupted_run(tmp_path):
    """`beit tokenizer train` runs on the shared loop: stopped after 3 of 8 steps (mid-epoch, mid revival
    window) and resumed, it ends with the same weights, revival history and loss rows as one run of 8."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def train(out, *extra):
        config = Path(__file__).resolve().parents[1] / "configs/tokenizer/fmnist_dvae.yaml"
        cmd = [sys.executable, "-m", "beit", "tokenizer", "train", str(config), "--out", str(out), *TINY_TRAIN,
               "train.amp=none", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]

    whole, split = tmp_path / "whole", tmp_path / "split"
    train(whole)
    train(split, "train.max_steps=3")
    assert json.loads((split / "summary.json").read_text())["steps"] == 3
    train(split, "train.max_steps=8", "--resume")
    a, b = load_file(str(whole / "tokenizer.safetensors")), load_file(str(split / "tokenizer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hist = [json.loads((d / "metrics.json").read_text())["history"] for d in (whole, split)]
    assert [h["step"] for h in hist[0]] == [2, 4, 6, 8] and hist[0] == hist[1]
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, split)]
    losses = [[(r["step"], r["loss"]) for r in rs if r.get("split", "train") == "train"] for rs in rows]
    assert len(losses[0]) == 8 and losses[0] == losses[1]


def test_tokenizer_epochs_are_the_loops_optimizer_steps():
    """train.epochs of a tokenizer run count the loop's optimizer steps per epoch (one global batch each: per
    device x accumulation x processes), so one process without accumulation keeps N // batch_size steps, and
    2 processes or 2 accumulation steps take half as many; a set smaller than one global batch is refused."""
    from beit.config import ConfigError
    from beit.train.tokenizer import _Images, _schedule_config

    images = _Images(torch.zeros(100, 1, 8, 8, dtype=torch.uint8))

    def steps(world_size: int, *overrides: str) -> int:
        cfg = load_config(None, ["data.batch_size=8", "train.epochs=3", *overrides])
        return _schedule_config(cfg, images, world_size).train.steps

    assert steps(1) == 3 * (100 // 8) and steps(2) == 3 * (100 // 2 // 8) == steps(1, "optim.accum_steps=2")
    assert steps(1, "train.steps=7") == 7 and steps(1, "train.max_steps=5") == 5
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        steps(1, "data.batch_size=128")


# --------------------------------------------------------------------------------------------- CLI
def test_cli_encode_and_reconstruct(tmp_path, fmnist_tok, capsys):
    """`beit tokenizer encode/reconstruct` on image files: same ids as the library call, PNG of pairs."""
    from PIL import Image

    from beit.cli import main as cli_main

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):  # 28 px grey garments-to-be: resized to the tokenizer's 32 px by the command
        arr = (torch.rand(28, 28, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(arr, mode="L").save(paths[-1])
    with pytest.raises(SystemExit) as exit_:
        cli_main(["tokenizer", "encode", "--tokenizer", "fmnist_dvae", *paths, "--out", str(tmp_path / "ids.pt")])
    assert exit_.value.code == 0
    saved = torch.load(tmp_path / "ids.pt", weights_only=True)
    assert saved["ids"].shape == (2, 8, 8) and saved["images"] == paths
    from torchvision.transforms.functional import resize

    x = torch.stack([resize(torch.from_numpy(np.array(Image.open(p))).float()[None] / 255, [32, 32], antialias=True)
                     for p in paths])
    agree = (fmnist_tok.encode(x) == saved["ids"]).float().mean().item()
    assert agree > 0.9, agree  # PIL vs tensor resize differ slightly at the pixel level
    printed = capsys.readouterr().out
    assert f"# {paths[0]}: 8x8 tokens" in printed and str(saved["ids"][0, 0, 0].item()) in printed

    with pytest.raises(SystemExit) as exit_:
        cli_main(["tokenizer", "reconstruct", "--tokenizer", "fmnist_dvae", *paths, "--out", str(tmp_path / "r.png")])
    assert exit_.value.code == 0
    grid = Image.open(tmp_path / "r.png")
    assert grid.size == (2 + 2 * 34, 2 + 2 * 34)  # 2 rows x (original | reconstruction), 32 px + 2 px padding
    with pytest.raises(SystemExit) as exit_:  # a missing file is a clear error, not a traceback
        cli_main(["tokenizer", "encode", "--tokenizer", "fmnist_dvae", str(tmp_path / "nope.png")])
    assert exit_.value.code == 2
    assert "nope.png" in capsys.readouterr().err
