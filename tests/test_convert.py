"""Checkpoint layouts, converters, resolution change and pretrained loading.

Parity with timm and HF transformers uses random weights for *every* parameter (gammas, rel-pos tables,
biases included: the zero-initialised tables would hide index or layout bugs). BEiT-L/384 runs at full
depth (about a minute on 2 CPU cores); BEIT_FAST_PARITY=1 shrinks it to 2 blocks for quick local runs.
"""

import json
import os
import re

import numpy as np
import pytest
import torch

import beit.models.vit as vit
from beit.convert import (
    detect_layout,
    from_official,
    load_pretrained,
    read_checkpoint,
    save_checkpoint_as,
    to_official,
    unwrap_checkpoint,
    unwrap_state_dict,
    write_weights,
)
from beit.cli import main as cli_main
from beit.convert.resize import resize_pos_embed, resize_rel_pos_table
from beit.builders import create_model

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
interpolate = pytest.importorskip("scipy.interpolate")


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
    """Every test overwrites the weights with its own random values; skip the slow truncated-normal init."""
    monkeypatch.setattr(vit, "trunc_normal_", lambda t, std, trunc: t)
    import timm.models.beit as timm_beit

    monkeypatch.setattr(timm_beit, "trunc_normal_", lambda t, *a, **k: t)


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            is_ln_weight = re.search(r"(norm\d?|layernorm\w*)\.weight$", name) is not None
            p.copy_(noise + 1.0 if is_ln_weight else noise)
    return model.eval()


def assert_close_logits(a, b):
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5 * a.abs().max().item(), f"max abs diff {diff} vs max |logit| {a.abs().max().item()}"
    print(f"parity: max abs diff {diff:.3g}, max |logit| {a.abs().max().item():.3g}")  # shown with -s
    return diff


def assert_same_tensors(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ timm
def test_timm_base_parity_both_ways():
    torch.manual_seed(0)
    tm = randomize_(timm.create_model("beit_base_patch16_224", pretrained=False))
    ours = create_model("beit_base_patch16_224").eval()
    report = load_pretrained(ours, tm.state_dict())
    assert report.layout == "official" and not report.missing and not report.unexpected
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close_logits(tm(x), ours(x))
    # ours -> timm: identical names and shapes, so a strict load works.
    tm.load_state_dict(from_official(ours.state_dict(), "official"), strict=True)


def test_timm_large_384_parity():
    depth = {"depth": 2} if os.environ.get("BEIT_FAST_PARITY") else {}
    tm = randomize_(timm.create_model("beit_large_patch16_384", pretrained=False, **depth), seed=1)
    ours = create_model("beit_large_patch16_384", **depth).eval()
    report = load_pretrained(ours, tm.state_dict())
    assert not report.missing and not report.unexpected and not report.resized
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert_close_logits(tm(x), ours(x))


# ------------------------------------------------------------------------------------------------ HF
def _hf_config(**kw):
    base = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                layer_norm_eps=1e-6, image_size=224, patch_size=16, drop_path_rate=0.0)
    return transformers.BeitConfig(**{**base, **kw})


def test_hf_classifier_parity_both_ways():
    hf = randomize_(transformers.BeitForImageClassification(
        _hf_config(use_relative_position_bias=True, use_mean_pooling=True, num_labels=1000)), seed=2)
    ours = create_model("beit_base_patch16_224", depth=2).eval()
    report = load_pretrained(ours, hf.state_dict())  # transformers-5 in-memory names
    assert report.layout == "hf" and not report.missing and not report.unexpected
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close_logits(hf(pixel_values=x).logits, ours(x))

    # ours -> HF, with fresh random weights on our side.
    randomize_(ours, seed=3)
    hf.load_state_dict(from_official(ours.state_dict(), "hf", hf_names="transformers5"), strict=True)
    with torch.no_grad():
        assert_close_logits(ours(x), hf(pixel_values=x).logits)


def test_hf_mim_parity_both_ways():
    cfg = _hf_config(use_mask_token=True, use_shared_relative_position_bias=True, use_mean_pooling=True,
                     vocab_size=8192)
    hf = randomize_(transformers.BeitForMaskedImageModeling(cfg), seed=4)
    ours = create_model("beit_base_patch16_224_8k_vocab", depth=2, drop_path_rate=0.0).eval()
    # Via the hub layout this time (HF -> hub names -> ours).
    hub = from_official(to_official(hf.state_dict(), "hf"), "hf")
    assert any(k.startswith("beit.encoder.layer.0.attention.attention.query") for k in hub)
    report = load_pretrained(ours, hub)
    assert not report.missing and not report.unexpected
    x = torch.randn(1, 3, 224, 224)
    mask = torch.rand(1, 196, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        hf_logits = hf(pixel_values=x, bool_masked_pos=mask).logits  # [B, 196, V]: every position
        assert_close_logits(hf_logits[mask], ours(x, mask))

        randomize_(ours, seed=5)
        hf.load_state_dict(from_official(ours.state_dict(), "hf", hf_names="transformers5"), strict=True)
        assert_close_logits(ours(x, mask), hf(pixel_values=x, bool_masked_pos=mask).logits[mask])


@pytest.mark.parametrize("name,hf_cls", [
    ("beit_tiny_patch16_224", "BeitForImageClassification"),
    ("beit_tiny_patch16_224_8k_vocab", "BeitForMaskedImageModeling"),
])
def test_cli_to_hf_directory_loads_with_from_pretrained(tmp_path, name, hf_cls):
    ours = randomize_(create_model(name, depth=2, num_classes=10) if "vocab" not in name
                      else create_model(name, depth=2, vocab_size=64))
    from safetensors.torch import save_file

    save_file(ours.state_dict(), str(tmp_path / "ours.safetensors"))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", str(tmp_path / "ours.safetensors"), str(tmp_path / "hf"), "--to", "hf"])
    assert exit_.value.code == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_norm_eps"] == 1e-6 and cfg["architectures"] == [hf_cls]
    hf, info = getattr(transformers, hf_cls).from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        if "vocab" in name:
            mask = torch.zeros(1, 196, dtype=torch.bool)
            mask[0, 5:60] = True
            assert_close_logits(ours(x, mask), hf(pixel_values=x, bool_masked_pos=mask).logits[mask])
        else:
            assert_close_logits(ours(x), hf(pixel_values=x).logits)
    # ...and the directory reads back into our model.
    again = create_model(name, depth=2, num_classes=10) if "vocab" not in name else create_model(name, depth=2, vocab_size=64)
    report = load_pretrained(again, tmp_path / "hf")
    assert report.layout == "hf" and not report.missing and not report.unexpected
    assert_same_tensors(again.state_dict(), ours.state_dict())


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", ["beit_tiny_patch16_224_8k_vocab", "beit_tiny_patch16_224"])
def test_round_trips_are_bit_identical(name):
    sd = randomize_(create_model(name, depth=2)).state_dict()
    for layout in ("official", "hf", "mmpretrain"):
        assert detect_layout(from_official(sd, layout)) == layout
        assert_same_tensors(to_official(from_official(sd, layout), layout), sd)
    assert_same_tensors(to_official(from_official(sd, "hf", hf_names="transformers5"), "hf"), sd)
    # official -> ours -> HF -> OpenMMLab -> official
    hf = from_official(sd, "hf")
    mm = from_official(to_official(hf, "hf"), "mmpretrain")
    assert_same_tensors(to_official(mm, "mmpretrain"), sd)
    # The OpenMMLab names from the reference (§3.8).
    if "vocab" in name:
        for k in ("backbone.ln1.weight", "head.cls_head.weight", "backbone.rel_pos_bias.relative_position_bias_table",
                  "backbone.layers.1.ffn.layers.0.0.weight", "backbone.layers.1.ffn.layers.1.bias",
                  "backbone.patch_embed.projection.weight", "backbone.mask_token", "backbone.layers.0.gamma_2"):
            assert k in mm, k
        assert "layernorm.weight" in hf and "beit.encoder.relative_position_bias.relative_position_bias_table" in hf
    else:
        for k in ("backbone.ln2.weight", "head.fc.weight", "backbone.layers.0.attn.relative_position_bias_table"):
            assert k in mm, k
        for k in ("beit.pooler.layernorm.weight", "classifier.weight", "beit.encoder.layer.1.lambda_1",
                  "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"):
            assert k in hf, k
    assert not any(k.endswith("key.bias") for k in hf)  # BEiT has no key bias


def _mm_rel_pos_index(gh: int, gw: int) -> torch.Tensor:
    """[N+1, N+1] rows of the relative-position table, as mmpretrain's BEiTAttention builds them: patch pairs by
    their (dy, dx) offset, then the three [CLS] entries at the table's end (cls->patch, patch->cls, cls->cls)."""
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    y, x = ys.flatten(), xs.flatten()  # [N]
    n_rel = (2 * gh - 1) * (2 * gw - 1)
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = (y[:, None] - y[None, :] + gh - 1) * (2 * gw - 1) + (x[:, None] - x[None, :] + gw - 1)
    index[0, 1:], index[1:, 0], index[0, 0] = n_rel, n_rel + 1, n_rel + 2
    return index


def _mmpretrain_classifier(sd: dict, x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """Logits of an OpenMMLab `ImageClassifier` (BEiTViT, per-layer rel-pos bias, out_type='avg_featmap',
    final_norm=False, LinearClsHead) from its state dict, written from mmpretrain's beit.py: each layer is
    x + gamma_1 * attn(ln1(x)), then x + gamma_2 * ffn(ln2(x)); the FFN is `layers.0.0` (fc, GELU) then
    `layers.1`; the mean of the patch tokens goes through `ln2`, then `head.fc`."""
    F = torch.nn.functional
    ln = lambda t, pre: F.layer_norm(t, t.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], eps=1e-6)  # noqa: E731
    t = F.conv2d(x, sd["backbone.patch_embed.projection.weight"], sd["backbone.patch_embed.projection.bias"],
                 stride=patch)  # [B, D, gh, gw]
    gh, gw = t.shape[-2:]
    t = torch.cat([sd["backbone.cls_token"].expand(len(x), -1, -1), t.flatten(2).transpose(1, 2)], 1)  # [B, N+1, D]
    if "backbone.pos_embed" in sd:
        t = t + sd["backbone.pos_embed"]
    index = _mm_rel_pos_index(gh, gw)
    B, L, D = t.shape
    i = 0
    while f"backbone.layers.{i}.ln1.weight" in sd:
        pre = f"backbone.layers.{i}."
        h = ln(t, pre + "ln1")
        bias = torch.cat([sd[pre + "attn.q_bias"], torch.zeros_like(sd[pre + "attn.v_bias"]), sd[pre + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[pre + "attn.qkv.weight"], bias).reshape(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4)
        rel = sd[pre + "attn.relative_position_bias_table"][index].permute(2, 0, 1)  # [heads, L, L]
        attn = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1) + rel).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(B, L, D)
        t = t + sd[pre + "gamma_1"] * F.linear(a, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(t, pre + "ln2"), sd[pre + "ffn.layers.0.0.weight"], sd[pre + "ffn.layers.0.0.bias"]))
        t = t + sd[pre + "gamma_2"] * F.linear(h, sd[pre + "ffn.layers.1.weight"], sd[pre + "ffn.layers.1.bias"])
        i += 1
    pooled = ln(t[:, 1:].mean(1), "backbone.ln2")  # [B, D]
    return F.linear(pooled, sd["head.fc.weight"], sd["head.fc.bias"])


def test_mmpretrain_layout_gives_the_openmmlab_model_s_logits():
    """Our classifier, written in the OpenMMLab layout, run by a forward written from mmpretrain's source (not
    through our key tables): the same logits. A swap consistent in both tables (e.g. `ln1` / `ln2`), which
    the round trips cannot see, changes them."""
    ours = randomize_(create_model("beit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=3, img_size=64))
    mm = from_official(ours.state_dict(), "mmpretrain")
    assert {k for k in mm if k.startswith("backbone.layers.0.")} == {
        f"backbone.layers.0.{k}" for k in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "gamma_1", "gamma_2",
                                           "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
                                           "attn.proj.bias", "attn.relative_position_bias_table",
                                           "ffn.layers.0.0.weight", "ffn.layers.0.0.bias", "ffn.layers.1.weight",
                                           "ffn.layers.1.bias")}
    assert mm["backbone.layers.0.attn.relative_position_bias_table"].shape == ((2 * 4 - 1) ** 2 + 3, 3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_logits(ours(x), _mmpretrain_classifier(mm, x, heads=3, patch=16))


def test_unwrap_prefixes_and_detection():
    sd = {"cls_token": torch.zeros(1, 1, 4), "blocks.0.attn.qkv.weight": torch.zeros(12, 4)}
    wrapped = {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}, "meta": {"epoch": 3}}
    wrapped["state_dict"]["module.blocks.0.attn.relative_position_index"] = torch.zeros(5, 5, dtype=torch.long)
    assert_same_tensors(unwrap_state_dict(wrapped), sd)
    assert_same_tensors(unwrap_state_dict({"model": sd, "config": {"a": 1}, "step": 7}), sd)
    # the one unwrapper (tokenizer files use it too): any nesting of the three wrappers, the mapping untouched
    assert unwrap_checkpoint({"model": {"state_dict": {"module": sd}}, "step": 7}) is sd
    assert unwrap_checkpoint(sd) is sd and unwrap_checkpoint([1]) == [1]
    mm = {"backbone.cls_token": torch.zeros(1, 1, 4), "target_generator.encoder.blocks.w": torch.zeros(1)}
    assert detect_layout(mm) == "mmpretrain" and "target_generator.encoder.blocks.w" not in to_official(mm)
    with pytest.raises(ValueError, match="unrecognised checkpoint layout.*encoder.weird"):
        detect_layout({"encoder.weird": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------ resize
def _official_positions(src, dst):
    """The official fine-tuning script's sample positions, written independently of beit.convert."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return q, np.array([-d for d in reversed(dis)] + [0.0] + dis), np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)


def _scipy_resize(table, src_hw, dst_hw):
    """Reference: interp2d(kind='cubic')'s gridded fit, via its SciPy ≥ 1.14 replacement."""
    (qy, ys, ty), (_, xs, tx) = _official_positions(src_hw[0], dst_hw[0]), _official_positions(src_hw[1], dst_hw[1])
    if src_hw[1] == dst_hw[1]:
        xs = tx  # unchanged axis: the identity positions
    out = []
    for h in range(table.shape[1]):
        z = table[:-3, h].double().reshape(src_hw).numpy()
        spline = interpolate.RectBivariateSpline(ys, xs, z, kx=3, ky=3, s=0)
        out.append(torch.from_numpy(spline(ty, tx)).reshape(-1))
    return qy, torch.stack(out, 1)


def test_rel_pos_resize_224_to_384_matches_scipy():
    table = torch.randn(732, 12, generator=torch.Generator().manual_seed(0))
    q, ref = _scipy_resize(table, (27, 27), (47, 47))
    assert round(q, 6) == 1.090307
    out = resize_rel_pos_table(table, (24, 24))
    assert out.shape == (2212, 12)
    assert (out[:-3].double() - ref).abs().max() <= 1e-4
    assert torch.equal(out[-3:], table[-3:])  # the cls rows are kept as they are
    assert resize_rel_pos_table(table, (14, 14)) is table  # identity at the same size


def test_rel_pos_resize_non_square_matches_scipy():
    table = torch.randn(27 * 19 + 3, 3, generator=torch.Generator().manual_seed(1))
    _, ref = _scipy_resize(table, (27, 19), (47, 23))
    out = resize_rel_pos_table(table, (24, 12), src_grid=(14, 10))
    assert out.shape == (47 * 23 + 3, 3)
    assert (out[:-3].double() - ref).abs().max() <= 1e-4
    _, ref = _scipy_resize(table, (27, 19), (47, 19))  # one axis unchanged
    assert (resize_rel_pos_table(table, (24, 10), src_grid=(14, 10))[:-3].double() - ref).abs().max() <= 1e-4


def test_pos_embed_resize_keeps_cls():
    pe = torch.randn(1, 197, 8)
    out = resize_pos_embed(pe, (24, 24))
    assert out.shape == (1, 577, 8) and torch.equal(out[:, 0], pe[:, 0])
    ref = torch.nn.functional.interpolate(pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(24, 24),
                                          mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 576, 8))


def test_resized_checkpoint_runs_at_384():
    src = randomize_(create_model("beit_base_patch16_224", depth=2))
    model = create_model("beit_base_patch16_384", depth=2).eval()
    report = load_pretrained(model, src.state_dict())
    assert sorted(report.resized) == [f"blocks.{i}.attn.relative_position_bias_table" for i in range(2)]
    assert not report.missing and not report.unexpected
    expected = resize_rel_pos_table(src.state_dict()["blocks.1.attn.relative_position_bias_table"], (24, 24))
    assert torch.equal(model.state_dict()["blocks.1.attn.relative_position_bias_table"], expected)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ loading
def test_wrong_model_size_fails_naming_tensor_and_shapes():
    large = create_model("beit_large_patch16_224", depth=1).state_dict()
    base = create_model("beit_base_patch16_224", depth=1)
    with pytest.raises(ValueError) as e:
        load_pretrained(base, large)
    msg = str(e.value)
    assert re.search(r"'[\w.]+': checkpoint \[.*1024.*\] vs model \[.*768.*\]", msg), msg
    assert "embed_dim 1024 vs model 768" in msg and "large vs base" in msg


def test_pt22k_checkpoint_into_classifier(tmp_path):
    mim = randomize_(create_model("beit_base_patch16_224_8k_vocab", depth=2))
    sd = mim.state_dict()
    sd["rel_pos_bias.relative_position_index"] = mim.rel_pos_bias.relative_position_index  # as released
    torch.save({"model": sd}, tmp_path / "beit_base_patch16_224_pt22k.pth")
    clf = create_model("beit_base_patch16_224", depth=2)
    report = load_pretrained(clf, tmp_path / "beit_base_patch16_224_pt22k.pth")
    assert sorted(report.unexpected) == ["lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"]
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.expanded_shared_rel_pos
    shared = sd["rel_pos_bias.relative_position_bias_table"]
    for blk in clf.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, shared)
    # create_model(pretrained=...) goes through the same loader.
    m = create_model("beit_base_patch16_224", depth=2, pretrained=str(tmp_path / "beit_base_patch16_224_pt22k.pth"))
    assert torch.equal(m.blocks[1].attn.relative_position_bias_table, shared)


def test_wrong_size_head_dropped_and_pt1k_800ep_variant():
    src = randomize_(create_model("beit_tiny_patch16_224", depth=2)).state_dict()
    report = load_pretrained(create_model("beit_tiny_patch16_224", depth=2, num_classes=10), src)
    assert report.dropped == ["head.weight", "head.bias"] and sorted(report.missing) == ["head.bias", "head.weight"]
    # pt1k_800ep: abs pos, no LayerScale, no rel-pos (reference §2.11).
    variant = dict(use_abs_pos_emb=True, init_values=0, use_rel_pos_bias=False, depth=2)
    sd = randomize_(create_model("beit_tiny_patch16_224", **variant)).state_dict()
    assert "pos_embed" in sd and not any("gamma" in k or "relative_position" in k for k in sd)
    assert not load_pretrained(create_model("beit_tiny_patch16_224", **variant), sd).missing
    report = load_pretrained(create_model("beit_tiny_patch16_224", depth=2), sd)
    assert report.unexpected == ["pos_embed"] and any("pt1k_800ep" in n for n in report.notes)
    # ...and at 384 its pos_embed is resized bicubically, cls slot kept.
    big = create_model("beit_tiny_patch16_224", img_size=384, **variant)
    assert load_pretrained(big, sd).resized == ["pos_embed"]
    assert torch.equal(big.pos_embed[:, 0], sd["pos_embed"][:, 0])


def test_write_weights_folder_file_and_torch_wrapper(tmp_path):
    """The one writer: a folder gets model.safetensors plus the given config.json, a file its metadata or wrapper."""
    from safetensors import safe_open

    qkv = torch.randn(6, 2)
    sd = {"a": qkv[:3], "b": qkv[3:].t()}  # shared storage, one of them non-contiguous: safetensors refuses both
    folder = write_weights(sd, tmp_path / "hf", {"model_type": "beit", "labels": [1, 2]})
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "beit", "labels": [1, 2]}
    assert_same_tensors(read_checkpoint(folder), sd)
    path = write_weights(sd, tmp_path / "sub" / "w.safetensors", metadata={"source": "x"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "source": "x"}
    assert read_checkpoint(write_weights(sd, tmp_path / "w.pth", wrapper="model")).keys() == {"model"}
    assert_same_tensors(read_checkpoint(write_weights(sd, tmp_path / "flat.pt")), sd)
    with pytest.raises(ValueError, match=r"w\.npz: unknown extension"):
        write_weights(sd, tmp_path / "w.npz")


def test_read_checkpoint_errors_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    import argparse

    torch.save({"model": {"cls_token": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match="obj.pth: weights_only loading failed.*does not unpickle"):
        read_checkpoint(tmp_path / "obj.pth")

    model = randomize_(create_model("beit_fmnist_patch4_32"))
    # our training checkpoint format, and a .safetensors of our model, both load exactly
    torch.save({"model": model.state_dict(), "config": {"model": {"name": "x"}}, "step": 3}, tmp_path / "run.pth")
    save_checkpoint_as(model.state_dict(), tmp_path / "m.safetensors", "official")
    save_checkpoint_as(model.state_dict(), tmp_path / "m_mm.pth", "mmpretrain")
    for f in ("run.pth", "m.safetensors", "m_mm.pth"):
        fresh = create_model("beit_fmnist_patch4_32")
        report = load_pretrained(fresh, tmp_path / f)
        assert not report.missing and not report.unexpected, f
        assert_same_tensors(fresh.state_dict(), model.state_dict())
    assert read_checkpoint(tmp_path / "m_mm.pth").keys() == {"state_dict"}


def test_sharded_hf_directory_reads_every_shard(tmp_path):
    """HF `save_pretrained(max_shard_size=...)` splits big models over shards listed in an index."""
    cfg = transformers.BeitConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                  use_relative_position_bias=True, use_mean_pooling=True, num_labels=10,
                                  layer_scale_init_value=0.1)
    hf = randomize_(transformers.BeitForImageClassification(cfg))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    hf.save_pretrained(tmp_path / "one")  # the same weights in one file
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # really sharded
    whole = read_checkpoint(tmp_path / "one")
    assert_same_tensors(read_checkpoint(tmp_path / "hf"), whole)
    # the older pickle-free .bin shards (written by hand: transformers 5 only writes safetensors)
    (tmp_path / "bin").mkdir()
    keys = sorted(whole)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for shard, ks in halves.items():
        torch.save({k: whole[k] for k in ks}, tmp_path / "bin" / shard)
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, ks in halves.items() for k in ks}}))
    assert_same_tensors(read_checkpoint(tmp_path / "bin"), whole)
    index_bin = tmp_path / "bin" / "pytorch_model.bin.index.json"
    index_bin.write_text(json.dumps({"weight_map": {"extra.weight": "pytorch_model-00001-of-00002.bin",
                                                    **json.loads(index_bin.read_text())["weight_map"]}}))
    with pytest.raises(ValueError, match="extra.weight.*incomplete"):
        read_checkpoint(tmp_path / "bin")
    # a shard that went missing is named, not silently skipped
    (tmp_path / "hf" / shards[0]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[0]):
        read_checkpoint(tmp_path / "hf")
