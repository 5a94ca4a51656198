"""A corpus of bad rows, each kind made here, through building, training input and evaluation.

For every kind the three ways in must agree: an odd but valid picture or title is used, a
broken one is skipped and counted with its reason, and a broken shard stops the job with a
message naming the file. Rows read = rows used + rows skipped everywhere, and an error budget
stops a build, a decoding actor or an evaluation whose data is mostly broken. No Ray here except
the last test, which runs the same corpus through Ray Data's decoding actors.
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cmaclip.cli import main as cli_main
from cmaclip.config import load_config
from cmaclip.data.pipeline import BUDGET_MIN_ROWS, InputSpec, Preprocessor, local_batches
from cmaclip.data.shards import (
    SPLITS,
    SkippedRows,
    TooManySkippedError,
    make_dataset_info,
    read_dataset_info,
    shard_files,
    shard_schema,
    write_dataset_info,
)
from cmaclip.data.table import build_from_table
from cmaclip.evaluate import evaluate_model
from cmaclip.export import input_spec
from cmaclip.model.cmaclip import CMACLIP

TASKS = {"color": ["blue", "green", "red"], "size": ["large", "small"]}
SPEC = InputSpec("cmaclip-tiny", 64, 32, TASKS)
SOT, EOT = 49406, 49407  # open_clip's start and end-of-text tokens
LONG_TITLE = " ".join(f"word{index % 977}" for index in range(14_000))[:100_000]
GOOD_ROWS = 8
PIL_LIMIT = Image.MAX_IMAGE_PIXELS


# -- the corpus -----------------------------------------------------------------------------------


def _save(image: Image.Image, kind: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def _noise(size: int = 48) -> Image.Image:
    """Pixels that compress badly, so that half of the file is half of the picture."""
    return Image.frombytes("RGB", (size, size), random.Random(1).randbytes(size * size * 3))


def _bomb(side: int = 40_000) -> bytes:
    """A 100-byte PNG whose header claims side x side pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _sixteen_bit() -> bytes:
    image = Image.new("I;16", (6, 4))
    image.putdata([index * 2800 for index in range(24)])
    return _save(image, "PNG")


def _palette() -> bytes:
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.putdata([0, 1] * 8)
    return _save(image, "PNG", transparency=0)


def _rgba() -> bytes:
    image = Image.new("RGBA", (5, 5), (200, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    return _save(image, "PNG")


def _gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), color) for color in [(250, 0, 0), (0, 0, 250)]]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _good_image(index: int = 0) -> bytes:
    return _save(Image.new("RGB", (24, 16), (index * 20, 90, 160)), "PNG")


@dataclass(frozen=True)
class Kind:
    """One kind of bad row: how to make it, and what must become of it.

    `outcome` is `used` (the row is read like any other) or `skipped` (left out, counted, and
    named with `reason`). `built` is the outcome when building from a manifest, where it differs.
    """

    image: Callable[[], bytes] = _good_image
    title: str | bytes = "a good title"
    labels: dict[str, str | None] | None = None
    outcome: str = "used"
    reason: str = ""
    built: str | None = None


KINDS = {
    "truncated-png": Kind(lambda: _truncated(_save(_noise(), "PNG")), outcome="skipped",
                          reason="image: truncated or corrupt PNG data"),
    "truncated-jpeg": Kind(lambda: _truncated(_save(_noise(), "JPEG", quality=95)),
                           outcome="skipped", reason="image: truncated or corrupt JPEG data"),
    "not-an-image": Kind(lambda: b"%PDF-1.4 this is a document, not a picture" * 3,
                         outcome="skipped", reason="image: bytes are not a recognised image"),
    "zero-bytes": Kind(lambda: b"", outcome="skipped", reason="image: empty image bytes"),
    "decompression-bomb": Kind(_bomb, outcome="skipped",
                               reason="image: image header claims too many pixels"),
    "wide-picture": Kind(lambda: _save(Image.new("RGB", (400, 10)), "PNG"), outcome="skipped",
                         reason="image: aspect ratio of 400x10 exceeds 20:1"),
    "one-pixel": Kind(lambda: _save(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG")),
    "16-bit": Kind(_sixteen_bit),
    "palette": Kind(_palette),
    "cmyk": Kind(lambda: _save(Image.new("CMYK", (8, 8), (0, 200, 0, 0)), "JPEG")),
    "grayscale": Kind(lambda: _save(Image.new("L", (7, 3), 77), "PNG")),
    "rgba": Kind(_rgba),
    "animated-gif": Kind(_gif),
    "empty-title": Kind(title=""),
    "long-title": Kind(title=LONG_TITLE),
    "invalid-utf8-title": Kind(title=b"caf\xe9 cr\xe8me", outcome="skipped",
                               reason="title: not valid UTF-8 (invalid continuation byte at "
                                      "byte 3)"),
    "null-label": Kind(labels={"color": None, "size": "large"}),
    # a build takes its classes from the manifest, so there a new value is simply a new class
    "unknown-label": Kind(labels={"color": "purple", "size": "small"}),
}  # fmt: skip
SKIPPED = sorted(name for name, kind in KINDS.items() if kind.outcome == "skipped")


def _labels(kind: Kind, index: int) -> dict[str, str | None]:
    return kind.labels or {"color": TASKS["color"][index % 3], "size": TASKS["size"][index % 2]}


def _good_rows() -> list[dict[str, Any]]:
    return [
        {"id": f"good-{index}", "image": _good_image(index), "title": f"item {index} blue",
         **_labels(Kind(), index)}
        for index in range(GOOD_ROWS)
    ]  # fmt: skip


def _corpus_row(name: str) -> dict[str, Any]:
    kind = KINDS[name]
    return {"id": name, "image": kind.image(), "title": kind.title, **_labels(kind, 0)}


def write_shards(folder: Path, rows: list[dict[str, Any]], *, split: str = "test") -> Path:
    """Shards as some other tool might write them: bytes as given, titles not checked for UTF-8.

    `ShardWriter` would refuse a title that is not text, so the columns are built here, and the
    title column is raw bytes viewed as strings, as Arrow would read them from such a file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    schema = shard_schema(list(TASKS))
    titles = [r["title"].encode() if isinstance(r["title"], str) else r["title"] for r in rows]
    columns = {
        "id": pa.array([row["id"] for row in rows], pa.string()),
        "image": pa.array([row["image"] for row in rows], pa.binary()),
        "title": pa.array(titles, pa.binary()).view(pa.string()),
        **{task: pa.array([row[task] for row in rows], pa.string()) for task in TASKS},
        "split": pa.array([split] * len(rows), pa.string()),
    }
    pq.write_table(pa.table(columns, schema=schema), folder / f"{split}-00000.parquet")
    info = make_dataset_info(
        name="corpus",
        classes=TASKS,
        rows={split: len(rows)},
        rows_read=len(rows),
        skipped=SkippedRows(),
        source={"kind": "test corpus"},
    )
    write_dataset_info(folder, info)
    return folder


def write_manifest(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """A CSV manifest and its pictures; titles are written as bytes, whatever they are."""
    pictures = folder / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    lines = [b"sku,path,title,color,size"]
    for row in rows:
        (pictures / f"{row['id']}.img").write_bytes(row["image"])
        title = row["title"].encode() if isinstance(row["title"], str) else row["title"]
        cells = [row["id"].encode(), f"pictures/{row['id']}.img".encode(), title]
        cells += [(row[task] or "").encode() for task in TASKS]
        lines.append(b",".join(cells))
    manifest = folder / "manifest.csv"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest


def build(manifest: Path, out: Path, **options: Any) -> dict[str, Any]:
    return build_from_table(
        manifest, out, image_column="path", title_column="title", task_columns=list(TASKS),
        id_column="sku", **options,
    )  # fmt: skip


def preprocessed(folder: Path, split: str = "test") -> dict[str, Any]:
    """Every row of a split through the training input's `Preprocessor`, batch by batch."""
    batches = list(local_batches(folder, split, SPEC, batch_size=5))
    return {
        key: np.concatenate([batch[key] for batch in batches])
        for key in ("id", "images", "text", "labels", "valid", "unknown_labels", "error")
    }


# -- each kind, three ways in -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(KINDS))
def test_building_uses_or_skips_each_kind(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    manifest = write_manifest(tmp_path, [*_good_rows(), _corpus_row(name)])

    info = build(manifest, tmp_path / "out")

    written = {
        row["id"]: row
        for split in SPLITS
        if info["rows"][split]
        for path in shard_files(tmp_path / "out", split)
        for row in pq.read_table(path).to_pylist()
    }
    assert info["rows_read"] == GOOD_ROWS + 1
    assert info["rows_read"] == sum(info["rows"].values()) + info["rows_skipped"]
    outcome = kind.built or kind.outcome
    if outcome == "skipped":
        assert name not in written and info["rows_skipped"] == 1
        (entry,) = info["skipped"]
        assert entry["row"] == name
        assert entry["file"] == str(tmp_path / "pictures" / f"{name}.img")
        # the builder names the column for text, and the picture's problem without a prefix
        expected = kind.reason.removeprefix("image: ").replace("title:", "column 'title' is")
        assert entry["reason"].startswith(expected)
    else:
        assert info["rows_skipped"] == 0
        assert written[name]["title"] == kind.title
        stored = Image.open(io.BytesIO(written[name]["image"]))
        assert stored.format in {"PNG", "JPEG"}
        if name == "unknown-label":
            assert "purple" in info["tasks"]["color"]
        if name == "null-label":
            assert written[name]["color"] is None


@pytest.mark.parametrize("name", list(KINDS))
def test_training_input_uses_or_skips_each_kind(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    folder = write_shards(tmp_path, [*_good_rows(), _corpus_row(name)])

    batch = preprocessed(folder)

    row = list(batch["id"]).index(name)
    assert len(batch["id"]) == GOOD_ROWS + 1
    assert batch["valid"].sum() == GOOD_ROWS + (kind.outcome == "used")
    if kind.outcome == "skipped":
        assert not batch["valid"][row]
        assert batch["error"][row].startswith(kind.reason)
        assert not batch["images"][row].any()
        assert Image.MAX_IMAGE_PIXELS == PIL_LIMIT  # the bomb was refused without lifting it
        return

    assert batch["valid"][row] and batch["error"][row] == ""
    assert np.isfinite(batch["images"][row]).all() and batch["images"][row].std() > 0
    text = batch["text"][row]
    assert text[0] == SOT and text.argmax() == int(np.flatnonzero(text == EOT)[0])
    if name == "empty-title":
        assert text[:3].tolist() == [SOT, EOT, 0]
    if name == "long-title":
        # cut to the context, and the end-of-text token the text embedding is read at comes last
        assert text[-1] == EOT and text.argmax() == SPEC.context_length - 1
        assert (text[1:-1] != 0).all()
    if name == "null-label":
        assert batch["labels"][row].tolist() == [-1, TASKS["size"].index("large")]
    if name == "unknown-label":
        assert batch["labels"][row].tolist() == [-1, TASKS["size"].index("small")]
        assert batch["unknown_labels"][row] == 1


def test_odd_pictures_decode_to_what_they_show(tmp_path: Path) -> None:
    """Transparency on white, the first frame of a GIF, 16 bits scaled down, CMYK as RGB."""
    folder = write_shards(tmp_path, [_corpus_row(name) for name in KINDS if name != "long-title"])
    batch = preprocessed(folder)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's normalisation
    std = np.array([0.26862954, 0.26130258, 0.27577711])

    def colour(name: str) -> np.ndarray:
        """The picture's centre pixel back in 0-255 RGB."""
        pixels = batch["images"][list(batch["id"]).index(name)]
        return (pixels[:, 32, 32] * std + mean) * 255

    np.testing.assert_allclose(colour("one-pixel"), [9, 99, 199], atol=3)
    np.testing.assert_allclose(colour("grayscale"), [77, 77, 77], atol=3)
    np.testing.assert_allclose(colour("animated-gif"), [250, 0, 0], atol=12)
    np.testing.assert_allclose(colour("cmyk"), [255, 55, 255], atol=12)
    assert colour("16-bit").max() < 256 and colour("16-bit").min() > 0


def test_evaluation_over_the_whole_corpus(tmp_path: Path, tiny_model_config) -> None:
    """One evaluation over every row kind: each broken row is skipped, counted and named."""
    folder = write_shards(tmp_path, [*_good_rows(), *(_corpus_row(name) for name in KINDS)])
    torch.manual_seed(0)
    model = CMACLIP(tiny_model_config, TASKS).eval()
    assert input_spec(model) == SPEC

    report = evaluate_model(model, folder, split="test").report

    assert report["rows_read"] == GOOD_ROWS + len(KINDS)
    assert report["rows_used"] + report["rows_skipped"] == report["rows_read"]
    assert report["rows_skipped"] == len(SKIPPED)
    assert sorted(entry["row"] for entry in report["skipped"]) == SKIPPED
    for entry in report["skipped"]:
        assert entry["file"] == str(folder / "test-00000.parquet")
        assert entry["reason"].startswith(KINDS[entry["row"]].reason)
    assert report["unknown_labels"] == 1
    # the null and the unknown colour add no support; every other used row has both labels
    assert report["tasks"]["color"]["support"] == report["rows_used"] - 2
    assert report["tasks"]["size"]["support"] == report["rows_used"]


# -- shards that are broken as a whole --------------------------------------------------------


def _rewrite(folder: Path, change: Callable[[pa.Table], pa.Table]) -> Path:
    path = folder / "test-00000.parquet"
    pq.write_table(change(pq.read_table(path)), path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda table: table.drop_columns(["title"]), r"missing column\(s\) \['title'\]"),
        (
            lambda table: table.set_column(2, "title", pa.array(range(table.num_rows))),
            r"column 'title' is int64, expected string",
        ),
        (
            lambda table: table.set_column(1, "image", pa.array(["x"] * table.num_rows)),
            r"column 'image' is string, expected binary",
        ),
    ],
    ids=["missing-column", "title-of-numbers", "image-as-text"],
)
def test_a_broken_shard_stops_training_input_and_evaluation(
    change, message: str, tmp_path: Path, tiny_model_config
) -> None:
    folder = write_shards(tmp_path, _good_rows())
    path = _rewrite(folder, change)

    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {message}"):
        preprocessed(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {message}"):
        evaluate_model(CMACLIP(tiny_model_config, TASKS), folder, split="test")


def test_a_shard_not_counted_in_dataset_json_is_refused(tmp_path: Path) -> None:
    folder = write_shards(tmp_path, _good_rows())
    pq.write_table(pq.read_table(folder / "test-00000.parquet"), folder / "test-00001.parquet")

    shards = r"test shards \['test-00000.parquet', 'test-00001.parquet'\]"
    with pytest.raises(ValueError, match=rf"{shards} hold 16 rows, but .*dataset.json counts 8"):
        preprocessed(folder)


# -- the error budget -------------------------------------------------------------------------


def test_a_build_where_every_row_is_skipped_fails_and_keeps_the_previous_data_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    build(write_manifest(tmp_path / "good", _good_rows()), out)
    before = read_dataset_info(out)
    broken = [_corpus_row(name) for name in SKIPPED if name != "invalid-utf8-title"]
    manifest = write_manifest(tmp_path / "bad", broken)

    arguments = ["data", "from-table", str(manifest), "--out", str(out), "--task", "color"]
    arguments += ["--image-column", "path", "--title-column", "title", "--id-column", "sku"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(arguments)

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"error: building {out} from {manifest}: all {len(broken)} rows read were skipped" in (
        error
    )
    assert "truncated-jpeg: truncated or corrupt JPEG data" in error
    assert read_dataset_info(out) == before


def test_a_mostly_broken_build_is_refused_unless_the_budget_allows_it(tmp_path: Path) -> None:
    rows = _good_rows()[:3] + [_corpus_row(name) for name in SKIPPED[:4]]
    manifest = write_manifest(tmp_path, rows)

    with pytest.raises(TooManySkippedError, match=r"4 of 7 rows skipped \(57.1%\), more than "
                                                  r"--max-skipped-fraction=0.5"):  # fmt: skip
        build(manifest, tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.json").exists()

    info = build(manifest, tmp_path / "out", max_skipped_fraction=0.6)
    assert (info["rows_read"], info["rows_skipped"]) == (7, 4)


def _mostly_broken_rows() -> list[dict[str, Any]]:
    """Two training rows in three with a truncated picture, more than a decoder's first 256."""
    good, bad = _good_image(), _truncated(_save(_noise(), "PNG"))
    return [
        {"id": f"r{index}", "image": good if index % 3 == 0 else bad, "title": "t",
         "color": "red", "size": "small"}
        for index in range(BUDGET_MIN_ROWS + 64)
    ]  # fmt: skip


def test_mostly_broken_training_input_stops_its_decoding_actor(tmp_path: Path) -> None:
    rows = _mostly_broken_rows()
    folder = write_shards(tmp_path, rows)

    with pytest.raises(TooManySkippedError, match=r"test \(after 256 rows\): 170 of 256 rows "
                                                  r"skipped .*data.max_skipped_fraction=0.5"
                                                  r".*row r1: image: truncated"):  # fmt: skip
        list(local_batches(folder, "test", SPEC, batch_size=64))

    # a budget that allows it reads everything and counts it
    preprocess = Preprocessor(SPEC, max_skipped_fraction=0.7)
    skipped = (~preprocess(pq.read_table(folder / "test-00000.parquet"))["valid"]).sum()
    assert (preprocess.rows_read, preprocess.rows_skipped) == (len(rows), skipped)


def test_a_mostly_broken_evaluation_is_refused(tmp_path: Path, tiny_model_config) -> None:
    """Fewer rows than the streaming budget needs: the evaluation's own count stops it."""
    rows = _good_rows()[:2] + [_corpus_row(name) for name in SKIPPED]
    folder = write_shards(tmp_path, rows)
    model = CMACLIP(tiny_model_config, TASKS)

    counts = f"{len(SKIPPED)} of {len(rows)} rows skipped"
    first = re.escape(f"first reasons: test-00000.parquet row {SKIPPED[0]}: ")
    with pytest.raises(TooManySkippedError, match=rf"evaluating .* test: {counts}.*; {first}"):
        evaluate_model(model, folder, split="test")
    report = evaluate_model(model, folder, split="test", max_skipped_fraction=0.9).report
    assert (report["rows_read"], report["rows_used"]) == (len(rows), 2)
    assert report["rows_skipped"] == len(SKIPPED)

    # the linear probe baseline of an ablation is fitted under the same budget
    from cmaclip.baselines import LinearProbe

    with pytest.raises(TooManySkippedError, match=rf"linear probe on .* test: {counts}"):
        LinearProbe(model.encoders, SPEC).fit(folder, split="test")


def test_the_budget_and_training_values_are_validated() -> None:
    assert load_config(None).data.max_skipped_fraction == 0.5
    for override, message in [
        ("data.max_skipped_fraction=1.5", "less than or equal to 1"),
        ("stages.warmup.lr=.inf", "stages.warmup.lr: Input should be a finite number"),
        ("stages.tuning.weight_decay=.nan", "finite number"),
        ("data.loss_weights.color=-1", "data.loss_weights.color: Input should be greater than"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(None, [override])


# -- known gaps of the builder, closed --------------------------------------------------------


def test_a_duplicate_id_after_a_broken_first_copy_is_kept(tmp_path: Path) -> None:
    """The first copy's picture is broken: the second copy is written, the third is a repeat."""
    (tmp_path / "broken.img").write_bytes(b"")
    (tmp_path / "good.img").write_bytes(_good_image())
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "sku,path,title,color,size\n"
        "dup,broken.img,first,red,small\n"
        "a,good.img,other,red,small\n"
        "b,good.img,other,red,small\n"
        "dup,good.img,second,blue,large\n"
        "dup,good.img,third,green,small\n"
    )

    info = build(manifest, tmp_path / "out")

    assert (info["rows_read"], sum(info["rows"].values()), info["rows_skipped"]) == (5, 3, 2)
    assert [(entry["row"], entry["reason"]) for entry in info["skipped"]] == [
        ("dup", "empty image bytes"),
        ("dup", "duplicate id (manifest row 5)"),
    ]
    written = [
        row for split in SPLITS if info["rows"][split]
        for path in shard_files(tmp_path / "out", split) for row in pq.read_table(path).to_pylist()
    ]  # fmt: skip
    assert [row["title"] for row in written if row["id"] == "dup"] == ["second"]


def test_manifest_rows_are_counted_from_one(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, _good_rows()[:3])
    lines = manifest.read_text().split("\n")
    lines[1] = "," + lines[1].partition(",")[2]  # the first row loses its id
    manifest.write_text("\n".join(lines))

    info = build(manifest, tmp_path / "out")

    assert info["skipped"][0]["row"] == "manifest row 1"
    assert info["skipped"][0]["reason"] == "empty id"


def test_text_that_is_not_utf8_in_json_and_parquet_manifests(tmp_path: Path) -> None:
    """Arrow reads both without checking the text; the row is skipped and the column named."""
    rows = [
        {"sku": f"s{index}", "path": "pictures/good-0.img", "title": f"item {index}",
         "color": "red", "size": "small"}
        for index in range(4)
    ]  # fmt: skip
    write_manifest(tmp_path, _good_rows()[:1])
    jsonl = tmp_path / "manifest.jsonl"
    lines = [json.dumps(row).encode() for row in rows]
    lines[2] = lines[2].replace(b"item 2", b"item \xff")
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    table = pa.table({key: pa.array([row[key] for row in rows]) for key in rows[0]})
    sizes = pa.array([b"small", b"sm\xc3all", b"large", b"large"], pa.binary())
    parquet = tmp_path / "manifest.parquet"
    pq.write_table(table.set_column(4, "size", sizes), parquet)

    from_json = build(jsonl, tmp_path / "json")
    from_parquet = build(parquet, tmp_path / "parquet")

    assert [(e["row"], e["reason"]) for e in from_json["skipped"]] == [
        ("s2", "column 'title' is not valid UTF-8 (invalid start byte at byte 5)")
    ]
    assert [(e["row"], e["reason"]) for e in from_parquet["skipped"]] == [
        ("s1", "column 'size' is not valid UTF-8 (invalid continuation byte at byte 2)")
    ]
    assert from_parquet["tasks"]["size"] == ["large", "small"]


# -- the same corpus through Ray Data's decoding actors ---------------------------------------


@pytest.mark.slow
def test_ray_data_decoding_actors_count_the_corpus_like_evaluation(
    tmp_path: Path, ray_cluster
) -> None:
    from cmaclip.data.pipeline import ray_dataset

    folder = write_shards(tmp_path, [*_good_rows(), *(_corpus_row(name) for name in KINDS)])

    rows = ray_dataset(folder, "test", SPEC).select_columns(["id", "valid", "error"]).take_all()

    assert len(rows) == GOOD_ROWS + len(KINDS)
    skipped = {row["id"]: row["error"] for row in rows if not row["valid"]}
    assert sorted(skipped) == SKIPPED
    assert all(skipped[name].startswith(KINDS[name].reason) for name in SKIPPED)


@pytest.mark.slow
def test_a_worker_preprocessing_its_own_batches_counts_the_corpus_like_the_actors(
    tmp_path: Path, ray_cluster
) -> None:
    from cmaclip.data.pipeline import TENSOR_COLUMNS, ray_dataset
    from cmaclip.training.loop import PreprocessCollate

    folder = write_shards(tmp_path, [*_good_rows(), *(_corpus_row(name) for name in KINDS)])
    collate = PreprocessCollate(SPEC, max_skipped_fraction=0.9, where=f"{folder} test")

    # the path of `data.preprocess_in: worker`: shard rows streamed as read, collated in place
    rows = ray_dataset(folder, "test", SPEC, preprocess=False).iterator()
    batches = list(rows.iter_torch_batches(batch_size=4, collate_fn=collate))

    assert set(batches[0]) == set(TENSOR_COLUMNS)
    valid = torch.cat([batch["valid"] for batch in batches])
    assert len(valid) == GOOD_ROWS + len(KINDS) == collate.preprocess.rows_read
    assert int((~valid).sum()) == len(SKIPPED) == collate.preprocess.rows_skipped
    for reason in collate.preprocess.reasons:  # "row <id>: image: <why>", the first three
        name = reason.split(":")[0].removeprefix("row ")
        assert name in SKIPPED and KINDS[name].reason in reason


def _run_data(folder: Path, train_rows: list[dict[str, Any]]) -> Path:
    """Train, val and test shards, the last two all good, with one `dataset.json` over them."""
    splits = {"train": train_rows, "val": _good_rows(), "test": _good_rows()}
    for split, rows in splits.items():
        write_shards(folder, rows, split=split)
    counts = {split: len(rows) for split, rows in splits.items()}
    info = make_dataset_info(
        name="corpus", classes=TASKS, rows=counts, rows_read=sum(counts.values()),
        skipped=SkippedRows(), source={"kind": "test corpus"},
    )  # fmt: skip
    write_dataset_info(folder, info)
    return folder


def _one_stage_run(folder: Path, root: Path, name: str, *extra: str):
    return load_config(
        None,
        [f"data.path={folder}", f"run.root={root}", f"run.name={name}", "model.layers=1",
         "stages.contrastive.enabled=false", "stages.end_to_end.enabled=false",
         "stages.tuning.enabled=false", "stages.warmup.batch_size=16",
         "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
         "data.preprocess_cpus=0.25", *extra],
    )  # fmt: skip


@pytest.mark.slow
def test_a_training_run_reads_its_budget_from_the_config(tmp_path: Path, ray_cluster) -> None:
    from cmaclip.training.run import _datasets

    rows = _mostly_broken_rows()
    folder = _run_data(tmp_path, rows)

    def train_rows(budget: str) -> int:
        config = load_config(None, [f"data.path={folder}", f"data.max_skipped_fraction={budget}"])
        return len(_datasets(config, SPEC)["train"].take_all())

    with pytest.raises(Exception, match=r"data.max_skipped_fraction=0.5"):
        train_rows("0.5")
    assert train_rows("0.7") == len(rows)  # every row read, the broken ones marked not valid


@pytest.mark.slow
@pytest.mark.parametrize("preprocess_in", ["worker", "actors"])
def test_a_training_split_too_small_for_the_decoders_budget_still_has_one(
    preprocess_in: str, tmp_path: Path, ray_cluster
) -> None:
    from cmaclip.training.run import train

    bad = _truncated(_save(_noise(), "PNG"))
    rows = [
        {"id": f"r{index}", "image": bad, "title": "t", "color": "red", "size": "small"}
        for index in range(40)
    ]  # fmt: skip
    folder = _run_data(tmp_path / "data", rows)
    config = _one_stage_run(folder, tmp_path, preprocess_in, f"data.preprocess_in={preprocess_in}")

    # 40 rows are below the 256 a decoder reads before it applies the budget: the epoch's
    # totals over all workers apply it instead (32 rows in two batches of 16; 8 held back)
    with pytest.raises(TooManySkippedError) as caught:
        train(config)
    message = str(caught.value)
    assert message.startswith(f"stage warmup: {folder} train, epoch 1: all 32 rows read were")
    if preprocess_in == "worker":  # the worker decoded them, so it can name them
        assert "first reasons: row r" in message and "truncated" in message


@pytest.mark.slow
def test_a_decoding_actors_budget_error_reaches_the_user_whole(tmp_path: Path, ray_cluster) -> None:
    from cmaclip.training.run import train

    folder = _run_data(tmp_path / "data", _mostly_broken_rows())
    config = _one_stage_run(folder, tmp_path, "actors-budget", "data.preprocess_in=actors")

    # raised in a Ray Data actor, passed on by the split coordinator as text, then by Ray Train
    with pytest.raises(TooManySkippedError) as caught:
        train(config)
    message = str(caught.value)
    assert message.startswith(f"stage warmup: {folder} train (after {BUDGET_MIN_ROWS} rows): ")
    assert "more than data.max_skipped_fraction=0.5; first reasons: row r1: image: " in message
    assert "\n" not in message
