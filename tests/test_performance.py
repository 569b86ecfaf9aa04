"""The speed-ups (docs/performance.md) leave the numbers alone: compiled blocks, the fused AdamW and the
channels-last tokenizer give what the plain implementations give, within the precision they run at."""

import copy
import os

import pytest
import torch

from beit.models import create_model
from beit.train.loop import autocast, compile_blocks


def _forward_backward(model, x, mask, amp="bf16"):
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), amp):
        out = model(x, mask)  # [num_masked, vocab]
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_compiled_blocks_give_the_eager_outputs_and_gradients_under_bf16():
    """Within bf16 tolerance, measured rather than guessed: compiled-vs-eager (both bf16) may differ by at most
    twice what bf16 itself costs (eager bf16 vs eager fp32), per output and per parameter's gradient."""
    torch.manual_seed(0)
    plain = create_model("beit_fmnist_patch4_32_512_vocab", depth=2, drop_path_rate=0.0)  # no random stream
    fast = copy.deepcopy(plain)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: an earlier test's compiled frames would count here
    compile_blocks(fast)  # as train.compile=true
    x = torch.randn(4, 1, 32, 32)
    mask = torch.rand(4, 64) < 0.4
    out_32, g_32 = _forward_backward(plain, x, mask, amp="none")
    out_p, g_p = _forward_backward(plain, x, mask)
    assert not torch._dynamo.utils.counters["frames"]["ok"]  # eager: nothing traced
    out_f, g_f = _forward_backward(fast, x, mask)
    # dynamo traced the blocks: the comparison below is compiled against eager, not eager against itself
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert _rel(out_f, out_p) <= 2 * _rel(out_p, out_32) + 1e-3
    assert g_p.keys() == g_f.keys() == g_32.keys() and len(g_p) > 10
    for name in g_p:
        assert _rel(g_f[name], g_p[name]) <= 2 * _rel(g_p[name], g_32[name]) + 1e-3, name
    torch._dynamo.reset()


@pytest.mark.fmnist
def test_fused_adamw_takes_the_for_each_step(tmp_path):
    """The optimizer the training loop builds is the fused AdamW (read from its checkpoint after a real
    2-step run), and the fused step gives what the for-each step gives."""
    from test_pretrain import write_config

    from beit.config import load_config
    from beit.tasks import run

    cfg = load_config(write_config(tmp_path, data={"train_subset": 64}, train={"max_steps": 2}))
    run_dir = run("pretrain", cfg)
    groups = torch.load(run_dir / "ckpt-00000002.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) >= 2 and all(g["fused"] is True for g in groups), [g.get("fused") for g in groups]

    torch.manual_seed(0)
    params = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for fused in (False, True):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05, fused=fused)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in ps])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
                    reason="apt-get install dataset-fashion-mnist")
def test_channels_last_tokenizer_gives_the_nchw_tokens():
    """The shipped tokenizer in NHWC (as `freeze` leaves it) against the same weights in NCHW, on 512 real
    training images: at least 99.5% of tokens equal (only the convolutions' summation order differs)."""
    from beit.data.datasets import load_fashion_mnist
    from beit.builders import create_tokenizer

    images, _ = load_fashion_mnist(FMNIST, "train")
    x = torch.nn.functional.interpolate(torch.from_numpy(images[:512]).float()[:, None] / 255, size=32,
                                        mode="bilinear", antialias=True).clamp(0, 1)  # [512, 1, 32, 32]
    tok = create_tokenizer("fmnist_dvae")
    assert tok.model.encoder.blocks.input.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = tok.encode(x)
    tok.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        nchw = tok.model.logits(x.contiguous()).argmax(1)
    agreement = (nhwc == nchw).float().mean().item()
    assert agreement >= 0.995, agreement


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_two_view_tensors_have_torchvisions_bits(mode):
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    from beit.data.transforms import TwoViewTransform, unit_array

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 24) if mode == "L" else (24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, mode)
    assert torch.equal(torch.from_numpy(unit_array(img)), TF.to_tensor(img))
    c = 1 if mode == "L" else 3
    mean, std = [0.2860, 0.45, 0.406][:c], [0.3530, 0.224, 0.225][:c]
    # A whole-image crop to the image's own size, without jitter or flip: the views are the image itself.
    tf = TwoViewTransform(24, 24, scale=(1, 1), ratio=(1, 1), color_jitter=0, hflip=0, mean=mean, std=std,
                          in_chans=c)
    patch, tok = tf(img, np.random.default_rng(1))
    assert torch.equal(patch, TF.normalize(TF.to_tensor(img), mean, std))
    assert torch.equal(tok, TF.to_tensor(img)) and patch.dtype == tok.dtype == torch.float32


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_two_view_pil_calls_give_torchvisions_views(mode):
    """Colour jitter, crop and resizes made with direct PIL calls (and a numpy mean for the contrast) give the
    bytes torchvision's functional ops give for the same draws, on random images and crops."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from beit.data.transforms import TwoViewTransform, random_resized_crop_box, unit_array

    def reference(img, tf, rng):  # the same draws, in the same order, through torchvision
        lo, hi = max(0.0, 1.0 - tf.color_jitter), 1.0 + tf.color_jitter
        factors = lo + (hi - lo) * rng.random(3)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        for k in rng.permutation(3):
            if not (ops[k] is TF.adjust_saturation and img.mode == "L"):
                img = ops[k](img, float(factors[k]))
        if rng.random() < tf.hflip:
            img = TF.hflip(img)
        top, left, h, w = random_resized_crop_box(img.width, img.height, tf.scale, tf.ratio, rng)
        patch = TF.resized_crop(img, top, left, h, w, list(tf.patch_size), InterpolationMode.BICUBIC)
        tok = TF.resized_crop(img, top, left, h, w, list(tf.tokenizer_size), InterpolationMode.LANCZOS)
        return unit_array(patch), unit_array(tok)

    c = 1 if mode == "L" else 3
    tf = TwoViewTransform(32, 16, scale=(0.2, 1.0), color_jitter=0.8, mean=[0.0] * c, std=[1.0] * c, in_chans=c)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 28, 28) if mode == "L" else (40, 28, 28, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        img = Image.fromarray(p >> (i % 3))  # darker images too: the contrast's mean grey level varies
        patch, tok = tf(img, np.random.default_rng([7, i]))
        ref_patch, ref_tok = reference(img, tf, np.random.default_rng([7, i]))
        assert np.array_equal(patch.numpy(), ref_patch) and np.array_equal(tok.numpy(), ref_tok), i
