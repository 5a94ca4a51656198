"""Where in the image a title's word looks: the sequence-wise attention as a heat map.

The paper shows that sequence-wise attention links words of the title to the image patches they
describe. `explain` runs one item through an exported model, takes the chosen layer's attention
(heads averaged) from one word of the title (its sub-word tokens averaged) to the image patches,
and draws it over the image the encoder saw (after resizing and cropping), with each task's
prediction and lambda_I beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402

from cmaclip.predict import Predictor  # noqa: E402

logger = logging.getLogger(__name__)

FIGURE_SIZE = (10.0, 5.0)  # inches
DPI = 100  # so the PNG is 1000 x 500 pixels


@dataclass
class Word:
    text: str
    positions: list[int]  # positions of its tokens in the model's text input


@dataclass
class Explanation:
    title: str
    words: list[Word]
    word: Word  # the one shown
    layer: int  # as counted from the first layer, 0-based
    layers: int
    heads: int
    patch_attention: np.ndarray  # [grid, grid]: the word's attention on each image patch
    image_share: float  # of the word's attention, the part on image tokens (class token too)
    # each word's attention share on the image patches, in title order (`--token` picks the
    # first occurrence of a repeated word, the default the word with the largest share)
    word_shares: list[tuple[str, float]]
    pixels: np.ndarray  # [S, S, 3] in [0, 1]: the image as the encoder saw it
    answer: dict[str, Any]  # as `cmaclip predict` answers


def _words(tokenizer, text_ids: np.ndarray) -> list[Word]:
    """Group the title's tokens (between start and end-of-text) into words."""
    decoder = getattr(tokenizer, "decoder", None)
    if decoder is None:
        raise ValueError("explain needs open_clip's own BPE tokenizer to name the title's words")
    eot = int(np.argmax(text_ids))  # the end-of-text token has the largest id
    words: list[Word] = []
    current: list[int] = []
    for position in range(1, eot):
        current.append(position)
        piece = decoder[int(text_ids[position])]
        if piece.endswith("</w>"):
            text = "".join(decoder[int(text_ids[p])] for p in current).replace("</w>", "")
            words.append(Word(text, current))
            current = []
    if current:
        words.append(Word("".join(decoder[int(text_ids[p])] for p in current), current))
    return words


def explain(
    model: str | Path, image: bytes, title: str, *, token: str | None = None, layer: int = -1
) -> Explanation:
    """Attention from one word of `title` to the patches of `image`, and the model's answer.

    `token` picks the word (case-insensitive, as the tokenizer splits the title); by default the
    word whose attention falls most on the image patches. `layer` counts like a Python index
    (-1, the last layer, is the one whose outputs I and T are read from).
    """
    predictor = Predictor(model)
    net = predictor.model
    item = predictor.preparer.prepare(title, image)
    answer = predictor.predict([(title, image)], top_k=1)[0]

    images = torch.from_numpy(item.image[None])
    text = torch.from_numpy(item.text[None])
    with torch.no_grad():
        maps, image_len = net.attention_maps(images, text)
    if not -len(maps) <= layer < len(maps):
        raise ValueError(f"--layer {layer}: the model has {len(maps)} sequence-wise layers")
    attention = maps[layer][0].numpy()  # [S, S]
    patches = image_len - 1
    grid = int(round(patches**0.5))
    if grid * grid != patches:
        raise ValueError(f"the image has {patches} patch tokens, not a square grid")

    words = _words(predictor.preparer.tokenizer, item.text)
    eot = int(np.argmax(item.text))
    if not words:  # an empty title: only the end-of-text token can look at the image
        words = [Word("<end of text>", [eot])]

    def rows(word: Word) -> np.ndarray:
        return attention[[image_len + p for p in word.positions]].mean(axis=0)  # [S]

    share = [float(rows(word)[1:image_len].sum()) for word in words]
    shares = [(word.text, value) for word, value in zip(words, share, strict=True)]
    if token is None:
        chosen = words[int(np.argmax(share))]
    else:
        wanted = token.strip().lower()
        matches = [word for word in words if word.text == wanted]
        if not matches:
            raise ValueError(
                f"--token {token!r} is not a word of the title as the tokenizer splits it: "
                f"{[word.text for word in words]}"
            )
        chosen = matches[0]

    row = rows(chosen)
    mean = np.asarray(OPENAI_DATASET_MEAN).reshape(3, 1, 1)
    std = np.asarray(OPENAI_DATASET_STD).reshape(3, 1, 1)
    pixels = np.clip(item.image * std + mean, 0, 1).transpose(1, 2, 0)
    return Explanation(
        title=title,
        words=words,
        word=chosen,
        layer=layer % len(maps),
        layers=len(maps),
        heads=net.config.heads,
        patch_attention=row[1:image_len].reshape(grid, grid),  # patches row by row
        image_share=float(row[:image_len].sum()),
        word_shares=shares,
        pixels=pixels,
        answer=answer,
    )


def explanation_figure(explanation: Explanation):
    """The image with the heat map on the left, the title and the answers on the right."""
    fig = plt.figure(figsize=FIGURE_SIZE, dpi=DPI)
    ax = fig.add_axes((0.08, 0.11, 0.40, 0.76))
    size = explanation.pixels.shape[0]
    heat = explanation.patch_attention
    ax.imshow(explanation.pixels, extent=(0, size, size, 0), interpolation="nearest")
    top = max(float(heat.max()), 1e-9)
    overlay = ax.imshow(heat, extent=(0, size, size, 0), cmap="inferno", alpha=0.55,
                        interpolation="bilinear", vmin=0, vmax=top)  # fmt: skip
    ax.set_xlabel("image x (pixels as the encoder saw them)")
    ax.set_ylabel("image y")
    ax.set_title(
        f"attention from {explanation.word.text!r} to the image patches\n"
        f"layer {explanation.layer + 1} of {explanation.layers}, mean of {explanation.heads} heads",
        fontsize=10,
    )
    bar = fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("attention weight on the patch")

    lines = [f"title: {explanation.title!r}", "",
             f"{explanation.word.text!r}: {explanation.image_share:.1%} of its attention on the "
             "image", f"({heat.sum():.1%} on the {heat.size} patches)", ""]  # fmt: skip
    for task, answer in explanation.answer["tasks"].items():
        flag = " (abstains)" if answer["abstained"] else ""
        lines.append(f"{task}: {answer['label']}")
        lines.append(
            f"    p = {answer['probability']:.2f}{flag}, λ_I = {answer['image_weight']:.3f}"
        )
    shares = sorted(explanation.word_shares, key=lambda item: -item[1])[:8]
    lines += ["", "attention on the image patches, per word:"]
    lines += [f"    {word}: {share:.1%}" for word, share in shares]
    fig.text(0.58, 0.9, "\n".join(lines), va="top", ha="left", fontsize=10, family="monospace")
    return fig


def write_explanation(explanation: Explanation, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = explanation_figure(explanation)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
