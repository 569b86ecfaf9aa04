"""Model interface: exact parameter counts and the uniform backbone interface over every preset."""

import pytest
import torch

import beit.models.vit as vit
from beit.models import PRESETS, create_model


@pytest.fixture
def fast_init(monkeypatch):
    """Skip the (slow on CPU) truncated-normal init where only shapes or our own random values matter."""
    monkeypatch.setattr(vit, "trunc_normal_", lambda t, std, trunc: t)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts(fast_init):
    # Official pretraining log (unilm#383) and mmpretrain's metafile.
    assert n_params(create_model("beit_base_patch16_224_8k_vocab")) == 91_965_776
    assert n_params(create_model("beit_base_patch16_224", num_classes=1000)) == 86_530_984


def _small(name):
    """Keep each preset's structure (width, heads, grid kind, heads/pooling) but cut depth to 2."""
    return dict(depth=min(PRESETS[name]["depth"], 2))


@pytest.mark.parametrize("name", list(PRESETS))
def test_uniform_interface(name, fast_init):
    torch.manual_seed(0)
    cfg = PRESETS[name]
    model = create_model(name, **_small(name)).eval()
    size, chans, dim = cfg.get("img_size", 224), cfg.get("in_chans", 3), cfg["embed_dim"]
    grid = size // cfg.get("patch_size", 16)
    x = torch.randn(1, chans, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, grid * grid + 1, dim)
        out = model.forward_head(feats)
        n_cls = cfg.get("num_classes", 1000)
        assert out.shape == ((1, n_cls) if n_cls > 0 else (1, dim))
        assert model.forward_head(feats, pre_logits=True).shape == (1, dim)
        mask = torch.zeros(1, grid * grid, dtype=torch.bool)
        mask[0, ::3] = True
        if cfg.get("vocab_size"):
            assert model.forward_mim(x, mask).shape == (int(mask.sum()), cfg["vocab_size"])
        else:
            with pytest.raises(ValueError, match="lm_head"):
                model.forward_mim(x, mask)

    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    depth = model.depth
    for pname, _ in model.named_parameters():
        assert 0 <= model.layer_id(pname) <= depth + 1, pname
    assert model.layer_id("cls_token") == 0
    assert model.layer_id("blocks.0.attn.qkv.weight") == 1
    assert model.layer_id(f"blocks.{depth - 1}.mlp.fc2.bias") == depth


@pytest.mark.parametrize("name", list(PRESETS))
def test_grad_checkpointing_same_output_and_grads(name, fast_init, monkeypatch):
    # Checkpointing is observed to run (once per block per forward), not only to leave the numbers alone.
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(vit, "checkpoint", counted)
    # Small images keep the backward cheap; the structure (shared/per-layer tables, pooling) is the preset's.
    cfg = PRESETS[name]
    patch = cfg.get("patch_size", 16)
    # Narrow too (16 per head, the preset's head count): equivalence is about structure, not width.
    model = create_model(name, **_small(name), img_size=4 * patch, embed_dim=16 * cfg["num_heads"],
                         drop_path_rate=0.0)
    with torch.no_grad():  # random everything, so no zero-initialised table hides a difference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()  # checkpointing is only active in training
    x = torch.randn(2, cfg.get("in_chans", 3), 4 * patch, 4 * patch)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True

    def run(enable):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        out = model(x, mask) if cfg.get("vocab_size") else model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_off, g_off = run(False)
    assert not calls
    out_on, g_on = run(True)
    assert len(calls) == len(model.blocks) > 0
    assert torch.allclose(out_off, out_on, atol=1e-6, rtol=1e-5)
    assert g_off.keys() == g_on.keys() and len(g_off) > 0
    for n in g_off:
        assert torch.allclose(g_off[n], g_on[n], atol=1e-6, rtol=1e-4), n


def test_per_block_compile_does_not_recompile_per_drop_path_rate():
    """12 blocks with 12 drop-path rates, compiled block by block (as train.compile does): one graph for the
    rate-0 block and one shared by the rest, not one per rate (dynamo stops recompiling at 8)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from beit.models.vit import Block

    torch._dynamo.reset()
    counters.clear()
    blocks = [Block(32, 2, 4.0, True, 0.0, 0.0, 0.01 * i, 0.1, (4, 4), 1e-6) for i in range(12)]
    x = torch.randn(2, 17, 32)
    for b in blocks:
        b.compile(backend="eager")
        x = b(x)
    assert counters["stats"]["unique_graphs"] == 2
    assert x.isfinite().all()
    torch._dynamo.reset()


def _reference_loop(model, x, mask=None):
    """embed, then the blocks one after another, written out here: every block's output [B, N+1, D] and every
    block's attention probabilities [B, H, N+1, N+1], what each consumer of the block loop must give bit for bit."""
    tokens = model.embed(x, mask)
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    outs, attns = [], []
    for blk in model.blocks:
        attns.append(blk.attn.attention_probs(blk.norm1(tokens), shared))
        tokens = blk(tokens, shared)
        outs.append(tokens)
    return outs, attns


@pytest.mark.parametrize("name", ["beit_fmnist_patch4_32", "beit_fmnist_patch4_32_512_vocab"])
def test_every_consumer_of_the_block_loop_is_bitwise_the_plain_loop(name, fast_init):
    """Features, MIM logits, every block's output (linear probe), the segmenter's neck input and the attention
    maps all run the blocks the same way: per-layer tables (classifier) and the shared table (MIM)."""
    from beit.attention import last_block_attention
    from beit.models.segmentation import BeitSegmenter

    torch.manual_seed(0)
    model = create_model(name, depth=3, embed_dim=32, num_heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-initialised tables would hide a missing bias
        x = torch.randn(2, 1, 32, 32)
        mask = torch.zeros(2, 64, dtype=torch.bool)
        mask[:, ::3] = True
        outs, attns = _reference_loop(model, x)
        assert torch.equal(model.forward_features(x), model.norm(outs[-1]))
        assert all(torch.equal(a, b) for a, b in zip(model.get_intermediate_layers(x), outs, strict=True))
        assert torch.equal(last_block_attention(model, x), attns[-1])
        if model.lm_head is not None:
            masked, _ = _reference_loop(model, x, mask)
            assert torch.equal(model.forward_mim(x, mask), model.lm_head(model.norm(masked[-1])[:, 1:][mask]))

        seg = BeitSegmenter(num_classes=3, out_indices=(0, 1, 2, 3), channels=16, neck_scales=(1, 1, 1, 1), depth=5,
                            img_size=32, patch_size=4, in_chans=1, embed_dim=32, num_heads=2,
                            use_rel_pos_bias=True).eval()
        for p in seg.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        outs, _ = _reference_loop(seg.backbone, x)
        maps = [t[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8) for t in outs[:4]]  # drop cls: [B, D, gh, gw]
        assert all(torch.equal(a, b) for a, b in zip(seg.features(x), seg.neck(maps), strict=True))
