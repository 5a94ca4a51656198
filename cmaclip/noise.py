"""Corrupting one modality of a fraction of the evaluated rows, to measure robustness to noise.

The paper's claim is that modality-wise attention lets the model lean on the other modality when
one of them is noise. A `NoiseSetting` names a kind from `NOISE_KINDS` and the fraction of rows
it corrupts; `noisy_batches` yields the same preprocessed batches as `local_batches`, with those
rows changed and flagged in a `corrupted` column.

Which rows, and how, depends only on the seed and the row ids:

- the rows of the split are ranked by a hash of (seed, row id) and the first
  floor(rate x rows + 0.5) are corrupted, so a rate corrupts exactly that many rows (rows whose
  image does not decode included: they stay skipped), and at one seed the rows corrupted at a
  lower rate are among those corrupted at a higher one, whatever the kind;
- a row that takes another row's title or image takes it from the next row, in an order hashed
  from (seed, row id), whose title differs from its own (and, for images, whose image decodes);
- random draws (extra words, Gaussian noise) come from a generator seeded by (seed, row id).

Title kinds change the title before tokenization; image kinds change the preprocessed pixels,
so a corrupted row is still counted as read, used or skipped exactly as when clean.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from cmaclip.data.images import ImageDecodeError, decode_image
from cmaclip.data.pipeline import InputSpec, Preprocessor, raw_batches
from cmaclip.data.shards import DEFAULT_MAX_SKIPPED_FRACTION

logger = logging.getLogger(__name__)

# Words with no bearing on any product attribute, appended by `title_extra`.
EXTRA_WORDS = (
    "tuesday", "seventeen", "quietly", "meanwhile", "however", "perhaps", "yesterday", "forty",
    "nevertheless", "somewhere", "although", "twelve", "afterwards", "thursday", "otherwise",
    "eleven", "whenever", "indeed", "probably", "ninety", "therefore", "sunday", "nowhere",
    "anyway", "eighty", "likewise", "sometimes", "wednesday", "thirteen", "accordingly",
)  # fmt: skip

# How many later rows (in the hashed order) a swap looks at for a donor with another title.
MAX_DONOR_SCAN = 200
# Donors kept per corrupted row; a swap takes the first of them whose image decodes.
DONOR_CANDIDATES = 4

_MEAN = np.asarray(OPENAI_DATASET_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.asarray(OPENAI_DATASET_STD, np.float32).reshape(3, 1, 1)


@dataclass(frozen=True)
class NoiseKind:
    """One way of corrupting a row: what it changes, and its strength parameter if any."""

    name: str
    modality: Literal["title", "image"]
    description: str
    apply: Callable[..., object]  # (value, *, donor, rng, param) -> corrupted value
    donor: bool = False  # takes the title or image of another row
    param: str | None = None  # name of the strength parameter (KIND:RATE:PARAM)
    default: float | None = None


def _title_swap(title: str, *, donor: str, rng, param) -> str:
    return donor


def _title_empty(title: str, *, donor, rng, param) -> str:
    return ""


def _title_extra(title: str, *, donor, rng, param: float) -> str:
    words = rng.choice(len(EXTRA_WORDS), size=int(param), replace=True)
    return " ".join([title, *(EXTRA_WORDS[i] for i in words)]).strip()


def _image_swap(pixels: np.ndarray, *, donor: np.ndarray, rng, param) -> np.ndarray:
    return donor


def _image_blank(pixels: np.ndarray, *, donor, rng, param) -> np.ndarray:
    # zero after normalisation is the encoder's mean colour, what serving uses for no image
    return np.zeros_like(pixels)


def _image_gaussian(pixels: np.ndarray, *, donor, rng, param: float) -> np.ndarray:
    # the noise is added in [0, 1] pixel units, then clipped, then normalised again
    raw = pixels * _STD + _MEAN
    raw = np.clip(raw + rng.normal(0.0, param, size=raw.shape).astype(np.float32), 0.0, 1.0)
    return ((raw - _MEAN) / _STD).astype(np.float32)


NOISE_KINDS: dict[str, NoiseKind] = {
    kind.name: kind
    for kind in (
        NoiseKind("title_swap", "title", "title replaced by another row's title", _title_swap,
                  donor=True),
        NoiseKind("title_empty", "title", "title emptied", _title_empty),
        NoiseKind("title_extra", "title", "unrelated words appended to the title", _title_extra,
                  param="words", default=3),
        NoiseKind("image_swap", "image", "image replaced by another row's image", _image_swap,
                  donor=True),
        NoiseKind("image_blank", "image", "image blanked to the encoder's mean colour",
                  _image_blank),
        NoiseKind("image_gaussian", "image", "Gaussian noise added to the pixels (sigma in "
                  "[0, 1] pixel units), then clipped", _image_gaussian, param="sigma",
                  default=0.25),
    )
}  # fmt: skip


@dataclass(frozen=True)
class NoiseSetting:
    """A kind, the fraction of rows it corrupts, and its strength (the kind's default if None)."""

    kind: str
    rate: float
    param: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {self.kind!r}; kinds are {list(NOISE_KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"noise {self.kind}: rate {self.rate:g} is not between 0 and 1")
        kind = NOISE_KINDS[self.kind]
        if self.param is not None and kind.param is None:
            raise ValueError(f"noise {self.kind} takes no parameter (give {self.kind}:RATE)")
        if self.param is not None and self.param < 0:
            raise ValueError(f"noise {self.kind}: {kind.param} must not be negative")

    @property
    def strength(self) -> float | None:
        return self.param if self.param is not None else NOISE_KINDS[self.kind].default

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.rate:g}" + (f":{self.param:g}" if self.param is not None else "")

    def to_dict(self) -> dict[str, object]:
        kind = NOISE_KINDS[self.kind]
        out: dict[str, object] = {"kind": self.kind, "rate": self.rate,
                                  "description": kind.description}  # fmt: skip
        if kind.param:
            out[kind.param] = self.strength
        return out


def parse_noise(text: str) -> NoiseSetting:
    """`KIND:RATE` or `KIND:RATE:PARAM`, e.g. `title_swap:0.3` or `image_gaussian:0.5:0.1`."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(
            f"--noise {text!r}: expected KIND:RATE or KIND:RATE:PARAM, e.g. title_swap:0.3; "
            f"kinds are {list(NOISE_KINDS)}"
        )
    try:
        numbers = [float(part) for part in parts[1:]]
    except ValueError:
        raise ValueError(f"--noise {text!r}: rate and parameter must be numbers") from None
    return NoiseSetting(parts[0], numbers[0], numbers[1] if len(numbers) == 2 else None)


def _row_hash(seed: int, purpose: str, row_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{purpose}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def corrupted_count(rate: float, rows: int) -> int:
    """How many of `rows` a rate corrupts: the nearest whole number, halves rounded up."""
    return int(np.floor(rate * rows + 0.5))


def select_rows(row_ids: list[str], rate: float, seed: int) -> np.ndarray:
    """A boolean mask over `row_ids`: the corrupted rows, chosen by seed and id only."""
    count = corrupted_count(rate, len(row_ids))
    keys = [(_row_hash(seed, "select", row_id), i) for i, row_id in enumerate(row_ids)]
    mask = np.zeros(len(row_ids), dtype=bool)
    mask[[i for _, i in sorted(keys)[:count]]] = True
    return mask


@dataclass
class NoisePlan:
    """Which rows of a split are corrupted, and the donor title or image bytes of each."""

    setting: NoiseSetting
    seed: int
    row_ids: list[str]
    selected: np.ndarray  # [N] bool, in the order `raw_batches` reads the split
    donors: dict[int, object] = field(default_factory=dict)  # row index -> title or image bytes
    donor_ids: dict[int, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.selected.sum())


def _decodes(data: object) -> bool:
    try:
        decode_image(data)  # type: ignore[arg-type]
    except ImageDecodeError:
        return False
    return True


def plan_noise(
    data_dir: str | Path, split: str, tasks: dict[str, list[str]], setting: NoiseSetting,
    *, seed: int,
) -> NoisePlan:  # fmt: skip
    """Read the split's ids and titles (and, for `image_swap`, the donors' images) and plan."""
    ids: list[str] = []
    titles: list[str] = []
    for batch in raw_batches(data_dir, split, tasks, batch_size=4096, columns=["id", "title"]):
        ids.extend(str(row_id) for row_id in batch["id"])
        titles.extend(title if isinstance(title, str) else "" for title in batch["title"])
    plan = NoisePlan(setting, seed, ids, select_rows(ids, setting.rate, seed))
    kind = NOISE_KINDS[setting.kind]
    if not kind.donor or not plan.count:
        return plan

    order = sorted(range(len(ids)), key=lambda i: (_row_hash(seed, "donor", ids[i]), i))
    position = {row: p for p, row in enumerate(order)}
    scan = min(len(order), MAX_DONOR_SCAN + 1)
    candidates: dict[int, list[int]] = {}
    for row in np.flatnonzero(plan.selected):
        start = position[row]
        later = [order[(start + step) % len(order)] for step in range(1, scan)]
        other = [i for i in later if titles[i] != titles[row]]
        # every title alike (or none other nearby): any other row
        candidates[int(row)] = (other or later)[:DONOR_CANDIDATES]

    if kind.modality == "title":
        for row, rows in candidates.items():
            donor = rows[0] if rows else row
            plan.donors[row], plan.donor_ids[row] = titles[donor], ids[donor]
        return plan

    # image donors: hold the bytes of the first candidate that decodes
    # Limitation: the donor images are held in memory, about one encoded image per corrupted row.
    wanted = {i for rows in candidates.values() for i in rows}
    images: dict[int, object] = {}
    index = 0
    for batch in raw_batches(data_dir, split, tasks, batch_size=1024, columns=["id", "image"]):
        for data in batch["image"]:
            if index in wanted:
                images[index] = data
            index += 1
    for row, rows in candidates.items():
        donor = next((i for i in rows if _decodes(images[i])), None)
        if donor is None:
            raise ValueError(
                f"{data_dir} {split}: noise image_swap: no decodable image among the "
                f"{len(rows)} rows after row {ids[row]} in the donor order"
            )
        plan.donors[row], plan.donor_ids[row] = images[donor], ids[donor]
    return plan


def noisy_batches(
    data_dir: str | Path,
    split: str,
    spec: InputSpec,
    setting: NoiseSetting,
    *,
    seed: int = 0,
    batch_size: int = 64,
    plan: NoisePlan | None = None,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
) -> Iterator[dict[str, np.ndarray]]:
    """`local_batches` of `split` with the rows of `setting` corrupted; adds `corrupted` [B]."""
    kind = NOISE_KINDS[setting.kind]
    plan = plan or plan_noise(data_dir, split, spec.tasks, setting, seed=seed)
    logger.info("noise %s: %d of %d %s rows corrupted (seed %d)", setting.label, plan.count,
                len(plan.row_ids), split, seed)  # fmt: skip
    preprocess = Preprocessor(
        spec, max_skipped_fraction=max_skipped_fraction, where=f"{data_dir} {split}"
    )
    start = 0
    for raw in raw_batches(data_dir, split, spec.tasks, batch_size=batch_size):
        size = len(raw["id"])
        rows = np.arange(start, start + size)
        start += size
        corrupted = plan.selected[rows]
        rngs = {
            int(i): np.random.default_rng([seed, _row_hash(seed, "draw", plan.row_ids[rows[i]])])
            for i in np.flatnonzero(corrupted)
        }

        if kind.modality == "title":
            titles = raw["title"].copy()
            for i, rng in rngs.items():
                if isinstance(titles[i], bytes):
                    continue  # a title that is not UTF-8 stays skipped, as it is when clean
                title = titles[i] if isinstance(titles[i], str) else ""
                titles[i] = kind.apply(
                    title, donor=plan.donors.get(int(rows[i])), rng=rng, param=setting.strength
                )
            raw = {**raw, "title": titles}

        out = {**preprocess(raw), "file": raw["file"]}
        if kind.modality == "image":
            for i, rng in rngs.items():
                if not out["valid"][i]:
                    continue  # a row whose own image does not decode stays skipped
                donor = plan.donors.get(int(rows[i]))
                if donor is not None:
                    donor = preprocess.transform(decode_image(donor)).numpy()
                out["images"][i] = kind.apply(
                    out["images"][i], donor=donor, rng=rng, param=setting.strength
                )
        out["corrupted"] = corrupted
        yield out
