"""The HTTP side of ``graft serve``: the try page, the prediction API and the review page.

FastAPI for the routes and the OpenAPI schema (its ``/docs`` page is off: it loads its script
from a CDN, and the server must work offline). Every page asset is a file of this package,
served from a fixed list. The schema tells the truth: every status a route answers with is
declared with its body, no 422 (validation errors are 400s with one readable sentence), the
review routes declare their token. The token, Host and Origin checks happen before any route in
``graftkit.serve.guard``; uploads are bounded in count, bytes and pixels, and decoded by
graftkit's own decoder one image per core at a time, so a burst of large images cannot take the
machine's memory.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations at run time,
# and some name models made inside ``create_app`` (the class names of this run).
import asyncio
import io
import os
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Body, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, create_model
from starlette.concurrency import run_in_threadpool

from graftkit.serve.browser import add_routes as add_browser_routes
from graftkit.serve.guard import TOKEN_HEADER
from graftkit.serve.journal import KEY_PATTERN, SPAN_PATTERN
from graftkit.serve.review import ReviewError

ASSETS = {"graft.css": "text/css", "try.js": "text/javascript", "review.js": "text/javascript",
          "inbox.js": "text/javascript", "refit.js": "text/javascript",
          "common.js": "text/javascript"}
THUMBNAIL = 256  # px, side of a review thumbnail
ACTION_ID = r"^[A-Za-z0-9_-]{1,64}$"


class BadUpload(Exception):
    """An upload that is not an image graftkit can read: a 400 that names the file."""


def decode_upload(name: str, data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """One upload through ``load_image``, or ``BadUpload`` with the reason."""
    from PIL import Image

    from graftkit.data.images import ImageTooLarge, load_image

    if not data:
        raise BadUpload(f"{name}: empty file")
    try:
        return load_image(io.BytesIO(data), size, max_pixels)
    except (ImageTooLarge, Image.DecompressionBombError) as exc:
        raise BadUpload(f"{name}: too many pixels ({exc}; this server decodes at most "
                        f"{max_pixels:,}, see graft serve --max-pixels)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on hostile input
        reason = "not an image graftkit can read (JPEG, PNG, BMP, GIF or WebP)" \
            if isinstance(exc, Image.UnidentifiedImageError) \
            else f"unreadable image ({type(exc).__name__}: {exc})"
        raise BadUpload(f"{name}: {reason}") from None


def page(name: str) -> str:
    return resources.files("graftkit.serve").joinpath("static", name).read_text(encoding="utf-8")


# --- what the API answers, as the schema declares it ---------------------------------------


class Error(BaseModel):
    detail: str = Field(description="what went wrong and what to do")


class ClosestOut(BaseModel):
    label: str
    similarity: float = Field(description="cosine similarity of the model's features")
    name: str = Field(description="the training image's file name")
    thumbnail: str = Field(description="a base64 JPEG, 64 px")


class PredictionOut(BaseModel):
    path: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    known: bool
    ood_score: float | None
    labels: list[str] | None = Field(
        None, description="multi-label runs: the labels above their thresholds, most likely first")
    probabilities: dict[str, float] | None = Field(
        None, description="multi-label runs: every label's probability")
    heatmaps: dict[str, str] | None = Field(
        None, description="explain=1: label -> where the model looked for it, a base64 RGBA "
                          "PNG (96 px) to lay over the image")
    closest: list[ClosestOut] | None = Field(
        None, description="explain=1: the training images most like this one (null: the run "
                          "keeps none)")


class Predictions(BaseModel):
    predictions: list[PredictionOut]


class Health(BaseModel):
    status: Literal["ok", "stuck"]
    waiting_images: int
    waiting_requests: int
    oldest_wait_s: float
    model_call_s: float


class OpenSetInfo(BaseModel):
    method: str
    threshold: float


class BatchingInfo(BaseModel):
    max_batch: int
    max_wait_ms: float
    model_calls: int
    images: int


class BrowserInfo(BaseModel):
    available: bool = Field(description="/browser/ runs the run's ONNX export in the browser")
    why_not: str | None = Field(description="what is missing, and how to add it")


class Info(BaseModel):
    run: str
    classes: list[str]
    backbone: str | None
    image_size: int
    val_accuracy: float | None
    balanced_accuracy: float | None
    task: Literal["single_label", "multi_label"]
    val_map: float | None = Field(description="multi-label runs: validation mAP")
    open_set: OpenSetInfo | None
    max_upload_mb: float
    max_files: int
    max_pixels: int
    batching: BatchingInfo
    browser: BrowserInfo


class Action(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    time: str
    action: Literal["relabel", "set_aside", "accept", "undo", "edit"]
    key: str
    from_: str = Field(alias="from")
    to: str
    undoes: list[str] | str | None = None
    table: str | None = Field(None, description="edit: the table whose row changed")
    before: list[str] | None = Field(None, description="edit: the image's labels before")
    after: list[str] | None = Field(None, description="edit: the image's labels after")


class ReviewItem(BaseModel):
    key: str
    path: str
    split: str
    label: str
    now: str
    status: str
    predicted: str | None
    probability: float | None
    loss: float | None
    why: list[str]
    suggested: str | None = Field(description="the label issues' suggested class")
    p_suggested: float | None
    p_given: float | None
    rank: int | None = Field(description="1: the likeliest wrong label")
    image: bool
    undo: str | None = Field(description="the image's last move, to undo it")
    moves: int = Field(description="moves that stand between the image and where it was listed")
    labels: list[str] | None = Field(description="table data: the labels its row holds now")
    editable: bool = Field(description="table data: the image's row can be edited")
    added: list[str] = Field(description="multi-label: labels the model gives, not given")
    missed: list[str] = Field(description="multi-label: labels given that the model misses")


class ReviewGroup(BaseModel):
    id: str
    title: str
    items: list[ReviewItem]


class ReviewSummary(BaseModel):
    state: Literal["checking", "ready", "failed", "unavailable"]
    message: str
    data: str
    root: str
    can_move: bool
    read_only: str  # why files cannot be moved there ("" when they can)
    mode: Literal["folders", "table"] = Field(
        description="folders: relabel moves files; table: it edits the image's row")
    multi_label: bool
    tables: dict[str, str] = Field(description="table data: split -> its table")
    classes: list[str]
    groups: list[ReviewGroup]
    actions: list[Action]
    journal_problem: str
    next: str
    journal: str


class InboxItem(BaseModel):
    key: str = Field(description="@inbox/ and the image's path inside the inbox folder")
    path: str
    order: int = Field(description="1: the image to label first (least sure, near-copies apart)")
    suggested: str
    probability: float
    second: str
    p_second: float
    margin: float
    known: bool
    ood_score: float | None
    now: str = Field(description="inbox, set aside, or the class it was filed under")
    status: str
    undo: str | None
    moves: int


class InboxSummary(BaseModel):
    state: Literal["scoring", "ready", "failed", "unavailable"]
    message: str
    folder: str
    data: str
    target: str
    can_move: bool
    read_only: str
    classes: list[str]
    items: list[InboxItem] = Field(description="images like the training images, in order")
    unknown: list[InboxItem] = Field(description="images the open-set score calls unknown")
    accepted: int
    next: str = Field(description="the command that refits the run on the data as it is now")
    skipped: list[str]


class RefitStatus(BaseModel):
    state: Literal["idle", "running", "done", "failed"]
    message: str
    out: str = Field(description="the new run folder")
    command: str
    log: list[str] = Field(description="the last lines of the refit's output")


class Restored(BaseModel):
    restored: int
    actions: list[Action]
    problems: list[str]


Key = Annotated[str, Field(pattern=KEY_PATTERN, max_length=4096,
                           description="the image's path inside the data folder, as listed")]


class KeyBody(BaseModel):
    key: Key


class AcceptBody(BaseModel):
    min_p: float = Field(ge=0, le=1, strict=True,  # strict: true/false is not a probability
                         description="accept the suggestions at this probability or above")


class Accepted(BaseModel):
    accepted: int
    actions: list[Action]
    problems: list[str]


class UndoBody(BaseModel):
    id: Annotated[str, Field(pattern=ACTION_ID, description="a journal action's id")]


def _text_only(value):
    """A time arrives as text: pydantic would read a number as seconds since 1970."""
    if not isinstance(value, str):
        raise ValueError("give the time as text, e.g. 2026-12-04T14:30")
    return value


class SinceBody(BaseModel):
    since: Annotated[datetime, BeforeValidator(_text_only)] \
        | Annotated[str, Field(pattern=SPAN_PATTERN)] | None = Field(
        None, description="an ISO time (2026-12-04T14:30, local time without an offset) or a "
                          "span back from now (30m, 2h, 1d); none: every move")


def _errors(*codes: int) -> dict:
    return {code: {"model": Error} for code in codes}


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation details as one sentence a person can act on."""
    for error in exc.errors():
        where = [str(p) for p in error.get("loc", ()) if p not in ("body", "query")]
        if where[:1] == ["file"] and error.get("type") == "missing":
            return "send the image(s) as multipart form field 'file'"
        if where[:1] == ["file"] and error.get("type") == "too_long":
            limit = (error.get("ctx") or {}).get("max_length")
            return (f"file: at most {limit} images in one request: send the rest in another "
                    "(or start graft serve with a larger --max-files)")
        if where:
            return f"{'.'.join(where)}: {error.get('msg', 'invalid')}"
        if error.get("type") in ("missing", "model_attributes_type", "json_invalid"):
            return "send a JSON object as the request body"
    return "invalid request"


def _schema(app: FastAPI) -> dict:
    """FastAPI's schema, with the validation errors it documents as 422 declared as the 400s
    they are, and the review token as a security scheme."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components["securitySchemes"] = {"token": {
            "type": "apiKey", "in": "header", "name": TOKEN_HEADER,
            "description": "the token in the review URL graft serve prints"}}
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(service) -> FastAPI:
    """The routes of a running ``Service`` (``graftkit.serve.server``)."""
    from graftkit import __version__

    app = FastAPI(title="graftkit", version=__version__, docs_url=None, redoc_url=None,
                  description="Predictions of one graftkit run, and the review of its data.")
    app.openapi = lambda: _schema(app)  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(exc)}, status_code=400)

    @app.exception_handler(ReviewError)
    async def refused(request: Request, exc: ReviewError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    _pages(app)
    add_browser_routes(app, service.browser)
    _prediction_routes(app, service)
    _review_routes(app, service)
    return app


def _pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def try_page():
        return page("try.html")

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    def review_page():
        return page("review.html")

    @app.get("/inbox", response_class=HTMLResponse, include_in_schema=False)
    def inbox_page():
        return page("inbox.html")

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str):
        if name not in ASSETS:  # a fixed list: no name reaches the file system
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(page(name), media_type=ASSETS[name])


class DecodeSlots:
    """At most ``n`` uploads decoded at once (one per core): a decode's memory is bounded by the
    pixel limit, so the server's is bounded by both. FIFO, so a large request's files take turns
    with other requests' files."""

    def __init__(self, n: int):
        self.n = n
        self._by_loop: dict[int, asyncio.Semaphore] = {}

    def __call__(self) -> asyncio.Semaphore:
        loop = id(asyncio.get_running_loop())
        if loop not in self._by_loop:
            self._by_loop[loop] = asyncio.Semaphore(self.n)
        return self._by_loop[loop]


def _prediction_routes(app: FastAPI, service) -> None:
    from graftkit.classifier import parse_reject
    from graftkit.errors import UsageError
    from graftkit.outputs.heatmaps import NoFeatureMap

    slots = DecodeSlots(max(1, os.cpu_count() or 1))

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz():
        """The model is loaded and the batching thread answers; 503 ``stuck`` when one model
        call has run far longer than it should, or the thread is gone."""
        health = service.batcher.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    @app.get("/info", response_model=Info)
    async def info():
        """The run being served: classes, backbone, image size, validation accuracy, limits."""
        return service.info()

    @app.post("/predict", response_model=Predictions, responses=_errors(400, 413),
              response_model_exclude_unset=True)  # labels/probabilities: multi-label runs
    async def predict(
            file: Annotated[list[UploadFile], File(
                min_length=1, max_length=service.max_files,
                description=f"one to {service.max_files} images (JPEG, PNG, BMP, GIF or WebP)")],
            top_k: Annotated[int, Query(ge=1, le=1000, description="labels per image")] = 3,
            reject: Annotated[str, Query(description="auto, none or a finite threshold")]
            = "auto",
            explain: Annotated[bool, Query(description="also where the model looked "
                                           "(heatmaps) and the closest training images")]
            = False):
        """Labels of uploaded images: one object per file, in order, with the fields of a
        ``graft predict --format json`` line (``path`` is the uploaded file's name); with
        ``explain=1`` also each answer's heatmaps and closest training images."""
        try:
            parse_reject(reject)
        except UsageError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        size, limit = service.classifier.image_size, service.max_pixels
        rows, names = [], [f.filename or f"upload-{i + 1}" for i, f in enumerate(file)]
        for name, f in zip(names, file):
            async with slots():  # read each file just before its decode: one in memory per slot
                data = await f.read()
                try:
                    rows.append(await run_in_threadpool(decode_upload, name, data, size, limit))
                except BadUpload as exc:
                    return JSONResponse({"detail": str(exc)}, status_code=400)
            del data
        if explain:
            try:
                explained = await run_in_threadpool(service.explain, np.stack(rows), names,
                                                    top_k, reject)
            except NoFeatureMap as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)
            return {"predictions": explained}
        probs, ood = await asyncio.wrap_future(service.batcher.submit(np.stack(rows)))
        answers = service.classifier.answers(names, probs, ood, top_k, reject)
        return {"predictions": [a.as_dict() for a in answers]}


def _review_routes(app: FastAPI, service) -> None:
    token: dict[str, Any] = {"openapi_extra": {"security": [{"token": []}]}}
    Relabel = create_model(  # noqa: N806 - a model class, made here because it names the classes
        "RelabelBody", key=(Key, ...),
        to=(Literal[tuple(service.classifier.classes)],  # type: ignore[arg-type]  # made at run time
            Field(description="the new class")))
    Labels = create_model(  # noqa: N806 - the same, for a label of a multi-label run
        "LabelsBody", key=(Key, ...),
        label=(Literal[tuple(service.classifier.classes)],  # type: ignore[arg-type]
               Field(description="the label to add or take away")),
        present=(StrictBool, Field(description="true: add the label; false: take it away")))

    @app.get("/review/api/items", response_model=ReviewSummary, responses=_errors(403), **token)
    def items():
        """The suspect images in groups, the moves that can be undone, what to run next."""
        return service.review.summary()

    @app.get("/review/api/image", response_class=Response, **token,
             responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"},
                        **_errors(400, 403, 404, 415)})
    async def image(key: Annotated[str, Query(pattern=KEY_PATTERN, max_length=4096)]):
        """A thumbnail of a listed image as the model sees it (nothing else can be shown)."""
        from graftkit.data.images import jpeg_thumbnail

        path = service.review.file(key)
        try:
            data = await run_in_threadpool(jpeg_thumbnail, path, THUMBNAIL)
        except Exception:  # noqa: BLE001 - an unreadable file is listed, not shown
            raise ReviewError("this file cannot be shown as an image", 415) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    moves = _errors(400, 403, 404, 409)

    @app.post("/review/api/relabel", response_model=Action, responses=moves, **token)
    def relabel(body: Annotated[Relabel, Body()]):  # type: ignore[valid-type]
        """Move a listed image to another class folder of its split."""
        return service.review.relabel(body.key, body.to)  # type: ignore[attr-defined]

    @app.post("/review/api/labels", response_model=Action, responses=moves, **token)
    def labels(body: Annotated[Labels, Body()]):  # type: ignore[valid-type]
        """Multi-label table data: add a label to a listed image's row, or take one away."""
        return service.review.edit_label(body.key, body.label,  # type: ignore[attr-defined]
                                         body.present)  # type: ignore[attr-defined]

    @app.post("/review/api/set-aside", response_model=Action, responses=moves, **token)
    def set_aside(body: KeyBody):
        """Move a listed image into the data folder's hidden .graft-set-aside/ folder."""
        return service.review.set_aside(body.key)

    @app.post("/review/api/accept", response_model=Accepted, responses=moves, **token)
    def accept(body: AcceptBody):
        """Relabel every likely wrong label whose suggestion has at least ``min_p`` (images
        moved by hand since the page listed them are left alone), each move journalled."""
        return service.review.accept(body.min_p)

    @app.post("/review/api/undo", response_model=Action, responses=moves, **token)
    def undo(body: UndoBody):
        """Undo a move, and every later move of the same image with it."""
        return service.review.undo(body.id)

    @app.post("/review/api/restore", response_model=Action, responses=moves, **token)
    def restore(body: KeyBody):
        """Put one image back where it was listed, whatever was done to it since."""
        return service.review.restore(body.key)

    @app.post("/review/api/restore-all", response_model=Restored, responses=moves, **token)
    def restore_all(body: SinceBody):
        """Undo every move since a time (every move without one), image by image."""
        return service.review.restore_since(body.since)

    _loop_routes(app, service, Relabel, token)


def _loop_routes(app: FastAPI, service, relabel, token: dict[str, Any]) -> None:
    """The inbox's routes and the refit's: the data loop's, behind the review's token."""
    moves = _errors(400, 403, 404, 409)
    Relabel = relabel  # noqa: N806 - the review's body model, which names the classes

    def _inbox():  # looked up on each call: a refit swaps in a new one
        if service.inbox is None:
            raise ReviewError("no inbox: start graft serve with --inbox FOLDER", 404)
        return service.inbox

    @app.get("/review/api/inbox/items", response_model=InboxSummary, responses=_errors(403, 404),
             **token)
    def inbox_items():
        """The inbox's images with the model's suggestion, in the order to label them."""
        return _inbox().summary()

    @app.get("/review/api/inbox/image", response_class=Response, **token,
             responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"},
                        **_errors(400, 403, 404, 415)})
    async def inbox_image(key: Annotated[str, Query(pattern=KEY_PATTERN, max_length=4096)]):
        """A thumbnail of an inbox image, wherever it is now."""
        from graftkit.data.images import jpeg_thumbnail

        path = _inbox().file(key)
        try:
            data = await run_in_threadpool(jpeg_thumbnail, path, THUMBNAIL)
        except Exception:  # noqa: BLE001 - an unreadable file is listed, not shown
            raise ReviewError("this file cannot be shown as an image", 415) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/review/api/inbox/accept", response_model=Action, responses=moves, **token)
    def inbox_accept(body: Annotated[Relabel, Body()]):  # type: ignore[valid-type]
        """File an inbox image under a class: into that class's training folder."""
        return _inbox().accept(body.key, body.to)  # type: ignore[attr-defined]

    @app.post("/review/api/inbox/set-aside", response_model=Action, responses=moves, **token)
    def inbox_set_aside(body: KeyBody):
        """Move an inbox image into the inbox's .graft-set-aside/ folder."""
        return _inbox().set_aside(body.key)

    @app.post("/review/api/inbox/accept-all", response_model=Accepted, responses=moves, **token)
    def inbox_accept_all(body: AcceptBody):
        """File every known inbox image suggested at ``min_p`` or above under its suggestion."""
        return _inbox().accept_all(body.min_p)

    @app.get("/review/api/refit", response_model=RefitStatus, responses=_errors(403), **token)
    def refit_status():
        """The background refit: idle, running (its log so far), done or failed."""
        return service.refit_status()

    @app.post("/review/api/refit", response_model=RefitStatus, responses=_errors(403, 409),
              **token)
    def refit():
        """Start ``graft refit`` of the served run on the data as it is now, in a child
        process; when it ends well, the new run is served (same classes)."""
        return service.start_refit()
