"""Tests for the shard format, picture decoding and the two data-set builders.

Everything runs on the real emoji-mini fixture or on pictures made in ``tmp_path``: no network,
a few seconds in all.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from cmaclip.data import emoji as emoji_module
from cmaclip.data.cli import data_app
from cmaclip.data.emoji import build_emoji, skin_tone_of, title_of
from cmaclip.data.images import ImageDecodeError, decode_image, encode_png
from cmaclip.data.shards import (
    SPLITS,
    ShardWriter,
    read_dataset_info,
    shard_files,
    split_for,
    write_dataset_info,
)
from cmaclip.data.table import build_from_table

FIXTURE = Path(__file__).parent / "fixtures" / "emoji-mini"
FIXTURE_SOURCES = [FIXTURE / "google", FIXTURE / "twitter"]
EMOJI_COLUMNS = ["id", "image", "title", "category", "subcategory", "skin_tone", "split"]
SKIN_TONES = ["dark", "light", "medium", "medium-dark", "medium-light", "mixed", "none"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_split(data_dir: Path, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in shard_files(data_dir, split))


def read_all(data_dir: Path) -> list[dict[str, Any]]:
    """Every row of a data set; a split with no rows has no shards."""
    counts = read_dataset_info(data_dir)["rows"]
    rows = []
    for split in SPLITS:
        if counts[split]:
            rows += read_split(data_dir, split).to_pylist()
    return rows


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def noise(size: int = 64) -> Image.Image:
    """A picture that compresses badly, so that half of its file is half of its pixels."""
    return Image.frombytes("RGB", (size, size), random.Random(0).randbytes(size * size * 3))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# split


def test_split_is_stable_across_runs_and_versions() -> None:
    # pinned: a change here would move rows between splits of existing data sets
    expected = {"row-0": "val", "row-1": "train", "row-18": "test", "google:1F385": "train"}
    assert {row_id: split_for(row_id) for row_id in expected} == expected
    assert len({split_for("same id") for _ in range(5)}) == 1


def test_split_proportions_are_roughly_80_10_10() -> None:
    counts = Counter(split_for(f"item-{index}") for index in range(20_000))
    assert 0.78 < counts["train"] / 20_000 < 0.82
    assert 0.09 < counts["val"] / 20_000 < 0.11
    assert 0.09 < counts["test"] / 20_000 < 0.11


# decode_image


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])

    decoded = decode_image(png_bytes(image))

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (255, 0, 0)
    assert all(120 <= channel <= 135 for channel in decoded.getpixel((2, 0)))


def test_grayscale_with_alpha_is_composited_on_white() -> None:
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (0, 255)])

    decoded = decode_image(png_bytes(image))

    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (0, 0, 0)


def test_palette_with_and_without_transparency() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putdata([0, 1])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)

    transparent = decode_image(buffer.getvalue())
    opaque = decode_image(png_bytes(image))

    assert transparent.getpixel((0, 0)) == (255, 255, 255)
    assert transparent.getpixel((1, 0)) == (0, 255, 0)
    assert opaque.getpixel((0, 0)) == (0, 0, 0)


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (3, 1))
    image.putdata([256, 32768, 65535])

    decoded = decode_image(png_bytes(image))

    assert [decoded.getpixel((x, 0))[0] for x in range(3)] == [1, 128, 255]


def test_cmyk_and_grayscale_become_rgb() -> None:
    cmyk = jpeg_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)))
    gray = png_bytes(Image.new("L", (4, 4), 200))

    assert decode_image(cmyk).mode == "RGB"
    assert all(channel > 245 for channel in decode_image(cmyk).getpixel((0, 0)))
    assert decode_image(gray).getpixel((0, 0)) == (200, 200, 200)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), color) for color in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)

    decoded = decode_image(buffer.getvalue())

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_one_pixel_image_and_png_round_trip() -> None:
    decoded = decode_image(png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))))

    assert decoded.size == (1, 1)
    assert decode_image(encode_png(decoded)).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("encode", [png_bytes, jpeg_bytes], ids=["png", "jpeg"])
def test_truncated_file_is_an_error(encode: Any) -> None:
    data = encode(noise())

    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty"), (b"this is not a picture at all" * 4, "not a recognised image")],
    ids=["zero-bytes", "not-an-image"],
)
def test_empty_and_non_image_bytes_are_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS

    # beyond PIL's own limit, and between ours and PIL's: both refused before decoding pixels
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(png_header_only(50_000, 50_000))
    with pytest.raises(ImageDecodeError, match="max_pixels=40000000"):
        decode_image(png_header_only(8_000, 8_000))
    with pytest.raises(ImageDecodeError, match="max_pixels=100"):
        decode_image(png_bytes(Image.new("RGB", (20, 20))), max_pixels=100)

    assert Image.MAX_IMAGE_PIXELS == limit_before


# shards


def test_shard_writer_rolls_files_per_split(tmp_path: Path) -> None:
    picture = png_bytes(Image.new("RGB", (2, 2)))

    with ShardWriter(tmp_path, ["label"], rows_per_shard=7) as writer:
        for index in range(60):
            writer.add({"id": f"row-{index}", "image": picture, "title": "t", "label": "a"})

    assert sum(writer.counts.values()) == 60
    for split in SPLITS:
        files = shard_files(tmp_path, split)
        sizes = [pq.read_metadata(path).num_rows for path in files]
        assert all(size <= 7 for size in sizes)
        assert sum(sizes) == writer.counts[split]
        assert [Path(path).name for path in files] == [
            f"{split}-{index:05d}.parquet" for index in range(len(files))
        ]
        assert set(read_split(tmp_path, split).column("split").to_pylist()) == {split}


def test_shard_writer_rejects_unknown_columns_and_bad_splits(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, ["label"]) as writer:
        with pytest.raises(ValueError, match="unknown columns"):
            writer.add({"id": "a", "image": b"", "title": "", "colour": "red"})
        with pytest.raises(ValueError, match="split must be one of"):
            writer.add({"id": "a", "image": b"", "title": "", "label": "x", "split": "dev"})
    with pytest.raises(ValueError, match="clash with the fixed columns"):
        ShardWriter(tmp_path, ["title"])


def test_dataset_info_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "dataset.json"))):
        read_dataset_info(tmp_path)

    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_dataset_info(tmp_path)

    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="missing keys"):
        read_dataset_info(tmp_path)

    with pytest.raises(FileNotFoundError, match="no val shards"):
        shard_files(tmp_path, "val")


def test_dataset_info_must_add_up(tmp_path: Path) -> None:
    info = {
        "name": "x",
        "tasks": {"label": ["a"]},
        "rows": {"train": 1, "val": 0, "test": 0},
        "rows_read": 3,
        "rows_skipped": 1,
        "skipped": [],
        "source": {},
        "format_version": 1,
    }
    with pytest.raises(ValueError, match="rows_read"):
        write_dataset_info(tmp_path, info)

    write_dataset_info(tmp_path, {**info, "rows_read": 2})
    assert read_dataset_info(tmp_path)["rows_read"] == 2


# build_emoji


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emoji")
    build_emoji(out, sources=FIXTURE_SOURCES)
    return out


def fixture_bases() -> dict[str, str]:
    """The base emoji of every code point sequence in the fixture, itself for a base emoji."""
    bases = {}
    for entry in json.loads((FIXTURE / "google" / "emoji.json").read_text()):
        bases[entry["unified"]] = entry["unified"]
        for variation in (entry.get("skin_variations") or {}).values():
            bases[variation["unified"]] = entry["unified"]
    return bases


def expected_fixture_rows() -> dict[str, int]:
    """Row counts worked out from the fixture's emoji.json, independently of the builder."""
    counts = {}
    for vendor in ("google", "twitter"):
        emoji = json.loads((FIXTURE / vendor / "emoji.json").read_text())
        flag = f"has_img_{vendor}"
        counts[vendor] = sum(
            bool(entry.get(flag))
            + sum(bool(v.get(flag)) for v in (entry.get("skin_variations") or {}).values())
            for entry in emoji
            if entry["category"] != "Component"
        )
    return counts


def test_emoji_rows_add_up(emoji_dir: Path) -> None:
    info = read_dataset_info(emoji_dir)
    rows = read_all(emoji_dir)
    expected = expected_fixture_rows()

    assert info["rows_skipped"] == 0
    assert sum(info["rows"].values()) == len(rows) == sum(expected.values())
    assert info["rows_read"] == sum(info["rows"].values()) + info["rows_skipped"]
    assert 700 <= len(rows) <= 1000
    assert Counter(row["id"].split(":")[0] for row in rows) == expected
    assert len({row["id"] for row in rows}) == len(rows)
    assert all(row["split"] == split_for(row["id"]) for row in rows)


def test_emoji_schema_and_column_order(emoji_dir: Path) -> None:
    for split in SPLITS:
        for path in shard_files(emoji_dir, split):
            schema = pq.read_schema(path)
            assert schema.names == EMOJI_COLUMNS
            assert not schema.field("id").nullable
            assert schema.field("image").type == pa.binary()
            assert all(
                schema.field(name).type == pa.string() for name in EMOJI_COLUMNS if name != "image"
            )


def test_emoji_classes_and_labels(emoji_dir: Path) -> None:
    info = read_dataset_info(emoji_dir)
    rows = {row["id"]: row for row in read_all(emoji_dir)}

    assert info["tasks"]["skin_tone"] == SKIN_TONES
    assert len(info["tasks"]["category"]) == 9
    assert "Component" not in info["tasks"]["category"]
    for task, classes in info["tasks"].items():
        assert classes == sorted({row[task] for row in rows.values()})
    assert info["source"]["packages"][0]["version"] == "16.0.0"
    assert {package["license"] for package in info["source"]["packages"]} == {"MIT"}

    assert rows["google:1F44D-1F3FD"]["title"] == "thumbs up sign +1 thumbsup"
    assert rows["google:1F44D-1F3FD"]["skin_tone"] == "medium"
    assert rows["twitter:1F44D"]["skin_tone"] == "none"
    assert rows["twitter:1F44D"]["category"] == "People & Body"


def test_emoji_titles_never_mention_skin_tone(emoji_dir: Path) -> None:
    rows = read_all(emoji_dir)
    bases = fixture_bases()
    base_titles = {
        (row["id"].split(":")[0], bases[row["id"].split(":")[1]]): row["title"]
        for row in rows
        if row["skin_tone"] == "none"
    }

    assert not any(re.search(r"\b(skin|tone|fitzpatrick)\b", row["title"]) for row in rows)
    for row in rows:
        vendor, unified = row["id"].split(":")
        assert row["title"] == base_titles[vendor, bases[unified]]


def test_emoji_pictures_are_64px_rgb_png_on_white(emoji_dir: Path) -> None:
    table = read_split(emoji_dir, "val")
    white_corners = 0
    for data in table.column("image").to_pylist():
        assert data.startswith(PNG_SIGNATURE)
        picture = Image.open(io.BytesIO(data))
        assert picture.mode == "RGB" and picture.size == (64, 64)
        white_corners += picture.getpixel((0, 0)) == (255, 255, 255)
    assert white_corners > 0.8 * table.num_rows


def test_skin_tone_and_title_helpers() -> None:
    assert skin_tone_of("1F3FB") == "light"
    assert skin_tone_of("1F3FF") == "dark"
    assert skin_tone_of("1F3FC-1F3FC") == "medium-light"
    assert skin_tone_of("1F3FB-1F3FE") == "mixed"
    assert title_of({"name": "GRINNING FACE", "short_names": ["grinning"]}) == "grinning face"
    assert title_of({"name": "X", "short_names": ["thumbs_up", "+1"]}) == "x thumbs up +1"


def test_emoji_skips_corrupt_and_missing_pictures(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    shutil.copytree(FIXTURE, sources)
    pictures = sorted((sources / "google" / "img" / "google" / "64").glob("*.png"))
    corrupt, missing = pictures[0], pictures[1]
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    missing.unlink()

    info = build_emoji(tmp_path / "out", sources=[sources / "google", sources / "twitter"])

    assert info["rows_skipped"] == 2
    assert info["rows_read"] == sum(expected_fixture_rows().values())
    assert info["rows_read"] == sum(info["rows"].values()) + 2
    reasons = {Path(entry["file"]).name: entry for entry in info["skipped"]}
    assert reasons[missing.name]["reason"] == "image file missing"
    assert "truncated or corrupt" in reasons[corrupt.name]["reason"]
    assert all(entry["row"].startswith("google:") for entry in info["skipped"])
    assert read_dataset_info(tmp_path / "out") == info


def test_emoji_max_rows_keeps_whole_base_emoji_and_every_tone(
    emoji_dir: Path, tmp_path: Path
) -> None:
    info = build_emoji(tmp_path, sources=FIXTURE_SOURCES, max_rows=100)
    subset = {row["id"] for row in read_all(tmp_path)}
    full = {row["id"] for row in read_all(emoji_dir)}
    base_of = fixture_bases()

    assert 0 < len(subset) <= 100
    assert info["tasks"]["skin_tone"] == SKIN_TONES
    chosen = {base_of[identifier.split(":")[1]] for identifier in subset}
    assert subset == {i for i in full if base_of[i.split(":")[1]] in chosen}
    again = build_emoji(tmp_path / "again", sources=FIXTURE_SOURCES, max_rows=100)
    assert again["rows"] == info["rows"]
    assert {row["id"] for row in read_all(tmp_path / "again")} == subset


def test_emoji_reads_a_tarball_and_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    tarball = cache / "emoji-datasource-google-16.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(FIXTURE / "google", arcname="package")
    # no npm call may happen: the cached tarball must be found first
    monkeypatch.setattr(emoji_module.shutil, "which", lambda name: None)

    info = build_emoji(tmp_path / "out", vendors=["google"], cache_dir=cache)

    assert sum(info["rows"].values()) == expected_fixture_rows()["google"]
    assert (cache / "emoji-datasource-google-16.0.0" / "package" / "emoji.json").is_file()


def test_emoji_vendor_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no source for vendor 'twitter'"):
        build_emoji(tmp_path, vendors=["google", "twitter"], sources=[FIXTURE / "google"])
    with pytest.raises(ValueError, match="unsupported vendor"):
        build_emoji(tmp_path, vendors=["apple"], sources=[FIXTURE / "google"])


# build_from_table


@pytest.fixture
def table_rows(tmp_path: Path) -> list[dict[str, Any]]:
    """Manifest rows over pictures in ``tmp_path/pictures``: 7 good, 3 bad."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    colors = ["red", "green", "blue"]
    rows = []
    for index in range(7):
        picture = Image.new("RGB", (40, 20), (index * 30, 0, 0))
        name = f"good-{index}.png" if index % 2 else f"good-{index}.jpg"
        (pictures / name).write_bytes(png_bytes(picture) if index % 2 else jpeg_bytes(picture))
        rows.append(
            {
                "sku": f"sku-{index}",
                "path": f"pictures/{name}",
                "title": f"item {index}",
                "color": colors[index % 3],
                "size": None if index == 0 else ("small" if index < 4 else "large"),
            }
        )

    webp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(webp, format="WEBP")
    (pictures / "good-webp.webp").write_bytes(webp.getvalue())
    rows[-1]["path"] = "pictures/good-webp.webp"

    broken = png_bytes(noise())
    (pictures / "broken.png").write_bytes(broken[: len(broken) // 2])
    (pictures / "text.png").write_bytes(b"just some text, no picture")
    for name in ["broken.png", "text.png", "missing.png"]:
        rows.append(
            {
                "sku": f"bad-{name}",
                "path": f"pictures/{name}",
                "title": "bad",
                "color": "red",
                "size": "small",
            }
        )
    return rows


def write_manifest(rows: list[dict[str, Any]], path: Path) -> Path:
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        header = list(rows[0])
        lines = [",".join(header)] + [",".join(row[c] or "" for c in header) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_table_build(suffix: str, tmp_path: Path, table_rows: list[dict[str, Any]]) -> None:
    manifest = write_manifest(table_rows, tmp_path / f"manifest{suffix}")

    info = build_from_table(
        manifest,
        tmp_path / "out",
        image_column="path",
        title_column="title",
        task_columns=["color", "size"],
        id_column="sku",
    )

    assert info["rows_read"] == 10
    assert sum(info["rows"].values()) == 7
    assert info["rows_skipped"] == 3
    assert read_dataset_info(tmp_path / "out") == info
    skipped = {entry["row"]: entry for entry in info["skipped"]}
    assert set(skipped) == {"bad-broken.png", "bad-text.png", "bad-missing.png"}
    assert skipped["bad-missing.png"]["reason"] == "image file missing"
    assert skipped["bad-missing.png"]["file"] == str(tmp_path / "pictures" / "missing.png")
    assert "not a recognised image" in skipped["bad-text.png"]["reason"]
    assert info["tasks"] == {"color": ["blue", "green", "red"], "size": ["large", "small"]}

    rows = {row["id"]: row for row in read_all(tmp_path / "out")}
    assert rows["sku-0"]["size"] is None
    assert rows["sku-1"]["image"] == (tmp_path / "pictures" / "good-1.png").read_bytes()
    assert rows["sku-2"]["image"] == (tmp_path / "pictures" / "good-2.jpg").read_bytes()
    assert rows["sku-6"]["image"].startswith(PNG_SIGNATURE)
    assert pq.read_schema(shard_files(tmp_path / "out", "train")[0]).names == [
        "id",
        "image",
        "title",
        "color",
        "size",
        "split",
    ]


def test_table_ids_default_to_row_numbers_and_images_downscale(
    tmp_path: Path, table_rows: list[dict[str, Any]]
) -> None:
    manifest = write_manifest(table_rows[:7], tmp_path / "manifest.parquet")

    build_from_table(
        manifest,
        tmp_path / "out",
        image_column="path",
        title_column="title",
        task_columns=["color"],
        max_image_side=10,
    )

    rows = read_all(tmp_path / "out")
    assert sorted(row["id"] for row in rows) == [str(index) for index in range(7)]
    assert all(max(Image.open(io.BytesIO(row["image"])).size) <= 10 for row in rows)


def test_table_split_column(tmp_path: Path, table_rows: list[dict[str, Any]]) -> None:
    good = [{**row, "part": SPLITS[index % 3]} for index, row in enumerate(table_rows[:7])]
    manifest = write_manifest(good, tmp_path / "manifest.jsonl")
    arguments = {"image_column": "path", "title_column": "title", "task_columns": ["color"]}

    info = build_from_table(
        manifest, tmp_path / "out", split_column="part", id_column="sku", **arguments
    )

    assert info["rows"] == {"train": 3, "val": 2, "test": 2}
    bad = write_manifest([{**good[0], "part": "dev"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="'dev'.*train"):
        build_from_table(bad, tmp_path / "bad", split_column="part", **arguments)


def test_table_missing_column_is_a_clear_error(
    tmp_path: Path, table_rows: list[dict[str, Any]]
) -> None:
    manifest = write_manifest(table_rows, tmp_path / "manifest.csv")

    with pytest.raises(ValueError, match=r"no column\(s\) \['material'\].*'sku', 'path'"):
        build_from_table(
            manifest,
            tmp_path / "out",
            image_column="path",
            title_column="title",
            task_columns=["material"],
        )


# CLI


def test_cli_from_table(tmp_path: Path, table_rows: list[dict[str, Any]]) -> None:
    manifest = write_manifest(table_rows, tmp_path / "manifest.csv")
    out = tmp_path / "out"
    arguments = ["from-table", str(manifest), "--out", str(out), "--image-column", "path"]
    arguments += [
        "--title-column",
        "title",
        "--task",
        "color",
        "--task",
        "size",
        "--id-column",
        "sku",
    ]

    result = CliRunner().invoke(data_app, arguments)

    assert result.exit_code == 0, result.output
    assert re.search(r"skipped\s+3", result.output)
    assert read_dataset_info(out)["tasks"].keys() == {"color", "size"}


def test_cli_emoji(tmp_path: Path) -> None:
    arguments = ["emoji", "--out", str(tmp_path), "--max-rows", "60"]
    arguments += [item for source in FIXTURE_SOURCES for item in ("--from", str(source))]

    result = CliRunner().invoke(data_app, arguments)

    assert result.exit_code == 0, result.output
    for split in SPLITS:
        assert re.search(rf"{split}\s+\d+", result.output)
    assert sum(read_dataset_info(tmp_path)["rows"].values()) <= 60


def test_cli_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cmaclip.data.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "from-table" in result.stdout and "emoji" in result.stdout


def test_failed_rebuild_leaves_the_previous_build(tmp_path: Path) -> None:
    """Shards are staged and swapped in at close: an error mid-build loses no earlier data."""
    out = tmp_path / "shards"
    with ShardWriter(out, ["color"]) as writer:
        writer.add({"id": "a", "image": b"x", "title": "t", "color": "red"})
    before = sorted(path.name for path in out.iterdir() if path.suffix == ".parquet")

    with pytest.raises(ValueError, match="split must be one of"):
        with ShardWriter(out, ["color"]) as writer:
            writer.add({"id": "b", "image": b"y", "title": "u", "color": "blue"})
            writer.add({"id": "c", "image": b"z", "title": "v", "color": "red", "split": "Train"})

    after = sorted(path.name for path in out.iterdir() if path.suffix == ".parquet")
    assert after == before
    rows = pa.concat_tables(pq.read_table(out / name) for name in after).column("id").to_pylist()
    assert rows == ["a"]
