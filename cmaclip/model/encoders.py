"""The CLIP image and text encoders, from open_clip, opened up to return every token.

CMA-CLIP needs per-token embeddings (image patches plus the class token, and every text token),
not only CLIP's pooled features. open_clip's vision tower returns its patch tokens when asked;
the text tower of the standard `CLIP` class only returns the pooled end-of-text feature, so the
text path here repeats `CLIP.encode_text` step by step and keeps the whole sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

logger = logging.getLogger(__name__)

_CONFIGS_REGISTERED = False


def register_model_configs() -> None:
    """Make the project's own open_clip architectures (e.g. `cmaclip-tiny`) known by name."""
    global _CONFIGS_REGISTERED
    if not _CONFIGS_REGISTERED:
        open_clip.add_model_config(Path(str(resources.files(__package__) / "open_clip_configs")))
        _CONFIGS_REGISTERED = True


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}


def create_clip(
    name: str,
    *,
    pretrained: str | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
) -> open_clip.CLIP:
    """Build an open_clip model by name, from a pretrained tag, a local file or from scratch."""
    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(
            f"model.clip.name: unknown open_clip architecture {name!r}; "
            f"try one of cmaclip-tiny, ViT-B-32, ViT-B-16 (open_clip.list_models() lists all)"
        )
    if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"model.clip.pretrained: no checkpoint file at {pretrained}")

    # open_clip logs each creation step on the root logger, and warns when no weights are
    # loaded; here that is the normal case (weights follow from a checkpoint or training)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING if not pretrained else logging.INFO)
    try:
        clip = open_clip.create_model(
            name,
            pretrained=pretrained or None,
            force_image_size=image_size,
            force_context_length=context_length,
            output_dict=True,
        )
    finally:
        logging.disable(previous)
    logger.debug("open_clip %s created (pretrained: %s)", name, pretrained or "none")
    if not isinstance(clip, open_clip.CLIP):
        # Limitation: only the standard CLIP class exposes its text tower's layers the way
        # `text_tokens` reads them; CoCa and custom-text (Hugging Face) towers are refused.
        raise ValueError(f"model.clip.name: {name!r} is not a standard open_clip CLIP model")
    return clip


@dataclass
class ImageTokens:
    tokens: torch.Tensor  # [B, 1 + P, D]: projected class token first, then the patch tokens
    features: torch.Tensor  # [B, D]: CLIP's pooled image embedding (the projected class token)


@dataclass
class TextTokens:
    tokens: torch.Tensor  # [B, L, D]: projected text tokens
    features: torch.Tensor  # [B, D]: CLIP's pooled text embedding (at the end-of-text token)
    eot_index: torch.Tensor  # [B]: position of the end-of-text token
    padding_mask: torch.Tensor  # [B, L]: True where the token is padding


class ClipEncoders(nn.Module):
    """open_clip's two towers, returning token sequences in CLIP's shared embedding space."""

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        self.clip = clip
        self.clip.visual.output_tokens = True
        self.embed_dim = int(clip.text_projection.shape[-1])
        self.context_length = int(clip.context_length)

        image_size = clip.visual.image_size
        self.image_size = int(image_size[0] if isinstance(image_size, tuple) else image_size)

    def encode_image(self, images: torch.Tensor) -> ImageTokens:
        features, patches = self.clip.visual(images)  # [B, D], [B, P, W]
        if self.clip.visual.proj is not None:
            patches = patches @ self.clip.visual.proj  # [B, P, W] -> [B, P, D]
        tokens = torch.cat([features.unsqueeze(1), patches], dim=1)  # [B, 1 + P, D]
        return ImageTokens(tokens=tokens, features=features)

    def encode_text(self, text: torch.Tensor) -> TextTokens:
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()

        x = clip.token_embedding(text).to(cast_dtype)  # [B, L, W]
        x = x + clip.positional_embedding.to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)

        features = text_global_pool(x, text, clip.text_pool_type, eos_token_id=clip.text_eos_id)
        if isinstance(clip.text_projection, nn.Linear):
            tokens, features = clip.text_projection(x), clip.text_projection(features)
        else:
            tokens, features = x @ clip.text_projection, features @ clip.text_projection

        # open_clip pads with id 0 after the end-of-text token, which has the largest id
        eot_index = text.argmax(dim=-1)
        return TextTokens(tokens, features, eot_index, padding_mask=text == 0)

    def contrastive_features(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the logit scale, as CLIP's loss wants them."""
        image = F.normalize(self.encode_image(images).features, dim=-1)
        text_features = F.normalize(self.encode_text(text).features, dim=-1)
        return image, text_features, self.clip.logit_scale.exp()
