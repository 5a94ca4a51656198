"""The Ray Serve service: an HTTP ingress, one batched encoder, one deployment per task head.

    client --HTTP--> HAProxy --> Ingress (FastAPI: validate, decode, tokenize; chunks requests)
                       |--> Encoder (CLIP encoders + sequence-wise attention, @serve.batch) -> I, T
                       |--> head_<task> for each asked task, in parallel (modality-wise attention
                            + MLP, @serve.batch) -> probabilities, image weight

I and T are computed once per item whatever the number of tasks. The encoder is an application
of its own (`cmaclip-encoder`, no HTTP route) and the ingress with the heads is another
(`cmaclip`): Serve redeploys an application whose arguments change, so adding, replacing or
removing a head (the `heads` argument of `cmaclip`) restarts the small ingress and heads and
leaves the encoder's replicas running.

`serve/config.yaml` runs both with `serve run serve/config.yaml`; `cmaclip serve` is the short
form for one model folder.
"""

import asyncio
import logging
import os
import socket
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.types import Message

from cmaclip import __version__
from cmaclip.data.images import DEFAULT_MAX_PIXELS
from cmaclip.export import load_model, read_meta
from cmaclip.predict import (
    ItemError,
    ItemPreparer,
    TaskScorer,
    decode_base64,
    model_version,
    resolve_model,
    task_answer,
    thresholds,
    weights_digest,
)
from cmaclip.tracking import peak_rss_mib

logger = logging.getLogger(__name__)


# -- configuration -------------------------------------------------------------------------------


ENCODER_APP = "cmaclip-encoder"
MODEL_HELP = "Model folder (runs/NAME/model) or MLflow URI (runs:/ID/model)"

# Serve's own HTTP proxy, a Python actor, costs about as much CPU per request as the model itself
# on a small machine (the proxy, plus actor calls between it and the ingress for every request).
# With HAProxy on the HTTP port (Ray's high-throughput mode; the binary comes with ray[serve])
# a request goes straight to an HTTP server inside the ingress replica. Serve reads these when
# each Ray process starts: they belong in the environment of `ray start` or of the `ray.init`
# that starts a local cluster (see `serve_environment`), not in a deployment's options.
SERVE_ENVIRONMENT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # its default of 4 threads is meant for larger machines
}


class EncoderArgs(BaseModel):
    """The encoder application's arguments (`args:` of `cmaclip-encoder` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description=MODEL_HELP)
    max_batch_size: int = Field(32, ge=1, description="Largest batch the encoder runs, in items")
    batch_wait_timeout_s: float = Field(
        0.002,
        ge=0,
        description="Longest wait to fill a batch; short, since chunks come whole from an ingress",
    )
    torch_threads: int = Field(1, ge=1, description="torch threads in the encoder replica")


class ServeArgs(BaseModel):
    """The HTTP application's arguments (`args:` of `cmaclip` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description=MODEL_HELP + "; the encoder application must serve the same")
    encoder_app: str = Field(ENCODER_APP, description="Name of the encoder application")
    heads: dict[str, str | None] | None = Field(
        None,
        description="Tasks to serve, each from a model folder (null: from `model`). Default: "
        "every task of `model`. A head from another folder must share `model`'s encoders and "
        "fusion weights, e.g. a `tuning` run started from the same checkpoint.",
    )
    max_batch_size: int = Field(32, ge=1, description="Largest chunk sent to encoder and heads")
    chunks_in_flight: int = Field(
        1,
        ge=1,
        description="Chunks the ingress has at the encoder at once. 1 makes the largest chunks "
        "(every request that arrived meanwhile); more keep the encoder fed between chunks but "
        "split the same requests into smaller chunks, which cost more calls per item",
    )
    max_batch_items: int = Field(64, ge=1, description="Most items in one /v1/classify/batch")
    max_body_bytes: int = Field(16 << 20, ge=1024, description="Largest request body")
    max_image_bytes: int = Field(8 << 20, ge=1024, description="Largest image file")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Largest width x height")


# -- request and response schemas ----------------------------------------------------------------


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, description="The product title")
    image: str | None = Field(None, description="The image file's bytes as base64")


class ClassifyRequest(Item):
    tasks: list[str] | None = Field(None, description="Tasks to answer; default: all")
    top_k: int = Field(3, ge=1, le=100, description="How many labels to list per task")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(min_length=1)
    tasks: list[str] | None = None
    top_k: int = Field(3, ge=1, le=100)


# -- deployments ---------------------------------------------------------------------------------


def _rows(chunks: list[tuple[np.ndarray, ...]]) -> int:
    """The batch size of a list of chunks: their rows, not their number."""
    return sum(len(chunk[0]) for chunk in chunks)


def _batch_options(config: dict[str, Any], method) -> None:
    method.set_max_batch_size(int(config.get("max_batch_size", 32)))
    method.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.002)))


def _split(array: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1])


@serve.deployment(
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 1},
    logging_config={"enable_access_log": False},  # one line per call would cost more than a head
)
class Encoder:
    """CLIP encoders and sequence-wise attention: item inputs in, I and T out, in batches.

    Callers send chunks of items (an ingress replica's own batch); chunks from every ingress
    replica are batched again here, up to `max_batch_size` items. The batch size and wait come
    from `user_config`, so changing them reconfigures the running replica instead of replacing
    it.
    """

    def __init__(self, model: str, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.model, _ = load_model(model)
        self.model.heads = torch.nn.ModuleDict()  # the heads live in their own deployments
        self.version = model_version(model)
        self.batch_sizes: Counter[int] = Counter()
        self.max_batch_size = 32

    def reconfigure(self, config: dict[str, Any]) -> None:
        _batch_options(config, self.encode)
        self.max_batch_size = int(config.get("max_batch_size", 32))

    def describe(self) -> dict[str, Any]:
        """What the ingress checks, and which replica process answered (for operators)."""
        return {
            "model_version": self.version,
            "max_batch_size": self.max_batch_size,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
        }

    # Limitation: on 2 CPUs this replica's one torch thread bounds the service (165 to 180
    # requests/s with the emoji model at 32 clients). Between two chunks it waits about 15 ms
    # for its answer to go back through the ingress and the next chunk to come in, and the
    # other replicas sharing its core take about 15% of its compute time, so it computes about
    # 80% of the time and a quarter of the two cores stays idle.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=_rows)
    async def encode(self, chunks: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple]:
        sizes = [len(images) for images, _ in chunks]
        self.batch_sizes[sum(sizes)] += 1
        images = torch.from_numpy(np.concatenate([images for images, _ in chunks]))  # [B,3,S,S]
        text = torch.from_numpy(np.concatenate([text for _, text in chunks]))  # [B, L]

        # a thread, so that the replica keeps queueing the next batch while this one runs
        image_embedding, text_embedding = await asyncio.to_thread(self._embed, images, text)
        return list(
            zip(
                _split(image_embedding.numpy(), sizes),
                _split(text_embedding.numpy(), sizes),
                strict=True,
            )
        )

    def _embed(self, images: torch.Tensor, text: torch.Tensor):
        with torch.no_grad():
            return self.model.embed(images, text)

    def stats(self) -> dict[int, int]:
        """How many batches of each size (in items) this replica has run."""
        return dict(self.batch_sizes)

    def peak_memory_mib(self) -> float:
        """This replica's peak resident memory: weights, torch's buffers and request queues."""
        return peak_rss_mib()


@serve.deployment(
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0.1},
    logging_config={"enable_access_log": False},
)
class TaskHead:
    """One task's modality-wise attention and MLP head, on chunks of (I, T)."""

    def __init__(self, model: str, task: str):
        torch.set_num_threads(1)
        self.scorer = TaskScorer.from_folder(model, task)

    def reconfigure(self, config: dict[str, Any]) -> None:
        _batch_options(config, self.score)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=_rows)
    async def score(self, chunks: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple]:
        sizes = [len(image) for image, _ in chunks]
        image_embedding = torch.from_numpy(np.concatenate([image for image, _ in chunks]))
        text_embedding = torch.from_numpy(np.concatenate([text for _, text in chunks]))
        probabilities, image_weight = self.scorer(image_embedding, text_embedding)  # [B,C], [B]
        return list(
            zip(
                _split(probabilities.numpy(), sizes),
                _split(image_weight.numpy(), sizes),
                strict=True,
            )
        )


api = FastAPI(
    title="CMA-CLIP attribute classification",
    version=__version__,
    description="Multi-task classification of product images and titles.",
)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with nested models inlined, to sit inside OpenAPI's requestBody."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


def _parse(model: type[BaseModel], body: bytes):
    """Validate a JSON body; errors become FastAPI's usual 422, without echoing the input."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False, include_input=False)) from None


def _item_error(error: ItemError, where: str = "") -> HTTPException:
    return HTTPException(status_code=error.status, detail=f"{where}{error}")


class _Chunker:
    """Requests that arrive while earlier chunks are at the encoder, sent on as one chunk.

    `@serve.batch` cuts a batch when its wait ends whether or not the previous batch has come
    back, and its batches then queue one behind the other: under load they stay near one item
    and every item pays for one call to the encoder and one per head. Here a chunk leaves when
    one of `in_flight` slots at the encoder is free, with every request queued by then (up to
    `max_size`): one item without waiting when the service is idle, large chunks when it is
    busy. A chunk gives its slot back as soon as the encoder has answered (`first`), so the
    encoder is fed the next chunk while the heads score this one (`then`).
    Defined before `Ingress` for the reason given in `_call`.
    """

    def __init__(
        self,
        first: Callable[[list], Awaitable[Any]],
        then: Callable[[list, Any], Awaitable[list]],
        *,
        max_size: int,
        in_flight: int,
    ):
        self.first, self.then = first, then
        self.max_size, self.in_flight = max_size, in_flight
        self.queue: deque[tuple[Any, asyncio.Future]] = deque()
        self.running = 0
        self.tasks: set[asyncio.Task] = set()

    async def submit(self, request: Any) -> Any:
        """The request's answer, computed in whichever chunk the request lands in."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self.queue and self.running < self.in_flight:
            chunk = [self.queue.popleft() for _ in range(min(self.max_size, len(self.queue)))]
            self.running += 1
            task = asyncio.create_task(self._run(chunk))
            self.tasks.add(task)  # a reference, so that the task is not collected mid-flight
            task.add_done_callback(self.tasks.discard)

    async def _run(self, chunk: list[tuple[Any, asyncio.Future]]) -> None:
        requests = [request for request, _ in chunk]
        try:
            try:
                partial = await self.first(requests)
            finally:
                self.running -= 1
                self._start()
            answers = await self.then(requests, partial)
        except Exception as error:  # every request of the chunk gets the error, e.g. a 503
            for _, future in chunk:
                if not future.done():  # a client that hung up has cancelled its future
                    future.set_exception(error)
        else:
            for (_, future), answer in zip(chunk, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


async def _call(method, *args, retries: int = 2):
    """Call a replica; when it dies with the call in flight, send the call again.

    Defined before `Ingress`: Serve pickles the ingress class when the decorators run, and a
    module-level name the class uses must already exist then.

    Encoder and heads compute pure functions of their inputs, so a second call is safe, and
    Serve routes it to a live replica, or holds it until the replacement is up. Only a call
    whose every try met a dying replica fails, as a 503 that the client may retry.
    """
    for attempt in range(retries + 1):
        try:
            return await method.remote(*args)
        except RayActorError as error:
            logger.warning("a replica died during a call (try %d of %d): %s", attempt + 1,
                           retries + 1, type(error).__name__)  # fmt: skip
    raise HTTPException(503, f"the model's replicas died {retries + 1} times; retry later")


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    """HTTP in, JSON out. Validation and decoding happen here, before any model is called."""

    def __init__(self, heads: dict[str, DeploymentHandle], info: dict[str, Any], args: dict):
        self.heads, self.info = heads, info
        self.args = ServeArgs.model_validate(args)
        self.encoder = serve.get_deployment_handle("Encoder", app_name=self.args.encoder_app)
        self.encoder_checked = False
        self.preparer = ItemPreparer(info["input"], max_pixels=self.args.max_image_pixels)
        self.chunker = _Chunker(
            self._encode,
            self._score,
            max_size=self.args.max_batch_size,
            in_flight=self.args.chunks_in_flight,
        )

    # -- endpoints ---------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model_version": self.info["model_version"]}

    @api.get("/v1/tasks")
    async def tasks(self) -> dict[str, Any]:
        return {"model_version": self.info["model_version"], "tasks": self.info["tasks"]}

    @api.post(
        "/v1/classify",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _schema(ClassifyRequest)},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "title": {"type": "string"},
                                "image": {"type": "string", "format": "binary"},
                                "tasks": {"type": "string", "description": "comma-separated"},
                                "top_k": {"type": "integer"},
                            },
                        }
                    },
                },
            }
        },
    )
    async def classify(self, request: Request) -> dict[str, Any]:
        """Classify one item, sent as JSON (image in base64) or as a multipart upload."""
        body = await self._read_body(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            title, image, tasks, top_k = await self._read_form(request, body)
        else:
            parsed = _parse(ClassifyRequest, body)
            title, tasks, top_k = parsed.title, parsed.tasks, parsed.top_k
            image = self._decode(parsed.image)

        tasks = self._check_tasks(tasks)
        try:
            prepared = self.preparer.prepare(title, image)
        except ItemError as error:
            raise _item_error(error) from None
        answer = await self._answer(prepared, tasks, top_k)
        return {"model_version": self.info["model_version"], **answer}

    @api.post(
        "/v1/classify/batch",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _schema(BatchRequest)}},
            }
        },
    )
    async def classify_batch(self, request: Request) -> dict[str, Any]:
        """Classify up to `max_batch_items` items; a bad item fails the call and is named."""
        batch = _parse(BatchRequest, await self._read_body(request))
        if len(batch.items) > self.args.max_batch_items:
            raise HTTPException(
                413, f"{len(batch.items)} items; the limit is {self.args.max_batch_items}"
            )
        tasks = self._check_tasks(batch.tasks)
        prepared = []
        for i, item in enumerate(batch.items):
            try:
                prepared.append(self.preparer.prepare(item.title, self._decode(item.image, i)))
            except ItemError as error:
                raise _item_error(error, f"items[{i}].") from None
        answers = await asyncio.gather(*(self._answer(p, tasks, batch.top_k) for p in prepared))
        return {"model_version": self.info["model_version"], "items": list(answers)}

    # -- steps -------------------------------------------------------------------------------

    def _decode(self, image: str | None, index: int | None = None) -> bytes | None:
        if image is None:
            return None
        try:
            data = decode_base64(image, max_bytes=self.args.max_image_bytes)
        except ItemError as error:
            raise _item_error(error, "" if index is None else f"items[{index}].") from None
        return data

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, refused with 413 as soon as it passes `max_body_bytes`."""
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = HTTPException(413, f"request body is larger than the limit of {limit} bytes")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read_form(self, request: Request, body: bytes) -> tuple:
        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as error:  # starlette raises its own parse errors for a broken body
            raise HTTPException(400, f"multipart body does not parse: {error}") from None
        title = form.get("title")
        upload = form.get("image")
        image = None
        if upload is not None:
            if isinstance(upload, str):
                raise HTTPException(422, "image: send the image as a file part")
            image = await upload.read(self.args.max_image_bytes + 1)
            if len(image) > self.args.max_image_bytes:
                raise HTTPException(
                    413, f"image: larger than the limit of {self.args.max_image_bytes} bytes"
                )
        if title is not None and not isinstance(title, str):
            raise HTTPException(422, "title: send the title as a text field")
        tasks_field = form.get("tasks")
        tasks = (
            [t.strip() for t in str(tasks_field).split(",") if t.strip()] if tasks_field else None
        )
        try:
            top_k = int(form.get("top_k") or 3)
        except ValueError:
            raise HTTPException(422, "top_k: not an integer") from None
        if not 1 <= top_k <= 100:
            raise HTTPException(422, "top_k: must be between 1 and 100")
        return title, image, tasks, top_k

    def _check_tasks(self, tasks: list[str] | None) -> list[str]:
        if not tasks:
            return list(self.heads)
        unknown = [task for task in tasks if task not in self.heads]
        if unknown:
            raise HTTPException(404, f"unknown task(s) {unknown}; served tasks: {list(self.heads)}")
        return list(dict.fromkeys(tasks))

    async def _check_encoder(self) -> None:
        """Once: the encoder application must serve this application's model."""
        described = await self.encoder.describe.remote()
        if described["model_version"] != self.info["model_version"]:
            raise HTTPException(
                503,
                f"the encoder application {self.args.encoder_app!r} serves model "
                f"{described['model_version']}, this application {self.info['model_version']}; "
                f"deploy both with the same `model`",
            )
        # a chunk larger than the encoder's batch would be refused by its batch queue
        self.chunker.max_size = min(self.args.max_batch_size, described["max_batch_size"])
        self.encoder_checked = True

    async def _answer(self, prepared, tasks: list[str], top_k: int) -> dict[str, Any]:
        if not self.encoder_checked:
            await self._check_encoder()
        probabilities, image_weight = await self.chunker.submit((prepared, tuple(tasks)))
        answers = {}
        for task in tasks:
            described = self.info["tasks"][task]
            answers[task] = task_answer(
                probabilities[task],
                image_weight[task],
                described["classes"],
                described["threshold"],
                top_k,
            )
        return {"tasks": answers, **prepared.notes}

    async def _encode(self, requests: list[tuple[Any, tuple[str, ...]]]) -> tuple:
        """A chunk of requests (see `_Chunker`) through the encoder, in one call.

        Sending chunks rather than single items keeps the number of calls between replicas per
        chunk, not per item, which matters once the model itself is fast.
        """
        images = np.stack([prepared.image for prepared, _ in requests])  # [n, 3, S, S]
        text = np.stack([prepared.text for prepared, _ in requests])  # [n, L]
        return await _call(self.encoder.encode, (images, text))

    async def _score(self, requests: list[tuple[Any, tuple[str, ...]]], embeddings: tuple):
        """The chunk's I and T through each asked task's head, the heads in parallel."""
        tasks = list(dict.fromkeys(task for _, asked in requests for task in asked))
        scores = await asyncio.gather(
            *(_call(self.heads[task].score, embeddings) for task in tasks)
        )
        return [
            (
                {task: scores[k][0][i] for k, task in enumerate(tasks) if task in asked},
                {task: float(scores[k][1][i]) for k, task in enumerate(tasks) if task in asked},
            )
            for i, (_, asked) in enumerate(requests)
        ]


# -- the application -----------------------------------------------------------------------------


def _describe_heads(args: ServeArgs, model: Path) -> dict[str, dict[str, Any]]:
    """Where each served head comes from; refuse a head whose shared weights differ."""
    meta = read_meta(model)
    wanted = args.heads if args.heads is not None else dict.fromkeys(meta["tasks"])
    if not wanted:
        raise ValueError("heads: serve at least one task")

    shared = None
    described = {}
    for task, source in wanted.items():
        folder = resolve_model(source) if source else model
        source_meta = meta if folder == model else read_meta(folder)
        if task not in source_meta["tasks"]:
            raise ValueError(
                f"heads.{task}: {folder} has no task {task!r} (it has {list(source_meta['tasks'])})"
            )
        if folder != model:
            shared = shared or weights_digest(model)
            if weights_digest(folder) != shared:
                raise ValueError(
                    f"heads.{task}: {folder} was trained on other encoder or fusion weights than "
                    f"{model}; its head would read embeddings it never saw"
                )
        described[task] = {
            "folder": str(folder),
            "classes": source_meta["tasks"][task],
            "threshold": thresholds(source_meta).get(task),
            "source": source_meta.get("run", folder.name),  # a run name, not a server path
        }
    return described


def build_encoder(args: dict[str, Any]) -> serve.Application:
    """Builder of the encoder application (`cmaclip-encoder`)."""
    parsed = EncoderArgs.model_validate(args)
    model = resolve_model(parsed.model)
    read_meta(model)  # a clear error here rather than in a replica that keeps restarting
    batching = {
        "max_batch_size": parsed.max_batch_size,
        "batch_wait_timeout_s": parsed.batch_wait_timeout_s,
    }
    return Encoder.options(user_config=batching).bind(str(model), parsed.torch_threads)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Builder of the HTTP application (`cmaclip`): the ingress and one deployment per head."""
    parsed = ServeArgs.model_validate(args)
    started = time.perf_counter()
    model = resolve_model(parsed.model)
    meta = read_meta(model)
    heads = _describe_heads(parsed, model)
    head_handles = {
        task: TaskHead.options(
            name=f"head_{task}",
            user_config={"max_batch_size": parsed.max_batch_size, "batch_wait_timeout_s": 0.002},
        ).bind(described.pop("folder"), task)
        for task, described in heads.items()
    }
    info = {"model_version": model_version(model), "input": meta["input"], "tasks": heads}
    logger.info("application for %s (%s), heads %s, built in %.1fs", model, info["model_version"],
                list(heads), time.perf_counter() - started)  # fmt: skip
    return Ingress.bind(head_handles, info, parsed.model_dump())


def serve_environment(*, own_haproxy: bool = False) -> dict[str, str]:
    """`SERVE_ENVIRONMENT`, where every variable already set in this process wins.

    HAProxy keeps its config, admin socket and state under /tmp/haproxy-serve and serves stats
    and metrics on fixed ports, one set per machine. Two Ray clusters on one machine (a test
    suite next to a running service) each need their own: `own_haproxy` gives this one a new
    folder under /tmp and free ports.

        os.environ.update(serve_environment())
        ray.init()
    """
    environment = {name: os.environ.get(name, value) for name, value in SERVE_ENVIRONMENT.items()}
    if own_haproxy:
        # short: HAProxy refuses an admin socket path over 97 characters, and Ray puts the
        # socket in a folder of its own (56 characters) below this one
        folder = Path(tempfile.mkdtemp(prefix="haproxy-", dir="/tmp"))
        environment |= {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        }
    return environment


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_local(args: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy both applications on the connected Ray cluster; returns the service's URL.

    `args` holds the keys of both applications' arguments (see `EncoderArgs`, `ServeArgs`).
    """
    encoder_args = {key: value for key, value in args.items() if key in EncoderArgs.model_fields}
    app_args = {key: value for key, value in args.items() if key in ServeArgs.model_fields}
    unknown = set(args) - set(encoder_args) - set(app_args)
    if unknown:
        raise ValueError(f"unknown serving option(s) {sorted(unknown)}")

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_encoder(encoder_args), name=ENCODER_APP, route_prefix=None)
    serve.run(build_app(app_args), name="cmaclip", route_prefix="/")
    return f"http://{host}:{port}"
