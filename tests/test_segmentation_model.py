"""BEiT + UperNet segmenter: shapes, layer decay, pretrained backbones, and checkpoint parity with HF
`BeitForSemanticSegmentation` and the official mmseg (unilm ADE20K) key layout.

Every parity test randomises every parameter *and* BatchNorm running statistics (zero means and unit
variances would hide a swapped BN), on tiny non-preset configs whose `out_indices` are not the defaults.
"""

import json
import re

import pytest
import torch

import beit.models.vit as vit
from beit.cli import main as cli_main
from beit.convert.resize import resize_rel_pos_table
from beit.convert.segmentation import (
    blocks_from_hf_out_indices,
    hf_out_indices,
    save_segmenter_as,
    segmenter_from_hf,
)
from beit.convert import load_pretrained, to_official
from beit.builders import create_model, create_segmenter
from beit.convert.segmentation import load_pretrained_backbone
from beit.models.segmentation import BeitSegmenter, upsample_logits

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
    monkeypatch.setattr(vit, "trunc_normal_", lambda t, std, trunc: t)


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            is_norm_weight = re.search(r"(norm\w*|bn|\.1)\.weight$", name) is not None and p.ndim == 1
            p.copy_(noise + 1.0 if is_norm_weight else noise)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def assert_close(a, b):
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5 * a.abs().max().item(), f"max abs diff {diff} vs max |logit| {a.abs().max().item()}"


def assert_same_tensors(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


TINY = dict(img_size=64, patch_size=16, in_chans=3, embed_dim=32, depth=6, num_heads=2, mlp_ratio=2.0,
            use_rel_pos_bias=True, init_values=0.1, drop_path_rate=0.0, num_classes=5, channels=32,
            aux_channels=16)


def tiny_hf(out_indices, seed=0, **kw):
    cfg = transformers.BeitConfig(image_size=64, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=6,
                                  num_attention_heads=2, intermediate_size=64, use_relative_position_bias=True,
                                  out_indices=out_indices, num_labels=5, auxiliary_channels=16, layer_norm_eps=1e-6,
                                  drop_path_rate=0.0, **kw)
    return randomize_(transformers.BeitForSemanticSegmentation(cfg), seed)


# ------------------------------------------------------------------------------------------------ model
def test_fmnist_preset_shapes_and_upsample():
    model = create_segmenter("beit_fmnist_patch4_64_upernet").eval()
    assert (model.num_classes, model.img_size, model.in_chans, model.aux_weight) == (11, 64, 1, 0.4)
    assert model.backbone.grid == (16, 16) and model.backbone.blocks[0].attn.relative_position_bias_table is not None
    x = torch.randn(2, 1, 64, 64)
    logits, aux = model.forward_train(x)
    assert logits.shape == (2, 11, 32, 32) and aux.shape == (2, 11, 8, 8)  # neck x2, x1, /2, /4 of the 16x16 grid
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_train(x)[0])
    up = upsample_logits(logits, (64, 64))
    assert up.shape == (2, 11, 64, 64)
    ref = torch.nn.functional.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(up, ref)
    assert create_segmenter("beit_fmnist_patch4_64_upernet", use_aux_head=False).forward_train(x)[1] is None
    with pytest.raises(KeyError, match="create_segmenter"):
        create_model("beit_fmnist_patch4_64_upernet")
    with pytest.raises(ValueError, match="out_indices"):
        create_segmenter("beit_fmnist_patch4_64_upernet", out_indices=(1, 2, 3, 6))


def test_reference_unet_segments_at_full_resolution_and_refuses_a_backbone():
    """The segmentation study's reference CNN: logits [B, K, S, S] from the segmenter interface, its own
    checkpoints only (a ViT backbone is a config error), and no ViT keys."""
    from beit.config import ConfigError, load_config
    from beit.train.segment import build_segmenter

    model = create_segmenter("unet_fmnist_64").eval()
    assert (model.num_classes, model.img_size, model.in_chans) == (11, 64, 1)
    assert 400_000 < sum(p.numel() for p in model.parameters()) < 500_000  # "0.47M parameters" in the docs
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, aux = model.forward_train(x)
        assert logits.shape == (2, 11, 64, 64) and aux is None and torch.equal(model(x), logits)
    with pytest.raises(ValueError, match="model.drop_path_rate=null"):
        create_segmenter("unet_fmnist_64", drop_path_rate=0.1)
    with pytest.raises(KeyError, match="create_segmenter"):
        create_model("unet_fmnist_64")
    cfg = load_config("configs/segment/fmnist_scenes.yaml", ["model.name=unet_fmnist_64", "model.drop_path_rate=null",
                      "model.pretrained=beit/assets/fmnist_backbone.safetensors"], command="segment")
    with pytest.raises(ConfigError, match="CNN trained from scratch: set model.pretrained=null"):
        build_segmenter(cfg, 11)


def test_patch16_neck_strides_and_layer_decay_groups():
    from beit.config import OptimConfig
    from beit.train.loop import param_groups

    model = BeitSegmenter(**TINY, out_indices=(1, 2, 4, 5))
    maps = model.features(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    other = BeitSegmenter(**TINY, out_indices=(1, 2, 4, 5), neck_scales=(4, 1, 1, 0.25))  # not a pyramid: allowed
    assert [m.shape[-1] for m in other.features(torch.randn(1, 3, 64, 64))] == [16, 4, 4, 1]
    assert other.forward_train(torch.randn(2, 3, 64, 64))[1].shape[-1] == 4  # aux head on the 3rd map
    with pytest.raises(ValueError, match=r"neck_scales must be 4 factors .* got \[3, 1, 1, 1\]"):
        BeitSegmenter(**TINY, out_indices=(1, 2, 4, 5), neck_scales=(3, 1, 1, 1))
    with pytest.raises(ValueError, match="patch_size 16, 8 or 4, got 32"):
        BeitSegmenter(**{**TINY, "patch_size": 32}, out_indices=(1, 2, 4, 5))
    groups = param_groups(model, OptimConfig(layer_decay=0.65))
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["backbone.cls_token"]["lr_scale"] == pytest.approx(0.65 ** 7)
    # decayed, as by the official segmentation constructor (its no-decay names lack the "backbone." prefix)
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.05
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** 4)
    for name in ("neck.fpn1.0.weight", "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight"):
        assert by_name[name]["lr_scale"] == 1.0, name
    assert by_name["decode_head.bottleneck.bn.weight"]["weight_decay"] == 0.0
    # head_lr_scale multiplies only what sits above the backbone, with or without layer decay
    for decay, block_scale in ((0.65, 0.65 ** 4), (None, 1.0)):
        scaled = {n: g["lr_scale"] for g in param_groups(model, OptimConfig(layer_decay=decay, head_lr_scale=10))
                  for n in g["param_names"]}
        assert scaled["backbone.blocks.2.attn.qkv.weight"] == pytest.approx(block_scale)
        for name in ("neck.fpn1.0.weight", "decode_head.conv_seg.bias", "auxiliary_head.convs.0.conv.weight"):
            assert scaled[name] == 10.0, name


def test_pretrained_mim_run_dir_into_64px_segmenter(tmp_path):
    """The project's Fashion-MNIST MIM model (32 px, shared table, 8x8 grid) -> the 64 px segmenter (16x16)."""
    mim = randomize_(create_model("beit_fmnist_patch4_32_512_vocab"))
    run = tmp_path / "runs" / "pretrain"
    run.mkdir(parents=True)
    torch.save({"model": mim.state_dict(), "step": 10}, run / "ckpt-00000010.pt")
    seg = create_segmenter("beit_fmnist_patch4_64_upernet")
    head_before = seg.decode_head.conv_seg.weight.clone()
    report = load_pretrained_backbone(seg, str(run))
    assert report.expanded_shared_rel_pos and len(report.resized) == 6
    assert sorted(report.unexpected) == ["lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"]
    assert not report.missing
    shared = mim.state_dict()["rel_pos_bias.relative_position_bias_table"]
    want = resize_rel_pos_table(shared, (16, 16))
    for blk in seg.backbone.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table.detach(), want)
    assert torch.equal(seg.backbone.blocks[3].mlp.fc1.weight, mim.blocks[3].mlp.fc1.weight)
    assert torch.equal(seg.decode_head.conv_seg.weight, head_before)  # heads untouched
    # ...so the backbone computes, block by block, what the MIM model resized to 64 px computes
    from beit.convert import load_pretrained

    mim64 = create_model("beit_fmnist_patch4_32_512_vocab", img_size=64).eval()
    load_pretrained(mim64, str(run / "ckpt-00000010.pt"))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        pairs = zip(mim64.get_intermediate_layers(x), seg.backbone.eval().get_intermediate_layers(x))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in pairs)
    # create_segmenter(pretrained=...) goes through the same loader
    again = create_segmenter("beit_fmnist_patch4_64_upernet", pretrained=str(run))
    assert torch.equal(again.backbone.blocks[5].attn.relative_position_bias_table.detach(), want)


# ------------------------------------------------------------------------------------------------ HF
def test_hf_out_indices_convention():
    # HF reads hidden_states[i - 1]; hidden_states[0] is the embedding output, so HF index i is block i - 2.
    assert blocks_from_hf_out_indices([3, 5, 7, 11], 12) == [1, 3, 5, 9]
    assert blocks_from_hf_out_indices([7, 11, 15, 23], 24) == [5, 9, 13, 21]
    assert blocks_from_hf_out_indices([5, 7, 9, -1], 12) == [3, 5, 7, 10]
    assert hf_out_indices([3, 5, 7, 10], 12) == ([5, 7, 9, 12], 0)
    assert hf_out_indices([3, 5, 7, 11], 12) == ([5, 7, 9, 13], 1)  # the last block needs one identity layer
    with pytest.raises(ValueError, match="embedding output"):
        blocks_from_hf_out_indices([1, 3, 5, 7], 12)
    # ...checked against HF itself: the features its neck receives are those hidden states.
    hf = tiny_hf([2, 3, 5, 6])
    seen = []
    hf.fpn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hidden = hf.beit(x, output_hidden_states=True).hidden_states
        hf(pixel_values=x)
    for feat, block in zip(seen[0], blocks_from_hf_out_indices([2, 3, 5, 6], 6)):
        assert torch.equal(feat, hidden[block + 1][:, 1:].transpose(1, 2).reshape(1, 32, 4, 4))


def test_hf_folder_in_exact_logits(tmp_path, caplog):
    hf = tiny_hf([2, 3, 5, 6], seed=1)
    hf.save_pretrained(tmp_path / "hf")
    ours = segmenter_from_hf(tmp_path / "hf").eval()
    assert ours.out_indices == [0, 1, 3, 4] and ours.depth == 6
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(hf(pixel_values=x).logits, ours(x))
    # transformers-5 in-memory names load as well
    fresh = randomize_(BeitSegmenter(**TINY, out_indices=(0, 1, 3, 4)), seed=9)
    report = load_pretrained_backbone(fresh, hf.state_dict())
    assert report.layout == "hf" and not report.missing and not report.unexpected and not report.dropped
    assert_same_tensors(fresh.state_dict(), ours.state_dict())
    # a model whose out_indices disagree with the HF config is refused, naming both
    with pytest.raises(ValueError, match=r"read blocks \[0, 1, 3, 4\].*\[1, 2, 4, 5\]"):
        load_pretrained_backbone(BeitSegmenter(**TINY, out_indices=(1, 2, 4, 5)), tmp_path / "hf")


@pytest.mark.parametrize("out_indices", [(0, 2, 3, 5), (1, 2, 3, 4)])
def test_to_hf_with_cli_round_trip_exact(tmp_path, out_indices):
    ours = randomize_(BeitSegmenter(**TINY, out_indices=out_indices), seed=2)
    if out_indices[-1] == 5:  # a bare state dict: the indices come from the command line
        torch.save({"model": ours.state_dict()}, tmp_path / "seg.pth")
        extra = ["--out-indices", ",".join(map(str, out_indices))]
    else:  # a training checkpoint: from the model config it carries
        config = {"model": {"name": "beit_base_patch16_512_upernet", "out_indices": list(out_indices), "depth": 6}}
        torch.save({"model": ours.state_dict(), "config": config, "step": 5}, tmp_path / "seg.pth")
        extra = []
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", str(tmp_path / "seg.pth"), str(tmp_path / "hf"), "--to", "hf", *extra])
    assert exit_.value.code == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["BeitForSemanticSegmentation"] and cfg["layer_norm_eps"] == 1e-6
    hf, info = transformers.BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert cfg["num_hidden_layers"] == (7 if out_indices[-1] == 5 else 6)  # +1 identity layer for the last block
    hf.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(ours(x), hf(pixel_values=x).logits)
    # ...and back: HF folder -> ours, bit-identical (the identity layer is dropped)
    report = load_pretrained_backbone(BeitSegmenter(**TINY, out_indices=out_indices), tmp_path / "hf")
    assert sorted({k.split(".")[2] for k in report.dropped}) == (["6"] if out_indices[-1] == 5 else [])
    back = segmenter_from_hf(tmp_path / "hf")
    assert back.out_indices == list(out_indices)
    assert_same_tensors(back.state_dict(), ours.state_dict())
    # the generic loader takes a segmenter too
    again = BeitSegmenter(**TINY, out_indices=out_indices)
    assert load_pretrained(again, tmp_path / "seg.pth").layout == "ours"
    assert_same_tensors(again.state_dict(), ours.state_dict())


def test_to_hf_refuses_what_hf_cannot_express(tmp_path):
    small = create_segmenter("beit_fmnist_patch4_64_upernet")  # patch 4 neck, channels 96 != 192
    with pytest.raises(ValueError, match="not representable in HF"):
        save_segmenter_as(small.state_dict(), tmp_path / "hf", "hf", {"out_indices": [1, 2, 3, 5]})
    ours = BeitSegmenter(**TINY, out_indices=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="--out-indices"):
        save_segmenter_as(ours.state_dict(), tmp_path / "hf", "hf")


# ------------------------------------------------------------------------------------------------ mmseg
def _official_head_keys(num_convs_aux=1):
    """The official ADE20K checkpoint's non-backbone keys (unilm BEiT backbone fpn1..4, mmseg 0.x UPerHead and
    FCNHead with ConvModule `conv`/`bn`), written out from those modules, not from our code."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["backbone.fpn1.0.weight", "backbone.fpn1.0.bias", *[f"backbone.fpn1.1.{b}" for b in bn],
            "backbone.fpn1.3.weight", "backbone.fpn1.3.bias", "backbone.fpn2.0.weight", "backbone.fpn2.0.bias"]
    convs = [f"psp_modules.{i}.1" for i in range(4)] + ["bottleneck", "fpn_bottleneck"]
    convs += [f"lateral_convs.{i}" for i in range(3)] + [f"fpn_convs.{i}" for i in range(3)]
    for c in convs:
        keys += [f"decode_head.{c}.conv.weight", *[f"decode_head.{c}.bn.{b}" for b in bn]]
    keys += ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    for i in range(num_convs_aux):
        keys += [f"auxiliary_head.convs.{i}.conv.weight", *[f"auxiliary_head.convs.{i}.bn.{b}" for b in bn]]
    return keys + ["auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"]


def test_official_mmseg_layout_in_and_out(tmp_path):
    """An official-layout file built from an HF model's weights (HF hub names -> official names, the way HF's
    converter maps them, in reverse) loads into ours with HF's logits; `--to official` writes the same keys."""
    hf = tiny_hf([3, 4, 5, 6], seed=3)  # blocks 1, 2, 3, 4
    hf.save_pretrained(tmp_path / "hf")
    from beit.convert import read_checkpoint

    hub = read_checkpoint(tmp_path / "hf")
    backbone = to_official({k: v for k, v in hub.items() if k.startswith("beit.")}, "hf")
    official = {f"backbone.{k}": v for k, v in backbone.items()}
    for k, v in hub.items():
        if not k.startswith("beit."):
            k = re.sub(r"^(fpn\d)", r"backbone.\1", k).replace("classifier", "conv_seg")
            official[k] = v
    for i in range(6):  # released files carry the index buffers too
        official[f"backbone.blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    assert set(_official_head_keys()) <= set(official)
    torch.save({"meta": {"iter": 160000}, "state_dict": official}, tmp_path / "upernet_beit.pth")

    ours = BeitSegmenter(**TINY, out_indices=(1, 2, 3, 4))
    report = load_pretrained_backbone(ours, tmp_path / "upernet_beit.pth")
    assert report.layout == "mmseg" and not report.missing and not report.unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(hf(pixel_values=x).logits, ours.eval()(x))

    with pytest.raises(SystemExit):
        cli_main(["convert", str(tmp_path / "upernet_beit.pth"), str(tmp_path / "back.pth"), "--to", "official"])
    written = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    want = {k: v for k, v in official.items() if not k.endswith("relative_position_index")}
    assert_same_tensors(written, want)


def test_base_ade20k_preset_hf_config():
    """The official base ADE20K preset as an HF config: HF indices block + 2, one identity layer for block 11."""
    from beit.convert.segmentation import hf_seg_config

    model = create_segmenter("beit_base_patch16_512_upernet")
    assert (model.out_indices, model.channels, model.num_classes, model.img_size) == ([3, 5, 7, 11], 768, 150, 512)
    cfg = hf_seg_config(model.state_dict(), {"out_indices": model.out_indices})
    assert cfg["out_indices"] == [5, 7, 9, 13] and cfg["num_hidden_layers"] == 13
    assert cfg["beit_identity_layers"] == 1 and cfg["image_size"] == 512 and cfg["auxiliary_channels"] == 256
    assert transformers.BeitConfig(**cfg).out_indices == [5, 7, 9, 13]  # HF accepts it


def test_mmseg1_layout_in():
    """mmsegmentation 1.x's BEiT port: OpenMMLab backbone names and a Feature2Pyramid neck."""
    from beit.convert import from_official

    ours = randomize_(BeitSegmenter(**TINY, out_indices=(1, 2, 3, 5)), seed=4)
    sd = ours.state_dict()
    mm = from_official({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}, "mmpretrain")
    assert "backbone.layers.0.ffn.layers.0.0.weight" in mm
    for k, v in sd.items():
        if not k.startswith("backbone."):
            k = k.replace("neck.fpn1.", "neck.upsample_4x.").replace("neck.fpn2.", "neck.upsample_2x.")
            mm[k] = v
    assert "neck.upsample_4x.1.running_var" in mm and "neck.upsample_2x.0.weight" in mm
    fresh = BeitSegmenter(**TINY, out_indices=(1, 2, 3, 5))
    report = load_pretrained_backbone(fresh, {"state_dict": mm, "meta": {}})
    assert report.layout == "mmseg1" and not report.missing and not report.unexpected
    assert_same_tensors(fresh.state_dict(), sd)
