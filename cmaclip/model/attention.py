"""The two attention modules that make CLIP into CMA-CLIP.

Sequence-wise attention lets every text token look at every image patch (and back) before the
two global embeddings are read out. Modality-wise attention then decides, per task, how much of
the answer comes from the image and how much from the title.
"""

from __future__ import annotations

import torch
from torch import nn


class SequenceAttention(nn.Module):
    """A transformer encoder over the joint sequence [image tokens; text tokens].

    Returns the outputs at the image class-token position (I) and at the end-of-text position
    (T). Text padding is masked out as keys, so padded titles and full titles agree.
    """

    def __init__(self, *, width: int, layers: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width ({width}) must be divisible by model.heads ({heads})")
        if layers < 1:
            raise ValueError(
                f"model.layers is {layers}: sequence-wise attention needs at least one layer "
                f"(set model.sequence_attention: false to go without it)"
            )

        # norm_first is what `_readout_layer` computes; the last layer runs through it
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_padding: torch.Tensor,
        eot_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_len = image_tokens.shape[1]
        sequence, padding = _joint(image_tokens, text_tokens, text_padding)

        *inner, last = self.encoder.layers
        for layer in inner:
            sequence = layer(sequence, src_key_padding_mask=padding)

        # only two positions of the last layer are read out: the image class token and the
        # end-of-text token
        readout = torch.stack([torch.zeros_like(eot_index), image_len + eot_index], dim=1)
        out = self.norm(_readout_layer(last, sequence, readout, padding))  # [B, 2, W]
        return out[:, 0], out[:, 1]

    def attention_maps(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_padding: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each layer's attention, averaged over heads, and the normalised output sequence.

        The layers are run one by one, as `forward` runs them (the last one over every position,
        where `forward` computes only the two it reads out), with each layer's attention weights
        read from its own self-attention on its normalised input (the layers normalise first).
        Returns one [B, S, S] tensor per layer (query rows, key columns, S = 1 + P + L; each row
        sums to one over the unpadded keys) and the output [B, S, W].
        """
        x, padding = _joint(image_tokens, text_tokens, text_padding)

        maps = []
        for layer in self.encoder.layers:
            normed = layer.norm1(x)
            _, weights = layer.self_attn(
                normed, normed, normed, key_padding_mask=padding, need_weights=True,
                average_attn_weights=True,
            )  # fmt: skip
            maps.append(weights)  # [B, S, S]
            x = layer(x, src_key_padding_mask=padding)
        return maps, self.norm(x)


def _joint(
    image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_padding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint sequence and its key padding mask; image tokens are never padding."""
    batch, image_len = image_tokens.shape[:2]
    # [B, 1 + P, W] ; [B, L, W] -> [B, 1 + P + L, W]
    sequence = torch.cat([image_tokens, text_tokens], dim=1)
    image_padding = text_padding.new_zeros(batch, image_len)
    padding = torch.cat([image_padding, text_padding], dim=1)  # [B, 1 + P + L]
    return sequence, padding


def _readout_layer(
    layer: nn.TransformerEncoderLayer,
    sequence: torch.Tensor,
    positions: torch.Tensor,
    padding: torch.Tensor,
) -> torch.Tensor:
    """A pre-norm encoder layer's output at `positions` [B, Q] only, as [B, Q, W].

    Every token still serves as key and value, but queries, the feed-forward block and the
    residuals run for the read-out positions alone: the same numbers as the whole layer's output
    at those positions, for about a sixth of the layer's arithmetic at the demo's lengths.
    """
    index = positions.unsqueeze(-1).expand(-1, -1, sequence.shape[-1])  # [B, Q, W]
    keys = layer.norm1(sequence)  # [B, S, W]
    x = sequence.gather(1, index)  # [B, Q, W]
    attended = layer.self_attn(
        keys.gather(1, index), keys, keys, key_padding_mask=padding, need_weights=False
    )[0]
    x = x + layer.dropout1(attended)
    hidden = layer.dropout(layer.activation(layer.linear1(layer.norm2(x))))
    return x + layer.dropout2(layer.linear2(hidden))


class ModalityAttention(nn.Module):
    """Keyless attention between I and T, one learned query vector per task.

    For task k: s_I = w_k . I, s_T = w_k . T, (lambda_I, lambda_T) = softmax(s_I, s_T), and the
    fused feature is lambda_I * I + lambda_T * T. With `enabled=False` both weights are 0.5,
    the plain average that the paper's ablation compares against.
    """

    def __init__(self, *, width: int, num_tasks: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.query = nn.Parameter(torch.randn(num_tasks, width) * width**-0.5)

    def forward(
        self, image_embedding: torch.Tensor, text_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return fused features [B, K, W] and the image weight lambda_I [B, K]."""
        modalities = torch.stack([image_embedding, text_embedding], dim=1)  # [B, 2, W]

        if self.enabled:
            scores = torch.einsum("bmw,kw->bkm", modalities, self.query)  # [B, K, 2]
            weights = scores.softmax(dim=-1)
        else:
            shape = (modalities.shape[0], self.query.shape[0], 2)
            weights = modalities.new_full(shape, 0.5)

        fused = torch.einsum("bkm,bmw->bkw", weights, modalities)  # [B, K, W]
        return fused, weights[..., 0]


class TaskHead(nn.Module):
    """An MLP classifier on one task's fused feature."""

    def __init__(self, *, width: int, hidden: int, depth: int, dropout: float, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(width)]
        size = width
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.GELU(), nn.Dropout(dropout)]
            size = hidden
        layers.append(nn.Linear(size, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.mlp(feature)
