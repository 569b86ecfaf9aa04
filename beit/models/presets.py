"""Every model preset, in one explicit dict. Names follow the official code; no registry, no import magic.

`*_8k_vocab` (and other `*_vocab`) presets are the masked-image-modeling models used for pretraining:
shared relative-position table, mask token, `lm_head`, the official ±1σ truncated init. The others are
classifiers as fine-tuned: one rel-pos table per layer, mean pooling + `fc_norm`, head ×0.001 at init.
"""

_BASE = dict(embed_dim=768, depth=12, num_heads=12, init_values=0.1)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)
_TINY = dict(embed_dim=192, depth=12, num_heads=3, init_values=0.1)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6, init_values=0.1)

# Fine-tuning classifier (official `modeling_finetune.py`, timm `beit_*`).
_CLS = dict(num_classes=1000, use_rel_pos_bias=True, use_mean_pooling=True, init_trunc="abs")
# Pretraining MIM model (official `modeling_pretrain.py` as run by `run_beit_pretraining.py`).
_MIM = dict(num_classes=0, vocab_size=8192, use_shared_rel_pos_bias=True, use_mask_token=True,
            use_mean_pooling=False, init_trunc="sigma", drop_path_rate=0.1)

# Fashion-MNIST: 28 px images resized to 32, patch 4 -> an 8x8 grid, matching the shipped tokenizer
# (`fmnist_dvae`: 32 px, ÷4, 512 codes). Small enough to pretrain on a laptop CPU.
_FMNIST = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3, init_values=0.1)

PRESETS: dict[str, dict] = {
    "beit_tiny_patch16_224": {**_TINY, **_CLS, "drop_path_rate": 0.1},
    "beit_small_patch16_224": {**_SMALL, **_CLS, "drop_path_rate": 0.1},
    "beit_base_patch16_224": {**_BASE, **_CLS, "drop_path_rate": 0.1},
    "beit_base_patch16_384": {**_BASE, **_CLS, "img_size": 384, "drop_path_rate": 0.1},
    "beit_base_patch16_512": {**_BASE, **_CLS, "img_size": 512, "drop_path_rate": 0.1},
    "beit_large_patch16_224": {**_LARGE, **_CLS, "drop_path_rate": 0.2},
    "beit_large_patch16_384": {**_LARGE, **_CLS, "img_size": 384, "drop_path_rate": 0.2},
    "beit_large_patch16_512": {**_LARGE, **_CLS, "img_size": 512, "drop_path_rate": 0.2},
    "beit_tiny_patch16_224_8k_vocab": {**_TINY, **_MIM},
    "beit_small_patch16_224_8k_vocab": {**_SMALL, **_MIM},
    "beit_base_patch16_224_8k_vocab": {**_BASE, **_MIM},
    "beit_large_patch16_224_8k_vocab": {**_LARGE, **_MIM},
    "beit_fmnist_patch4_32": {**_FMNIST, **_CLS, "num_classes": 10, "drop_path_rate": 0.1},
    "beit_fmnist_patch4_32_512_vocab": {**_FMNIST, **_MIM, "vocab_size": 512},
}

# Semantic segmentation (BEiT + UperNet, `beit.models.segmentation.BeitSegmenter`): the backbone as fine-tuned
# (per-layer rel-pos tables) plus the head settings of the official ADE20K configs (microsoft/unilm
# `beit/semantic_segmentation/configs/beit/upernet/`); `out_indices` are 0-based block indices.
_SEG_BACKBONE = dict(use_rel_pos_bias=True, init_trunc="abs")
_UPERNET = dict(pool_scales=(1, 2, 3, 6), use_aux_head=True, aux_channels=256, aux_num_convs=1, aux_weight=0.4,
                dropout_ratio=0.1)

SEG_PRESETS: dict[str, dict] = {
    "beit_base_patch16_512_upernet": {**_BASE, **_SEG_BACKBONE, **_UPERNET, "img_size": 512, "num_classes": 150,
                                      "drop_path_rate": 0.1, "out_indices": (3, 5, 7, 11), "channels": 768},
    # (LayerScale init 1e-6 in the large ADE20K config; it only matters without a pretrained backbone.)
    "beit_large_patch16_640_upernet": {**_LARGE, **_SEG_BACKBONE, **_UPERNET, "img_size": 640, "num_classes": 150,
                                       "init_values": 1e-6, "drop_path_rate": 0.2, "out_indices": (7, 11, 15, 23),
                                       "channels": 1024},
    # fmnist_scenes: 64 px single-channel canvases, background + 10 garments. The Fashion-MNIST backbone
    # (32 px pretraining, 8x8 grid) at 64 px: 16x16 grid, rel-pos tables resized on load. Neck x2, x1, /2, /4
    # (maps 32, 16, 8, 4; the official patch-8 factors): the default strides 4..32 would leave the last block
    # a 2x2 map, and this neck gave +2.3 (pretrained) and +2.6 (scratch) mIoU at 450 steps
    # (docs/results/segmentation.md). Small head channels keep CPU training feasible.
    "beit_fmnist_patch4_64_upernet": {**_FMNIST, **_SEG_BACKBONE, **_UPERNET, "img_size": 64, "num_classes": 11,
                                      "drop_path_rate": 0.1, "out_indices": (1, 2, 3, 5), "channels": 96,
                                      "aux_channels": 64, "neck_scales": (2, 1, 0.5, 0.25)},
}

# Reference CNNs (`beit.models.cnn.SmallCNN`), trained from scratch by `beit study` beside the ViT arms.
CNN_PRESETS: dict[str, dict] = {
    "cnn_fmnist_32": dict(img_size=32, in_chans=1, num_classes=10),
}

# Reference segmentation CNNs (`beit.models.cnn.SmallUNet`): the `cnn` arm of a segmentation study.
SEG_CNN_PRESETS: dict[str, dict] = {
    "unet_fmnist_64": dict(img_size=64, in_chans=1, num_classes=11),
}
