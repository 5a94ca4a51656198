"""Build the emoji data set: every emoji picture of two vendors, with three tasks to predict.

The source is the ``emoji-datasource-{vendor}`` npm packages (data MIT-licensed; Google's Noto
pictures under Apache-2.0, Twitter's Twemoji pictures under CC-BY-4.0). Each row is one 64-pixel
picture of one vendor, titled with the emoji's name and short names, and labelled with its
``category``, ``subcategory`` and ``skin_tone``. The title never names the skin tone, so that
task can only be learnt from the picture while the other two are mostly in the text: a small,
real test of whether a model uses both modalities.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmaclip.data.images import ImageDecodeError, decode_image, encode_png
from cmaclip.data.shards import (
    DEFAULT_ROWS_PER_SHARD,
    ShardWriter,
    SkippedRows,
    make_dataset_info,
    write_dataset_info,
)

logger = logging.getLogger(__name__)

TASKS = ("category", "subcategory", "skin_tone")
PACKAGE_MAJOR_VERSION = 16
IMAGE_SIZE = 64

# Vendors whose pictures may be redistributed, with the licence of the pictures. Apple's and
# Facebook's pictures ship in the same kind of package but are not licensed for reuse.
IMAGE_LICENSES = {"google": "Apache-2.0", "twitter": "CC-BY-4.0"}

SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
NO_SKIN_TONE = "none"
MIXED_SKIN_TONE = "mixed"

_DROPPED_CATEGORIES = frozenset({"Component"})
_PACKAGE_NAME = re.compile(r"^emoji-datasource-([a-z]+)$")
_PACKAGE_MEMBER = re.compile(r"^package/(package\.json|emoji\.json|LICENSE|img/[^/]+/64/[^/]+)$")
_UNPACKED_MARKER = ".cmaclip-unpacked"
_LOG_EVERY = 1000


@dataclass(frozen=True)
class _Package:
    """One unpacked ``emoji-datasource-{vendor}`` package."""

    vendor: str
    root: Path
    name: str
    version: str
    license: str
    origin: str


@dataclass(frozen=True)
class _EmojiRow:
    """A planned row: everything but the picture, which is read only when the row is written."""

    row_id: str
    base: str
    image_path: Path
    title: str
    category: str
    subcategory: str
    skin_tone: str


def build_emoji(
    out_dir: str | os.PathLike[str],
    *,
    vendors: Sequence[str] | None = ("google", "twitter"),
    sources: Sequence[str | os.PathLike[str]] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    max_rows: int | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> dict[str, Any]:
    """Build the emoji data set into ``out_dir`` and return its ``dataset.json`` content.

    Args:
        out_dir: folder for the shards and ``dataset.json``; earlier shards there are replaced.
        vendors: picture vendors to include (``google``, ``twitter``). ``None`` means the
            vendors of ``sources``, or both when no sources are given.
        sources: local packages to read instead of fetching: ``.tgz`` tarballs from
            ``npm pack`` or unpacked package folders. The vendor of each is read from its
            ``package.json``; every requested vendor needs one.
        cache_dir: where ``npm pack`` tarballs are kept and unpacked, and reused on the next
            build (default ``~/.cache/cmaclip/emoji``).
        max_rows: keep at most this many rows, chosen deterministically by base emoji so a
            base emoji keeps all its vendors and skin variations, and every skin tone stays
            represented when the budget allows. For small fixtures and smoke runs.
        rows_per_shard: most rows in one Parquet file.

    A picture that is missing or cannot be decoded is left out and counted in
    ``rows_skipped``; it never stops the build.

    Example:
        >>> info = build_emoji("data/emoji", sources=["google.tgz", "twitter.tgz"])
        >>> info["rows"]
        {'train': ..., 'val': ..., 'test': ...}
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="cmaclip-emoji-") as scratch:
        packages = _resolve_packages(vendors, sources, cache_dir, Path(scratch))

        planned = [row for package in packages for row in _plan_rows(package)]
        if max_rows is not None:
            planned = _choose_subset(planned, max_rows)
        # write in a stable pseudo-random order: the packages list variations and related emoji
        # side by side, and shards in that order would give training near-duplicate batches
        planned.sort(key=lambda row: hashlib.sha256(row.row_id.encode("utf-8")).hexdigest())
        logger.info(
            "emoji: %d rows planned from %s", len(planned), ", ".join(p.vendor for p in packages)
        )

        skipped = SkippedRows()
        classes: dict[str, set[str]] = {task: set() for task in TASKS}
        with ShardWriter(out_dir, TASKS, rows_per_shard=rows_per_shard) as writer:
            for done, row in enumerate(planned, start=1):
                _write_row(writer, row, classes, skipped)
                if done % _LOG_EVERY == 0:
                    logger.info(
                        "emoji: %d/%d rows read, %d skipped", done, len(planned), skipped.count
                    )

    info = make_dataset_info(
        name="emoji",
        classes=classes,
        rows=writer.counts,
        rows_read=len(planned),
        skipped=skipped,
        source={
            "kind": "npm emoji-datasource packages",
            "packages": [
                {
                    "name": package.name,
                    "version": package.version,
                    "license": package.license,
                    "image_license": IMAGE_LICENSES[package.vendor],
                    "origin": package.origin,
                }
                for package in packages
            ],
            "image_size": IMAGE_SIZE,
            "max_rows": max_rows,
        },
    )
    write_dataset_info(out_dir, info)
    logger.info(
        "emoji: wrote %s rows (%d skipped) to %s in %.1f s",
        info["rows"],
        skipped.count,
        out_dir,
        time.perf_counter() - started,
    )
    return info


def skin_tone_of(variation_key: str) -> str:
    """Name the skin tone of a ``skin_variations`` key such as ``1F3FB`` or ``1F3FB-1F3FC``.

    A key with two different tones (two people) is ``mixed``; two equal tones are that tone.
    """
    parts = variation_key.upper().split("-")
    unknown = [part for part in parts if part not in SKIN_TONES]
    if unknown:
        raise ValueError(f"unknown skin tone modifier(s) {unknown} in {variation_key!r}")

    tones = {SKIN_TONES[part] for part in parts}
    return tones.pop() if len(tones) == 1 else MIXED_SKIN_TONE


def title_of(emoji: dict[str, Any]) -> str:
    """The lower-cased name followed by the short names, each word once.

    >>> title_of({"name": "FATHER CHRISTMAS", "short_names": ["santa"]})
    'father christmas santa'
    """
    words = (emoji.get("name") or "").lower().split()
    for short_name in emoji.get("short_names") or []:
        words.extend(short_name.replace("_", " ").lower().split())
    return " ".join(dict.fromkeys(words))


def _plan_rows(package: _Package) -> Iterator[_EmojiRow]:
    """Every picture of one vendor: each emoji and each skin variation that has one."""
    has_image = f"has_img_{package.vendor}"
    image_dir = package.root / "img" / package.vendor / str(IMAGE_SIZE)

    for emoji in _read_json(package.root / "emoji.json"):
        if emoji.get("category") in _DROPPED_CATEGORIES:
            continue

        base = emoji["unified"]
        shared = {
            "base": base,
            "title": title_of(emoji),
            "category": emoji["category"],
            "subcategory": emoji["subcategory"],
        }
        if emoji.get(has_image):
            yield _EmojiRow(
                row_id=f"{package.vendor}:{base}",
                image_path=image_dir / emoji["image"],
                skin_tone=NO_SKIN_TONE,
                **shared,
            )

        for key, variation in (emoji.get("skin_variations") or {}).items():
            if variation.get(has_image):
                yield _EmojiRow(
                    row_id=f"{package.vendor}:{variation['unified']}",
                    image_path=image_dir / variation["image"],
                    skin_tone=skin_tone_of(key),
                    **shared,
                )


def _write_row(
    writer: ShardWriter,
    row: _EmojiRow,
    classes: dict[str, set[str]],
    skipped: SkippedRows,
) -> None:
    try:
        picture = decode_image(row.image_path.read_bytes())
    except FileNotFoundError:
        skipped.add(str(row.image_path), row.row_id, "image file missing")
        return
    except (OSError, ImageDecodeError) as error:
        skipped.add(str(row.image_path), row.row_id, str(error))
        return

    # Limitation: the shard format splits each row by its own id, so the two vendors' pictures
    # and the skin variations of one emoji, which share a title, usually land in different
    # splits; category and subcategory scores on val and test therefore reward remembering
    # titles seen in training, while skin_tone (never in the title) does not.
    labels = {"category": row.category, "subcategory": row.subcategory, "skin_tone": row.skin_tone}
    writer.add({"id": row.row_id, "image": encode_png(picture), "title": row.title, **labels})
    for task, label in labels.items():
        classes[task].add(label)


def _choose_subset(rows: list[_EmojiRow], max_rows: int) -> list[_EmojiRow]:
    """Keep whole base emoji, in stable-hash order, until ``max_rows`` rows are used.

    A first pass takes only base emoji that add a skin tone not yet covered, so even a small
    subset can learn every skin-tone class; a second pass fills the rest of the budget.
    """
    groups: dict[str, list[_EmojiRow]] = defaultdict(list)
    for row in rows:
        groups[row.base].append(row)
    order = sorted(groups, key=lambda base: hashlib.sha256(base.encode("utf-8")).hexdigest())

    chosen: set[str] = set()
    budget = max_rows
    covered: set[str] = set()
    for needs_new_tone in (True, False):
        for base in order:
            group = groups[base]
            tones = {row.skin_tone for row in group}
            if base in chosen or len(group) > budget:
                continue
            if needs_new_tone and tones <= covered:
                continue
            chosen.add(base)
            covered |= tones
            budget -= len(group)

    return [row for row in rows if row.base in chosen]


def _resolve_packages(
    vendors: Sequence[str] | None,
    sources: Sequence[str | os.PathLike[str]] | None,
    cache_dir: str | os.PathLike[str] | None,
    scratch: Path,
) -> list[_Package]:
    """Find or fetch one unpacked package per requested vendor."""
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()

    given: dict[str, _Package] = {}
    for source in sources or []:
        package = _open_source(Path(source), cache if cache_dir is not None else scratch)
        if package.vendor in given:
            raise ValueError(
                f"two sources for vendor {package.vendor}: {given[package.vendor].origin} "
                f"and {package.origin}"
            )
        given[package.vendor] = package

    if vendors is None:
        vendors = list(given) if given else list(IMAGE_LICENSES)
    _check_vendors(vendors)

    packages = []
    for vendor in vendors:
        if vendor in given:
            packages.append(given[vendor])
        elif sources:
            raise ValueError(
                f"no source for vendor {vendor!r}: the given sources are for {sorted(given)}; "
                "add its package with --from or leave the vendor out"
            )
        else:
            packages.append(_open_source(_fetch_tarball(vendor, cache), cache))
    return packages


def _check_vendors(vendors: Iterable[str]) -> None:
    vendors = list(vendors)
    unknown = [vendor for vendor in vendors if vendor not in IMAGE_LICENSES]
    if unknown:
        raise ValueError(
            f"unsupported vendor(s) {unknown}: choose from {sorted(IMAGE_LICENSES)} "
            "(other vendors' pictures are not licensed for reuse)"
        )
    if not vendors:
        raise ValueError("at least one vendor is needed")
    if len(set(vendors)) != len(vendors):
        raise ValueError(f"vendors must be distinct, got {vendors}")


def _open_source(source: Path, unpack_root: Path) -> _Package:
    """Read a package from a tarball (unpacked under ``unpack_root``) or an unpacked folder."""
    if source.is_file() and source.name.endswith((".tgz", ".tar.gz")):
        root = _unpack(source, unpack_root)
    elif source.is_dir():
        root = source / "package" if (source / "package" / "package.json").is_file() else source
    else:
        raise FileNotFoundError(
            f"emoji source {source} is neither a .tgz tarball nor a package folder"
        )

    manifest = _read_json(root / "package.json")
    match = _PACKAGE_NAME.match(str(manifest.get("name", "")))
    if match is None:
        raise ValueError(
            f"{root / 'package.json'} names {manifest.get('name')!r}, "
            "expected emoji-datasource-<vendor>"
        )

    version = str(manifest.get("version", "unknown"))
    if not version.startswith(f"{PACKAGE_MAJOR_VERSION}."):
        logger.warning(
            "%s is version %s; this builder was written for %d.x",
            manifest["name"],
            version,
            PACKAGE_MAJOR_VERSION,
        )
    return _Package(
        vendor=match.group(1),
        root=root,
        name=manifest["name"],
        version=version,
        license=str(manifest.get("license", "unknown")),
        origin=str(source),
    )


def _unpack(tarball: Path, unpack_root: Path) -> Path:
    """Unpack the data, licence and 64-pixel pictures of a package; reuse an earlier unpack."""
    stem = tarball.name.removesuffix(".tgz").removesuffix(".tar.gz")
    destination = unpack_root / stem
    marker = destination / _UNPACKED_MARKER
    if marker.is_file():
        return destination / "package"

    logger.info("unpacking %s into %s", tarball, destination)
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)

    # a streaming read: the tarballs hold large sprite sheets that are never extracted
    with tarfile.open(tarball, "r|gz") as archive:
        for member in archive:
            if member.isfile() and _PACKAGE_MEMBER.match(member.name):
                archive.extract(member, destination, filter="data")
    marker.touch()
    return destination / "package"


def _fetch_tarball(vendor: str, cache: Path) -> Path:
    """Return a cached ``npm pack`` tarball of the vendor's package, fetching it if needed."""
    name = f"emoji-datasource-{vendor}"
    cached = sorted(
        cache.glob(f"{name}-{PACKAGE_MAJOR_VERSION}.*.tgz"),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.name)],
    )
    if cached:
        logger.info("using cached %s", cached[-1])
        return cached[-1]

    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm is not installed, so {name} cannot be fetched; install Node.js or download "
            f"the package elsewhere (`npm pack {name}@{PACKAGE_MAJOR_VERSION}`) and pass it "
            "with --from"
        )

    cache.mkdir(parents=True, exist_ok=True)
    command = [npm, "pack", f"{name}@{PACKAGE_MAJOR_VERSION}", "--json", "--pack-destination"]
    logger.info("fetching %s@%d with npm pack into %s", name, PACKAGE_MAJOR_VERSION, cache)
    result = subprocess.run(
        [*command, str(cache)], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`npm pack {name}@{PACKAGE_MAJOR_VERSION}` failed: {result.stderr[-2000:]}"
        )

    filename = json.loads(result.stdout)[0]["filename"]
    return cache / filename


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmaclip" / "emoji"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} is missing: not an emoji-datasource package") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
