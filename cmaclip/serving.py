"""The Ray Serve application: an HTTP ingress, one batched encoder, one deployment per task head.

    client --HTTP--> Ingress (FastAPI: validate, decode, tokenize)
                       |--> Encoder (CLIP encoders + sequence-wise attention, @serve.batch) -> I, T
                       |--> head_<task> for each asked task, in parallel (modality-wise attention
                            + MLP, @serve.batch) -> probabilities, image weight

I and T are computed once per item whatever the number of tasks. Each head is its own
deployment built from a model folder, so adding, replacing or removing a task's head is an
edit of the Serve config's `heads` mapping; the encoder's arguments stay the same and Serve
leaves its replicas running.

`serve/config.yaml` runs this with `serve run serve/config.yaml`; `cmaclip serve` is the short
form for one model folder.
"""

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
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

logger = logging.getLogger(__name__)


# -- configuration -------------------------------------------------------------------------------


class ServeArgs(BaseModel):
    """The application's arguments (`args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model folder (runs/NAME/model) or MLflow URI (runs:/ID/model)")
    heads: dict[str, str | None] | None = Field(
        None,
        description="Tasks to serve, each from a model folder (null: from `model`). Default: "
        "every task of `model`. A head from another folder must share `model`'s encoders and "
        "fusion weights, e.g. a `tuning` run started from the same checkpoint.",
    )
    max_batch_size: int = Field(32, ge=1, description="Largest batch the encoder runs")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="Longest wait to fill a batch")
    max_batch_items: int = Field(64, ge=1, description="Most items in one /v1/classify/batch")
    max_body_bytes: int = Field(16 << 20, ge=1024, description="Largest request body")
    max_image_bytes: int = Field(8 << 20, ge=1024, description="Largest image file")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Largest width x height")
    torch_threads: int = Field(1, ge=1, description="torch threads in the encoder replica")


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


def _batch_options(config: dict[str, Any], method) -> None:
    method.set_max_batch_size(int(config.get("max_batch_size", 32)))
    method.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class Encoder:
    """CLIP encoders and sequence-wise attention: item inputs in, I and T out, in batches.

    The batch size and wait come from `user_config`, so changing them reconfigures the running
    replica instead of replacing it.
    """

    def __init__(self, model: str, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.model, _ = load_model(model)
        self.model.heads = torch.nn.ModuleDict()  # the heads live in their own deployments
        self.batch_sizes: Counter[int] = Counter()

    def reconfigure(self, config: dict[str, Any]) -> None:
        _batch_options(config, self.encode)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple]:
        self.batch_sizes[len(items)] += 1
        images = torch.from_numpy(np.stack([image for image, _ in items]))  # [B, 3, S, S]
        text = torch.from_numpy(np.stack([tokens for _, tokens in items]))  # [B, L]

        # a thread, so that the replica keeps queueing the next batch while this one runs
        image_embedding, text_embedding = await asyncio.to_thread(self._embed, images, text)
        return list(zip(image_embedding.numpy(), text_embedding.numpy(), strict=True))

    def _embed(self, images: torch.Tensor, text: torch.Tensor):
        with torch.no_grad():
            return self.model.embed(images, text)

    def stats(self) -> dict[int, int]:
        """How many batches of each size this replica has run."""
        return dict(self.batch_sizes)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
class TaskHead:
    """One task's modality-wise attention and MLP head."""

    def __init__(self, model: str, task: str):
        torch.set_num_threads(1)
        self.scorer = TaskScorer.from_folder(model, task)

    def reconfigure(self, config: dict[str, Any]) -> None:
        _batch_options(config, self.score)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def score(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple]:
        image_embedding = torch.from_numpy(np.stack([image for image, _ in items]))  # [B, W]
        text_embedding = torch.from_numpy(np.stack([text for _, text in items]))  # [B, W]
        probabilities, image_weight = self.scorer(image_embedding, text_embedding)
        return list(zip(probabilities.numpy(), image_weight.numpy(), strict=True))


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


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    """HTTP in, JSON out. Validation and decoding happen here, before any model is called."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        heads: dict[str, DeploymentHandle],
        info: dict[str, Any],
        args: dict[str, Any],
    ):
        self.encoder, self.heads, self.info = encoder, heads, info
        self.args = ServeArgs.model_validate(args)
        self.preparer = ItemPreparer(info["input"], max_pixels=self.args.max_image_pixels)

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

    async def _answer(self, prepared, tasks: list[str], top_k: int) -> dict[str, Any]:
        # a batched method takes one argument per item, hence the tuples
        embeddings = await self.encoder.encode.remote((prepared.image, prepared.text))
        scores = await asyncio.gather(
            *(self.heads[task].score.remote(embeddings) for task in tasks)
        )
        answers = {}
        for task, (probabilities, image_weight) in zip(tasks, scores, strict=True):
            described = self.info["tasks"][task]
            answers[task] = task_answer(
                probabilities, image_weight, described["classes"], described["threshold"], top_k
            )
        return {"tasks": answers, **prepared.notes}


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
            "classes": source_meta["tasks"][task],
            "threshold": thresholds(source_meta).get(task),
            "source": str(folder),
        }
    return described


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder that `serve run` / `serve deploy` call with the config's args."""
    parsed = ServeArgs.model_validate(args)
    started = time.perf_counter()
    model = resolve_model(parsed.model)
    meta = read_meta(model)
    heads = _describe_heads(parsed, model)
    info = {
        "model_version": model_version(model),
        "input": meta["input"],
        "tasks": heads,
    }
    batching = {
        "max_batch_size": parsed.max_batch_size,
        "batch_wait_timeout_s": parsed.batch_wait_timeout_s,
    }

    encoder = Encoder.options(user_config=batching).bind(str(model), parsed.torch_threads)
    head_handles = {
        task: TaskHead.options(
            name=f"head_{task}",
            user_config={"max_batch_size": parsed.max_batch_size, "batch_wait_timeout_s": 0.002},
        ).bind(described["source"], task)
        for task, described in heads.items()
    }
    logger.info("application for %s (%s), heads %s, built in %.1fs", model, info["model_version"],
                list(heads), time.perf_counter() - started)  # fmt: skip
    return Ingress.bind(encoder, head_handles, info, parsed.model_dump())
