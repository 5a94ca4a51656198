"""The Ray Serve application over real HTTP: endpoints, every 4xx rule, parity, batching."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.etree import ElementTree

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cmaclip.config import ModelConfig
from cmaclip.data.shards import read_dataset_info, shard_files
from cmaclip.export import META, save_model
from cmaclip.model.cmaclip import CMACLIP
from cmaclip.predict import Predictor
from cmaclip.serving import ENCODER_APP, ServeArgs, _describe_heads
from cmaclip.serving import serve_environment as serve_environment_for

pytestmark = pytest.mark.slow

THRESHOLDS = {"category": 0.0, "subcategory": None, "skin_tone": 0.99}
CLIENTS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(size: tuple[int, int] = (40, 30), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 50_000) -> bytes:
    """A valid PNG header that claims side x side pixels, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


TINY = {"clip": {"name": "cmaclip-tiny"}, "width": 128, "layers": 1, "heads": 4, "dropout": 0.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, emoji_shards) -> Path:
    torch.manual_seed(0)
    model = CMACLIP(ModelConfig.model_validate(TINY), read_dataset_info(emoji_shards)["tasks"])
    folder = tmp_path_factory.mktemp("served") / "model"
    return save_model(model, folder, {"run": "served", "thresholds": {"precision_0.9": THRESHOLDS}})


@pytest.fixture(scope="module")
def rows(emoji_shards) -> list[dict]:
    table = pq.read_table(shard_files(emoji_shards, "test")[0], columns=["id", "image", "title"])
    return table.slice(0, 6).to_pylist()


@pytest.fixture(scope="module")
def serve_environment():
    """HAProxy in front of the ingress, as `cmaclip serve` has it; set before `ray_cluster`."""
    environment = serve_environment_for(own_haproxy=True)
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    yield environment
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(environment["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


@pytest.fixture(scope="module")
def server(serve_environment, ray_cluster, model_dir):
    from ray import serve

    from cmaclip.serving import run_local

    args = {"model": str(model_dir), "max_batch_items": 8, "max_body_bytes": 2 << 20,
            "max_image_bytes": 1 << 20, "max_image_pixels": 4_000_000}  # fmt: skip
    url = run_local(args, port=_free_port())
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client
    serve.shutdown()


def test_health_and_tasks(server, model_dir):
    assert server.get("/healthz").json()["status"] == "ok"

    described = server.get("/v1/tasks").json()
    assert described["model_version"].startswith("served-")
    assert list(described["tasks"]) == ["category", "subcategory", "skin_tone"]
    meta = json.loads((model_dir / META).read_text())
    for task, info in described["tasks"].items():
        assert info["classes"] == meta["tasks"][task]
        assert info["threshold"] == THRESHOLDS[task]

    paths = server.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/classify/batch", "/v1/tasks", "/healthz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/classify"]["post"]["requestBody"]["content"]
    batch = paths["/v1/classify/batch"]["post"]["requestBody"]["content"]["application/json"]
    assert "title" in batch["schema"]["properties"]["items"]["items"]["properties"]


def test_served_probabilities_equal_offline_prediction(server, model_dir, rows):
    predictor = Predictor(model_dir)
    items = [(row["title"], row["image"]) for row in rows]
    items += [
        (rows[0]["title"], None),
        (None, rows[1]["image"]),
        ("lorem " * 200, rows[2]["image"]),
    ]
    offline = predictor.predict(items, top_k=100)

    for (title, image), expected in zip(items, offline, strict=True):
        body = {"title": title, "image": _b64(image) if image else None, "top_k": 100}
        response = server.post("/v1/classify", json=body)
        assert response.status_code == 200, response.text
        served = response.json()
        for task, answer in expected["tasks"].items():
            got = served["tasks"][task]
            assert got["label"] == answer["label"]
            want = {entry["label"]: entry["probability"] for entry in answer["top_k"]}
            have = {entry["label"]: entry["probability"] for entry in got["top_k"]}
            assert have.keys() == want.keys()
            assert max(abs(have[k] - want[k]) for k in want) < 1e-5
            assert abs(got["image_weight"] - answer["image_weight"]) < 1e-5
        assert served.get("missing") == expected.get("missing")
        assert served.get("title_truncated") == expected.get("title_truncated")

    # what the notes say about the three odd items
    assert offline[-3]["missing"]["modality"] == "image"
    assert offline[-2]["missing"]["modality"] == "title"
    assert offline[-1]["title_truncated"] is True


def test_abstention_follows_the_stored_thresholds(server, rows):
    answer = server.post("/v1/classify", json={"title": rows[0]["title"]}).json()["tasks"]
    assert answer["category"]["abstained"] is False  # threshold 0: always answers
    assert answer["subcategory"]["abstained"] is True  # no threshold reached 90% precision
    assert answer["skin_tone"]["abstained"] is (answer["skin_tone"]["probability"] < 0.99)
    assert len(answer["category"]["top_k"]) == 3


def test_multipart_upload_and_task_subset(server, rows):
    row = rows[0]
    as_json = server.post(
        "/v1/classify",
        json={"title": row["title"], "image": _b64(row["image"]), "tasks": ["category"]},
    ).json()
    as_form = server.post(
        "/v1/classify",
        files={"image": ("item.png", row["image"], "image/png")},
        data={"title": row["title"], "tasks": "category"},
    )
    assert as_form.status_code == 200, as_form.text
    assert list(as_form.json()["tasks"]) == ["category"]
    assert as_form.json()["tasks"] == as_json["tasks"]


def test_batch_endpoint_matches_single_items(server, rows):
    items = [{"title": row["title"], "image": _b64(row["image"])} for row in rows[:4]]
    batch = server.post("/v1/classify/batch", json={"items": items, "tasks": ["skin_tone"]})
    assert batch.status_code == 200, batch.text
    answers = batch.json()["items"]
    assert len(answers) == 4
    for item, answer in zip(items, answers, strict=True):
        single = server.post("/v1/classify", json={**item, "tasks": ["skin_tone"]}).json()
        assert answer["tasks"]["skin_tone"]["label"] == single["tasks"]["skin_tone"]["label"]
        assert answer["tasks"]["skin_tone"]["probability"] == pytest.approx(
            single["tasks"]["skin_tone"]["probability"], abs=1e-5
        )


JSON = {"content-type": "application/json"}
FILE = {"other": ("a.txt", b"b")}


@pytest.mark.parametrize(
    ("name", "request_kwargs", "status", "says"),
    [
        ("malformed json", {"content": b'{"title": ', "headers": JSON}, 422, "json"),
        ("no title and no image", {"json": {}}, 422, "title"),
        ("unknown field", {"json": {"title": "x", "colour": "red"}}, 422, "colour"),
        ("title of the wrong type", {"json": {"title": 5}}, 422, "title"),
        ("top_k of zero", {"json": {"title": "x", "top_k": 0}}, 422, "top_k"),
        ("base64 that does not decode", {"json": {"image": "@@not base64@@"}}, 400, "base64"),
        ("bytes that are no image", {"json": {"image": _b64(b"plain text")}}, 400, "image"),
        ("truncated png", {"json": {"image": _b64(_png()[:60])}}, 400, "image"),
        ("decompression bomb", {"json": {"image": _b64(_bomb_png())}}, 413, "pixels"),
        ("image over the byte limit", {"json": {"image": _b64(b"0" * 1_100_000)}}, 413, "limit"),
        ("body over the limit", {"content": b" " * (3 << 20), "headers": JSON}, 413, "limit"),
        ("image given as a URL", {"json": {"image": "https://example.com/a.png"}}, 400, "base64"),
        ("unknown task", {"json": {"title": "x", "tasks": ["colour"]}}, 404, "colour"),
        ("image sent as a form field", {"data": {"image": "abc"}, "files": FILE}, 422, "file"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_4xx(server, name, request_kwargs, status, says):
    response = server.post("/v1/classify", **request_kwargs)
    assert response.status_code == status, (name, response.text)
    assert says in json.dumps(response.json()["detail"]).lower(), (name, response.text)


def test_bad_batches_get_a_clear_4xx(server, rows):
    too_many = {"items": [{"title": "x"}] * 9}
    assert server.post("/v1/classify/batch", json=too_many).status_code == 413

    broken = {"items": [{"title": "x"}, {"image": _b64(b"nope")}]}
    response = server.post("/v1/classify/batch", json=broken)
    assert response.status_code == 400
    assert "items[1]" in response.json()["detail"]

    assert server.post("/v1/classify/batch", json={"items": []}).status_code == 422


def test_concurrent_requests_are_batched(server, rows):
    from ray import serve

    encoder = serve.get_deployment_handle("Encoder", ENCODER_APP)
    before = encoder.stats.remote().result()
    body = {"title": rows[0]["title"], "image": _b64(rows[0]["image"]), "tasks": ["category"]}

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(
            pool.map(lambda _: server.post("/v1/classify", json=body).status_code, range(96))
        )
    assert statuses == [200] * 96

    after = encoder.stats.remote().result()
    new_batches = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * count for size, count in new_batches.items()) == 96
    assert max(size for size, count in new_batches.items() if count) > 1, new_batches


def test_cli_predict_prints_the_offline_answer(model_dir, rows, tmp_path):
    (tmp_path / "item.png").write_bytes(rows[0]["image"])
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps({"title": rows[0]["title"], "image": "item.png"})
        + "\n"
        + json.dumps({"title": "x"})
        + "\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "cmaclip.cli", "predict", "--model", model_dir, "--input", items],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    expected = Predictor(model_dir).predict([(rows[0]["title"], rows[0]["image"]), ("x", None)])
    assert len(printed) == 2
    for got, want in zip(printed, expected, strict=True):
        for task in want["tasks"]:
            assert got["tasks"][task]["label"] == want["tasks"][task]["label"]
            assert np.isclose(got["tasks"][task]["probability"], want["tasks"][task]["probability"])


def test_heads_from_another_model_must_share_the_encoder(model_dir, tmp_path):
    from cmaclip.export import load_model

    # a head tuned on the same encoder and fusion weights is accepted
    same, meta = load_model(model_dir)
    torch.nn.init.normal_(same.heads["category"].mlp[-1].weight)
    tuned = save_model(same, tmp_path / "tuned", {"run": "tuned"})
    heads = _describe_heads(
        ServeArgs(model=str(model_dir), heads={"category": str(tuned), "skin_tone": None}),
        model_dir,
    )
    assert list(heads) == ["category", "skin_tone"]
    assert heads["category"]["folder"] == str(tuned)
    assert heads["category"]["source"] == "tuned"

    # a head trained on other encoder weights is refused, naming the task
    other = CMACLIP(ModelConfig.model_validate(TINY), meta["tasks"])
    foreign = save_model(other, tmp_path / "foreign", {"run": "foreign"})
    with pytest.raises(ValueError, match="heads.category.*other encoder or fusion weights"):
        _describe_heads(
            ServeArgs(model=str(model_dir), heads={"category": str(foreign)}), model_dir
        )
    with pytest.raises(ValueError, match="no task 'colour'"):
        _describe_heads(ServeArgs(model=str(model_dir), heads={"colour": None}), model_dir)


# -- under faults: fuzzed requests, and a replica killed under load (these run last) ------------


def test_requests_generated_from_the_openapi_schema_never_get_a_5xx(server, tmp_path):
    """Schemathesis sends valid and invalid requests built from /openapi.json to every route."""
    report = tmp_path / "schemathesis.xml"
    result = subprocess.run(
        [
            Path(sys.executable).parent / "schemathesis", "run",
            f"{server.base_url}/openapi.json",
            "--checks", "not_a_server_error", "--mode", "all", "--max-examples", "25",
            "--seed", "7", "--phases", "examples,coverage,fuzzing", "--workers", "2",
            "--report-junit-path", report,
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]

    # every operation was exercised, none failed
    cases = ElementTree.parse(report).getroot().iter("testcase")
    operations = {case.get("name"): case for case in cases}
    assert {"POST /v1/classify", "POST /v1/classify/batch", "GET /v1/tasks"} <= set(operations)
    assert not any(case.find("failure") is not None for case in operations.values())


def test_a_killed_encoder_replica_is_replaced_without_failing_requests(server, rows):
    """The encoder's only replica dies mid-load: calls in flight are sent again, none fail."""
    from ray import serve

    encoder = serve.get_deployment_handle("Encoder", app_name=ENCODER_APP)
    victim = encoder.describe.remote().result()
    body = {"title": rows[0]["title"], "image": _b64(rows[0]["image"])}
    answers: list[tuple[float, int]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.base_url, timeout=120) as own:
            while not stop.is_set():
                status = own.post("/v1/classify", json=body).status_code
                answers.append((time.monotonic(), status))

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        for _ in range(CLIENTS):
            pool.submit(client)
        _wait_for(lambda: len(answers) >= 20, "answers before the kill")

        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        replacement = _wait_for(
            lambda: (r := encoder.describe.remote().result())["pid"] != victim["pid"] and r,
            "a replacement replica",
        )
        _wait_for(lambda: sum(t > killed_at for t, _ in answers) >= 40, "answers after the kill")
        stop.set()

    statuses = Counter(status for _, status in answers)
    after = Counter(status for t, status in answers if t > killed_at)
    # at most the requests in flight could be lost; the retry in the ingress loses none of them
    assert set(statuses) == {200}, statuses
    assert after[200] >= 40
    assert replacement["replica"] != victim["replica"]


def _wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
