"""CMA-CLIP: CLIP encoders, sequence-wise attention, per-task modality-wise attention and heads.

Parameters fall into three groups that the training stages freeze and unfreeze as a whole:
`encoders` (the open_clip towers), `fusion` (projections to the fusion width, modality-type
embeddings, sequence-wise attention) and `tasks` (each task's modality-wise attention query and
MLP head).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cmaclip.config import ModelConfig
from cmaclip.model.attention import ModalityAttention, SequenceAttention, TaskHead
from cmaclip.model.encoders import ClipEncoders, create_clip

logger = logging.getLogger(__name__)

# Which parameter groups each stage trains; everything else is frozen.
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "contrastive": ("encoders",),
    "warmup": ("fusion", "tasks"),
    "end_to_end": ("encoders", "fusion", "tasks"),
    "tuning": ("tasks",),
}


@dataclass
class CMAOutput:
    logits: dict[str, torch.Tensor]  # task -> [B, C_task]
    image_weight: torch.Tensor  # [B, K], lambda_I per task
    image_embedding: torch.Tensor  # [B, W], I
    text_embedding: torch.Tensor  # [B, W], T


class _Fusion(nn.Module):
    """Everything between the encoders and the task heads that is shared by all tasks."""

    def __init__(self, config: ModelConfig, embed_dim: int):
        super().__init__()
        width = config.width
        self.image_proj = nn.Identity() if embed_dim == width else nn.Linear(embed_dim, width)
        self.text_proj = nn.Identity() if embed_dim == width else nn.Linear(embed_dim, width)

        self.sequence: SequenceAttention | None = None
        if config.sequence_attention:
            self.modality_embedding = nn.Parameter(torch.randn(2, width) * 0.02)
            self.sequence = SequenceAttention(
                width=width, layers=config.layers, heads=config.heads, dropout=config.dropout
            )


class CMACLIP(nn.Module):
    """The whole classifier. `forward(images, text)` returns a `CMAOutput`."""

    def __init__(self, config: ModelConfig, tasks: dict[str, list[str]], clip=None):
        super().__init__()
        self.config = config
        self.task_names = list(tasks)
        self.classes = {task: list(names) for task, names in tasks.items()}

        if clip is None:
            clip = create_clip(
                config.clip.name,
                pretrained=config.clip.pretrained,
                image_size=config.clip.image_size,
                context_length=config.clip.context_length,
            )
        self.encoders = ClipEncoders(clip)
        self.fusion = _Fusion(config, self.encoders.embed_dim)

        self.modality = ModalityAttention(
            width=config.width, num_tasks=len(tasks), enabled=config.modality_attention
        )
        self.heads = nn.ModuleDict(
            {
                task: TaskHead(
                    width=config.width,
                    hidden=config.head.hidden,
                    depth=config.head.depth,
                    dropout=config.head.dropout,
                    num_classes=len(names),
                )
                for task, names in tasks.items()
            }
        )
        self._frozen: list[nn.Module] = []

    # -- forward -----------------------------------------------------------------------------

    def embed(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global image and text embeddings I and T, each [B, W]."""
        image = self.encoders.encode_image(images)
        title = self.encoders.encode_text(text)
        fusion = self.fusion

        if fusion.sequence is None:
            return fusion.image_proj(image.features), fusion.text_proj(title.features)
        return self.fuse(image.tokens, title.tokens, title.padding_mask, title.eot_index)

    def fuse(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_padding: torch.Tensor,
        eot_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """I and T from the encoders' token sequences, e.g. ones read back from a cache.

        `image_tokens` is [B, 1 + P, D] (class token first), `text_tokens` [B, L, D] with its
        padding mask [B, L]; L may be shorter than the context as long as it keeps every
        unpadded token, since padding is masked out anyway.
        """
        fusion = self.fusion
        if fusion.sequence is None:
            rows = torch.arange(len(eot_index), device=eot_index.device)
            # the class token and the end-of-text token are CLIP's pooled features
            return fusion.image_proj(image_tokens[:, 0]), fusion.text_proj(
                text_tokens[rows, eot_index]
            )

        image_tokens, text_tokens = self._fusion_tokens(image_tokens, text_tokens)
        return fusion.sequence(image_tokens, text_tokens, text_padding, eot_index)

    def _fusion_tokens(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens projected to the fusion width, each with its modality embedding."""
        fusion = self.fusion
        image_tokens = fusion.image_proj(image_tokens) + fusion.modality_embedding[0]
        text_tokens = fusion.text_proj(text_tokens) + fusion.modality_embedding[1]
        return image_tokens, text_tokens  # [B, 1 + P, W], [B, L, W]

    def attention_maps(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[list[torch.Tensor], int]:
        """Sequence-wise attention per layer ([B, S, S], heads averaged) and the image length.

        Positions 0 .. image_len - 1 of the joint sequence are the image tokens (class token
        first, then the patches row by row); the text tokens follow.
        """
        fusion = self.fusion
        if fusion.sequence is None:
            raise ValueError(
                "this model has no sequence-wise attention (model.sequence_attention: false), "
                "so there is no attention between text tokens and image patches to show"
            )
        image = self.encoders.encode_image(images)
        title = self.encoders.encode_text(text)
        image_tokens, text_tokens = self._fusion_tokens(image.tokens, title.tokens)
        maps, _ = fusion.sequence.attention_maps(image_tokens, text_tokens, title.padding_mask)
        return maps, image_tokens.shape[1]

    def frozen_outputs(
        self, images: torch.Tensor, text: torch.Tensor, level: str
    ) -> dict[str, torch.Tensor]:
        """What a cache keeps of a batch: encoder tokens (`tokens`) or I and T (`globals`)."""
        if level == "globals":
            image_embedding, text_embedding = self.embed(images, text)
            return {"image_embedding": image_embedding, "text_embedding": text_embedding}
        if level != "tokens":
            raise ValueError(f"unknown cache level {level!r}; levels are tokens, globals")
        image = self.encoders.encode_image(images)
        title = self.encoders.encode_text(text)
        return {
            "image_tokens": image.tokens,
            "text_tokens": title.tokens,
            "text_padding": title.padding_mask,
            "eot_index": title.eot_index,
        }

    def classify(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> CMAOutput:
        """Per-task modality-wise attention and heads on given I and T."""
        fused, image_weight = self.modality(image_embedding, text_embedding)  # [B, K, W], [B, K]
        logits = {task: self.heads[task](fused[:, k]) for k, task in enumerate(self.task_names)}
        return CMAOutput(logits, image_weight, image_embedding, text_embedding)

    def forward(
        self,
        images: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        *,
        contrastive: bool = False,
        cached: Mapping[str, torch.Tensor] | None = None,
    ):
        """A `CMAOutput`, or with `contrastive=True` CLIP's (image, text, scale) for its loss.

        With `cached`, the encoders are skipped: it holds either the token sequences of
        `frozen_outputs(..., "tokens")` or I and T of `frozen_outputs(..., "globals")`.
        The contrastive and cached paths go through `forward` too, so that DDP sees them and
        synchronises the gradients of what they train.
        """
        if cached is not None:
            if "image_embedding" in cached:
                return self.classify(cached["image_embedding"], cached["text_embedding"])
            return self.classify(
                *self.fuse(
                    cached["image_tokens"],
                    cached["text_tokens"],
                    cached["text_padding"],
                    cached["eot_index"],
                )
            )
        if contrastive:
            return self.encoders.contrastive_features(images, text)
        return self.classify(*self.embed(images, text))

    # -- stages ------------------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        return {
            "encoders": [self.encoders],
            "fusion": [self.fusion],
            "tasks": [self.modality, self.heads],
        }

    def set_stage(self, stage: str) -> list[nn.Parameter]:
        """Freeze what `stage` does not train and return the parameters it does train.

        Frozen modules get `requires_grad=False` and stay in eval mode (no dropout), so they
        receive no gradient, hold no optimizer state and keep their weights.
        """
        if stage not in STAGE_GROUPS:
            raise ValueError(f"unknown stage {stage!r}; stages are {list(STAGE_GROUPS)}")
        trained = STAGE_GROUPS[stage]

        self._frozen = []
        for group, modules in self.parameter_groups().items():
            for module in modules:
                module.requires_grad_(group in trained)
                if group not in trained:
                    self._frozen.append(module)

        # CLIP's temperature only matters to the contrastive loss
        self.encoders.clip.logit_scale.requires_grad_(stage == "contrastive")
        if self.encoders.clip.logit_bias is not None:
            self.encoders.clip.logit_bias.requires_grad_(stage == "contrastive")

        self.train(self.training)
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> CMACLIP:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
