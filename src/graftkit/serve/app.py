"""The HTTP side of ``graft serve``: the try page, the prediction API and the review page.

FastAPI for the routes and the OpenAPI schema (its ``/docs`` page is off: it loads its script
from a CDN, and the server must work offline). Every page asset is a file of this package,
served from a fixed list. Review routes need the server's token; uploads are bounded in size
and decoded by graftkit's own decoder (with its decompression-bomb guard).
"""

from __future__ import annotations

import asyncio
import io
import secrets
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from graftkit.serve.review import ReviewError

TOKEN_HEADER = "X-Graft-Token"
ASSETS = {"graft.css": "text/css", "try.js": "text/javascript", "review.js": "text/javascript"}
THUMBNAIL = 256  # px, side of a review thumbnail


class BadUpload(Exception):
    """An upload that is not an image graftkit can read: a 400 that names the file."""


class UploadLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before it is read
    whole (declared length or counted while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send) -> None:
        mb = self.max_bytes / 2**20
        body = (f'{{"detail": "upload larger than {mb:g} MB: send smaller images or start '
                f'graft serve with a larger --max-upload-mb"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received, started, refused = 0, False, False

        async def counted():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}  # the app stops reading the body
            return message

        async def watched(message):
            nonlocal started
            if refused:  # the 413 went out: whatever the app answers to the cut body is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not refused:
                raise


def decode_upload(name: str, data: bytes, size: int) -> np.ndarray:
    """One upload through ``load_image``, or ``BadUpload`` with the reason."""
    from PIL import Image

    from graftkit.data.images import ImageTooLarge, load_image

    if not data:
        raise BadUpload(f"{name}: empty file")
    try:
        return load_image(io.BytesIO(data), size)
    except (ImageTooLarge, Image.DecompressionBombError) as exc:
        raise BadUpload(f"{name}: too many pixels ({exc}): possible decompression bomb") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on hostile input
        reason = "not an image graftkit can read" if isinstance(exc, Image.UnidentifiedImageError) \
            else f"unreadable image ({type(exc).__name__}: {exc})"
        raise BadUpload(f"{name}: {reason}") from None


def page(name: str) -> str:
    return resources.files("graftkit.serve").joinpath("static", name).read_text(encoding="utf-8")


class RelabelBody(BaseModel):
    key: str
    to: str


class KeyBody(BaseModel):
    key: str


class UndoBody(BaseModel):
    id: str


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's 422 details as one sentence a person can act on."""
    for error in exc.errors():
        where = [str(p) for p in error.get("loc", ()) if p not in ("body", "query")]
        if where[:1] == ["file"] and error.get("type") == "missing":
            return "send the image(s) as multipart form field 'file'"
        if where:
            return f"{'.'.join(where)}: {error.get('msg', 'invalid')}"
    return "invalid request"


def create_app(service) -> FastAPI:
    """The routes of a running ``Service`` (``graftkit.serve.server``)."""
    from graftkit import __version__

    app = FastAPI(title="graftkit", version=__version__, docs_url=None, redoc_url=None,
                  description="Predictions of one graftkit run, and the review of its data.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(exc)}, status_code=400)

    @app.exception_handler(ReviewError)
    async def refused(request: Request, exc: ReviewError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    _pages(app, service)
    _prediction_routes(app, service)
    _review_routes(app, service)
    return app


def _pages(app: FastAPI, service) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def try_page():
        return page("try.html")

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    def review_page():
        return page("review.html")

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str):
        if name not in ASSETS:  # a fixed list: no name reaches the file system
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(page(name), media_type=ASSETS[name])


def _prediction_routes(app: FastAPI, service) -> None:
    from graftkit.classifier import parse_reject
    from graftkit.errors import UsageError

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the model is loaded and the batching thread runs."""
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict:
        """The run being served: classes, backbone, image size, validation accuracy."""
        return service.info()

    @app.post("/predict")
    async def predict(file: Annotated[list[UploadFile], File(description="one or more images")],
                      top_k: Annotated[int, Query(ge=1, description="labels per image")] = 3,
                      reject: Annotated[str, Query(description="auto, none or a threshold")]
                      = "auto"):
        """Labels of uploaded images: one object per file, in order, with the fields of a
        ``graft predict --format json`` line (``path`` is the uploaded file's name)."""
        try:
            parse_reject(reject)
        except UsageError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        names = [f.filename or f"upload-{i + 1}" for i, f in enumerate(file)]
        datas = [await f.read() for f in file]
        size = service.classifier.image_size
        try:
            pixels = await run_in_threadpool(
                lambda: np.stack([decode_upload(n, d, size) for n, d in zip(names, datas)]))
        except BadUpload as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        probs, ood = await asyncio.wrap_future(service.batcher.submit(pixels))
        answers = service.classifier.answers(names, probs, ood, top_k, reject)
        return {"predictions": [a.as_dict() for a in answers]}


def _review_routes(app: FastAPI, service) -> None:
    def allowed(request: Request) -> None:
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        if not secrets.compare_digest(given.encode(), service.token.encode()):
            raise ReviewError("missing or wrong token: open the review URL graft serve printed", 403)

    @app.get("/review/api/items")
    def items(request: Request) -> dict:
        """The suspect images in groups, the actions that can be undone, what to run next."""
        allowed(request)
        return service.review.summary()

    @app.get("/review/api/image")
    async def image(request: Request, key: str):
        """A thumbnail of a listed image as the model sees it (nothing else can be shown)."""
        from graftkit.data.images import jpeg_thumbnail

        allowed(request)
        path = service.review.file(key)
        try:
            data = await run_in_threadpool(jpeg_thumbnail, path, THUMBNAIL)
        except Exception:  # noqa: BLE001 - an unreadable file is listed, not shown
            raise ReviewError("this file cannot be shown as an image", 415) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/review/api/relabel")
    def relabel(body: RelabelBody, request: Request) -> dict:
        """Move a listed image to another class folder of its split."""
        allowed(request)
        return service.review.relabel(body.key, body.to)

    @app.post("/review/api/set-aside")
    def set_aside(body: KeyBody, request: Request) -> dict:
        """Move a listed image into the data folder's hidden .graft-set-aside/ folder."""
        allowed(request)
        return service.review.set_aside(body.key)

    @app.post("/review/api/undo")
    def undo(body: UndoBody, request: Request) -> dict:
        """Put the file of an action back."""
        allowed(request)
        return service.review.undo(body.id)
