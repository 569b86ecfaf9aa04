"""BEiT: BERT pre-training of image transformers.

Importing this package has no side effects; the public entry points import lazily.
"""

__version__ = "0.1.0"


def create_model(name, pretrained=None, **overrides):
    """Build a preset by name (see `beit.models.presets.PRESETS`); `pretrained=PATH` loads any supported layout."""
    from beit.builders import create_model as _create

    return _create(name, pretrained=pretrained, **overrides)


def create_tokenizer(name_or_path, weights=None, **overrides):
    """Build a frozen visual tokenizer (DALL-E dVAE, or one trained with `beit tokenizer train`)."""
    from beit.builders import create_tokenizer as _create

    return _create(name_or_path, weights=weights, **overrides)


def load(source, **model_overrides):
    """The model a checkpoint holds, built from its stored config: a run directory, a ckpt-*.pt / best.pt, a
    folder written by `beit export`, a shipped name ("fmnist-classifier") or any supported layout."""
    from beit.hub import load as _load

    return _load(source, **model_overrides)
