"""``graft serve``'s "run in this browser": the run's ONNX export run by ONNX Runtime Web in the
user's own browser, every file served from this machine (no CDN), so a user sees the exported
model answer offline, the way a web app of theirs would run it.

The page is the example in docs/examples (``browser.html`` and ``browser.js``, the same files).
It needs two things this server does not make: the ONNX export (``graft export RUN --format
onnx``, in ``RUN/export/onnx``) and ONNX Runtime Web's files (the npm package
``onnxruntime-web``: ``make`` installs it in ``web/node_modules``; elsewhere ``--ort-web DIR``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

ORT_VERSION = "1.31.1"  # web/package.json
ORT_FILES = {"ort.wasm.min.js": "text/javascript", "ort-wasm-simd-threaded.mjs": "text/javascript",
             "ort-wasm-simd-threaded.wasm": "application/wasm"}
EXPORT_FILES = {"model.onnx": "application/octet-stream", "labels.txt": "text/plain",
                "export.json": "application/json"}
PAGE_FILES = {"browser.html": "text/html", "browser.js": "text/javascript"}
ORT_ENV = "GRAFTKIT_ORT_WEB"


@dataclass
class BrowserPage:
    """Where the page's files are, or why it cannot run."""

    export_dir: Path
    ort_dir: Path | None

    @property
    def problem(self) -> str | None:
        missing = [f for f in EXPORT_FILES if not (self.export_dir / f).is_file()]
        if missing:
            return (f"no ONNX export in {self.export_dir} ({', '.join(missing)} missing): run "
                    f"graft export {self.export_dir.parent.parent} --format onnx, then reload")
        if self.ort_dir is None:
            return (f"ONNX Runtime Web is not found: npm install onnxruntime-web@{ORT_VERSION} "
                    "and start graft serve with --ort-web node_modules/onnxruntime-web/dist "
                    f"(or set {ORT_ENV})")
        return None


def ort_web_dir(given: str | os.PathLike | None = None) -> Path | None:
    """ONNX Runtime Web's ``dist`` folder: ``--ort-web``, then ``GRAFTKIT_ORT_WEB``, then the
    one ``make`` installs beside a clone of graftkit."""
    clone = Path(__file__).resolve().parents[3] / "web" / "node_modules" / "onnxruntime-web" / "dist"
    for candidate in (given, os.environ.get(ORT_ENV), clone):
        if candidate and all((Path(candidate) / f).is_file() for f in ORT_FILES):
            return Path(candidate)
    return None


def add_routes(app: FastAPI, page: BrowserPage) -> None:
    """``/browser/`` and the files it loads, each from a fixed list: no name reaches the file
    system."""
    from importlib import resources

    @app.get("/browser", include_in_schema=False)
    def browser_redirect():
        return RedirectResponse("/browser/")

    @app.get("/browser/", include_in_schema=False)
    def browser_page():
        return _page_file("browser.html", resources)

    @app.get("/browser/{name}", include_in_schema=False)
    def browser_file(name: str):
        if name in PAGE_FILES:
            return _page_file(name, resources)
        if name in EXPORT_FILES and page.problem is None:
            return FileResponse(page.export_dir / name, media_type=EXPORT_FILES[name])
        return _not_found(page)

    @app.get("/browser/ort/{name}", include_in_schema=False)
    def ort_file(name: str):
        if name in ORT_FILES and page.ort_dir is not None:
            return FileResponse(page.ort_dir / name, media_type=ORT_FILES[name])
        return _not_found(page)


def _page_file(name: str, resources) -> Response:
    text = resources.files("graftkit.serve").joinpath("static", name).read_text(encoding="utf-8")
    return Response(text, media_type=PAGE_FILES[name])


def _not_found(page: BrowserPage) -> JSONResponse:
    return JSONResponse({"detail": page.problem or "not found"}, status_code=404)
