"""``graft serve``: load a run once, then answer HTTP on uvicorn until Ctrl-C."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import uvicorn

    from graftkit.serve.refit import Refit

from graftkit import defaults
from graftkit.errors import UsageError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_WAIT = 0.005  # s a request may wait for others to share its model call
HEADER_TIMEOUT = 10.0  # s a connection has to send a request's headers
BODY_TIMEOUT = 15.0  # s a request body may pause (408 after); 120 s for a whole body
MAX_CONNECTIONS = 256  # open at once; beyond, new connections are closed unanswered


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow, so a taken port is a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it
    # every response waited ~40 ms for the client's delayed ACK (headers and body are two writes).
    sock = socket.socket(family, kind, proto)
    if os.name != "nt":  # on Windows this option lets two servers share a port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another "
                         "--port (or --port 0 for any free one)") from None
    sock.listen(128)
    return sock


class _Stderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (a stream bound once goes stale where
    stderr is swapped, as under pytest or in a notebook)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _uvicorn_log_to_stderr() -> None:
    """uvicorn's warnings and errors on stderr, set on its own loggers: uvicorn's default
    ``dictConfig`` would reconfigure the whole process's logging, and closes the streams of
    handlers made before it (absl's, made when TensorFlow is imported)."""
    log = logging.getLogger("uvicorn")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


class Service:
    """A loaded run, its batching thread and its review: what the routes of ``app`` use.

    Args:
        run_dir: the run folder to serve.
        data: the data folder to review. Defaults to None (the run's own).
        max_upload_mb: the largest request body. Defaults to ``defaults.SERVE_MAX_UPLOAD_MB``.
        unsafe: allow a model file with code. Defaults to False.
        max_batch: the most images in one model call. Defaults to ``defaults.BATCH_SIZE``.
        max_wait: seconds a request waits for others to share its call. Defaults to
            ``MAX_WAIT``.
        max_pixels: the largest upload decoded, in pixels. Defaults to
            ``defaults.SERVE_MAX_PIXELS``.
        max_files: the most images in one request. Defaults to ``defaults.SERVE_MAX_FILES``.
        hosts: host names the server answers to besides the local ones (``--host``,
            ``--allow-host``). Defaults to none.
        log: where the access log goes; None for none. Defaults to None.
        port: the port listened on, for the Host check; None until known. Defaults to None.
        header_timeout: seconds a connection has to send a request's headers. Defaults to
            ``HEADER_TIMEOUT``.
        max_connections: connections open at once; more are closed at once. Defaults to
            ``MAX_CONNECTIONS``.
        body_timeout: seconds a request body may pause before a 408. Defaults to
            ``BODY_TIMEOUT``.
        inbox: a folder of new images to label with the model's suggestions. Defaults to None.
    """

    def __init__(self, run_dir: str | os.PathLike, data: str | None = None,
                 max_upload_mb: float = defaults.SERVE_MAX_UPLOAD_MB, unsafe: bool = False,
                 max_batch: int = defaults.BATCH_SIZE, max_wait: float = MAX_WAIT,
                 max_pixels: int = defaults.SERVE_MAX_PIXELS,
                 max_files: int = defaults.SERVE_MAX_FILES, hosts: Iterable[str] = (),
                 log: Callable[[str], None] | None = None, port: int | None = None,
                 header_timeout: float = HEADER_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, body_timeout: float = BODY_TIMEOUT,
                 inbox: str | os.PathLike | None = None,
                 ort_web: str | os.PathLike | None = None):
        from graftkit.classifier import load
        from graftkit.outputs.closest import Thumbnails
        from graftkit.serve.app import create_app
        from graftkit.serve.batching import Batcher
        from graftkit.serve.browser import BrowserPage, ort_web_dir
        from graftkit.serve.guard import BodyLimit, Guard
        from graftkit.serve.review import Review

        self.run_dir = Path(run_dir)
        self.classifier = load(run_dir, unsafe)
        if inbox is not None:
            self.classifier.require_single_label("--inbox")
        size = self.classifier.image_size
        self.classifier.scored_pixels(np.zeros((1, size, size, 3), np.uint8))  # traced once, now
        self.token = secrets.token_urlsafe(18)
        self.batcher = Batcher(self.classifier.scored_pixels, max_batch, max_wait)
        self.unsafe = unsafe
        self.refit: Refit | None = None
        self.review = Review(self.run_dir, self.classifier.classes, self.classifier.record, data)
        self.review.start()
        self.inbox = None
        if inbox is not None:
            from graftkit.serve.inbox import Inbox

            self.inbox = Inbox(inbox, self.review, self.classifier)
            self.inbox.start()
        self.max_upload_mb, self.max_pixels, self.max_files = max_upload_mb, max_pixels, max_files
        self._explaining = threading.Lock()
        self._thumbs = Thumbnails(self.run_dir)  # closest training images' thumbnails
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.browser = BrowserPage(self.run_dir / "export" / "onnx", ort_web_dir(ort_web))
        body = BodyLimit(create_app(self), int(max_upload_mb * 2**20), idle_timeout=body_timeout)
        self.guard = Guard(body, self.token, port, hosts, log)
        self.app = self.guard
        self.server: uvicorn.Server | None = None

    def start_refit(self) -> dict:
        """``graft refit`` of the served run on the reviewed data, in a child process; the
        new run is served when it ends well."""
        from graftkit.outputs.run import next_run_dir
        from graftkit.serve.journal import JournalError
        from graftkit.serve.refit import Refit

        if self.refit is not None and self.refit.state == "running":
            raise JournalError("a refit is running already", 409)
        review = self.review
        if review.root is None or not review.source:
            raise JournalError(f"no data folder to refit on: {review.message}", 409)
        self.refit = Refit(self.run_dir, review.source, next_run_dir(self.run_dir), self.swap)
        return self.refit.status()

    def refit_status(self) -> dict:
        if self.refit is None:
            from graftkit.serve.review import refit_command

            return {"state": "idle", "message": "", "out": "", "log": [],
                    "command": refit_command(self.run_dir, self.review.source or "")}
        return self.refit.status()

    def swap(self, run_dir: Path) -> str:
        """Serve another run (a refit of this one): same classes, or it is refused, since the
        pages and the API's schema name them."""
        from graftkit.classifier import load
        from graftkit.outputs.closest import Thumbnails
        from graftkit.serve.batching import Batcher
        from graftkit.serve.review import Review

        classifier = load(run_dir, self.unsafe)
        if list(classifier.classes) != list(self.classifier.classes):
            raise ValueError(f"{run_dir} has other classes ({', '.join(classifier.classes)}): "
                             f"restart graft serve on it")
        size = classifier.image_size
        classifier.scored_pixels(np.zeros((1, size, size, 3), np.uint8))
        old = self.batcher
        review = Review(run_dir, classifier.classes, classifier.record, self.review.source)
        review.start()
        with self._explaining:  # an explanation in flight finishes with the old run
            self.classifier, self.run_dir = classifier, Path(run_dir)
            self._thumbs = Thumbnails(self.run_dir)
        self.batcher = Batcher(classifier.scored_pixels, old.max_batch, old.max_wait)
        self.review = review
        if self.inbox is not None:
            from graftkit.serve.inbox import Inbox

            self.inbox = Inbox(self.inbox.folder, review, classifier)
            self.inbox.start()
        old.close()
        accuracy = classifier.record.val_accuracy
        previous = classifier.record.previous_run
        if previous and "reason" not in previous:
            from graftkit.outputs.compare import line

            return f"now serving {run_dir}: {line(previous)}"
        return (f"now serving {run_dir}" + (f" (val accuracy {accuracy:.4f})"
                                            if isinstance(accuracy, float) else ""))

    def explain(self, pixels: np.ndarray, names: list[str], top_k: int,
                reject: str) -> list[dict]:
        """``POST /predict?explain=1``: each answer with its heatmaps (base64 RGBA PNGs to lay
        over the image) and closest training images (label, similarity, file name, a base64
        JPEG thumbnail from the run folder). One at a time: the map engine is one interpreter."""
        with self._explaining:
            return self._explained(pixels, names, top_k, reject)

    def _explained(self, pixels: np.ndarray, names: list[str], top_k: int,
                   reject: str) -> list[dict]:
        import base64

        from graftkit.outputs.heatmaps import heat_png

        explained = self.classifier.explain(pixels, top_k=top_k, reject=reject)
        out = []
        for name, e in zip(names, explained):
            answer = e.prediction.as_dict()
            answer["path"] = name
            answer["heatmaps"] = {label: base64.b64encode(heat_png(heat)).decode()
                                  for label, heat in e.heatmaps.items()}
            closest = []
            for c in e.closest or []:
                closest.append({"label": c["label"], "similarity": c["similarity"],
                                "name": Path(c["path"]).name,
                                "thumbnail": base64.b64encode(
                                    self._thumbs.jpeg(c["index"])).decode()})
            answer["closest"] = closest if e.closest is not None else None
            out.append(answer)
        return out

    def info(self) -> dict:
        record = self.classifier.record
        open_set = self.classifier.open_set
        return {"run": str(self.run_dir.resolve()), "classes": self.classifier.classes,
                "backbone": record.backbone, "image_size": self.classifier.image_size,
                "val_accuracy": record.val_accuracy,
                "balanced_accuracy": record.balanced_accuracy,
                "task": record.task,
                "val_map": (record.multi_label or {}).get("map"),
                "open_set": None if open_set is None else
                {"method": open_set.method, "threshold": open_set.threshold},
                "max_upload_mb": self.max_upload_mb, "max_files": self.max_files,
                "max_pixels": self.max_pixels,
                "batching": {"max_batch": self.batcher.max_batch,
                             "max_wait_ms": self.batcher.max_wait * 1000,
                             "model_calls": self.batcher.batches, "images": self.batcher.images},
                "browser": {"available": self.browser.problem is None,
                            "why_not": self.browser.problem}}

    def run(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until Ctrl-C (uvicorn's own signal handling ends it cleanly)."""
        import uvicorn

        from graftkit.serve.protocol import guarded_protocol

        self.guard.port = sock.getsockname()[1]
        _uvicorn_log_to_stderr()
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off",
                                http=guarded_protocol(self.max_connections, self.header_timeout),
                                limit_concurrency=self.max_connections)
        self.server = uvicorn.Server(config)
        try:
            self.server.run(sockets=[sock])
        finally:
            self.batcher.close()
            sock.close()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve from a background thread (tests, benchmarks); returns the base URL."""
        sock = bind(host, port)
        thread = threading.Thread(target=self.run, args=(sock,), daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not (self.server and self.server.started) and time.time() < deadline:
            time.sleep(0.02)
        return f"http://{host}:{sock.getsockname()[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.refit is not None:
            self.refit.stop()


def url_host(host: str) -> str:
    """The host to print in a URL: a local address when listening on every interface."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def served_hosts(host: str, allow_hosts: Iterable[str] = ()) -> list[str]:
    """The host names requests may use besides the local ones: ``--host`` and ``--allow-host``,
    and this machine's name when listening on every interface."""
    names = [*allow_hosts]
    if host in ("0.0.0.0", "", "::"):
        names.append(socket.gethostname())
    else:
        names.append(host)
    return names


def serve(run_dir: str | os.PathLike, data: str | None = None, host: str = "127.0.0.1",
          port: int = defaults.SERVE_PORT, max_upload_mb: float = defaults.SERVE_MAX_UPLOAD_MB,
          unsafe: bool = False, log: Callable[[str], None] = print,
          sock: socket.socket | None = None, max_pixels: int = defaults.SERVE_MAX_PIXELS,
          max_files: int = defaults.SERVE_MAX_FILES, allow_hosts: Iterable[str] = (),
          quiet: bool = False, inbox: str | None = None, ort_web: str | None = None) -> int:
    """``graft serve``: the try page, the API and the review page of a run, until Ctrl-C.

    ``sock``: a socket already bound (the CLI binds before TensorFlow loads, so a taken port
    is told at once). ``quiet``: no access-log line per request.
    """
    sock = sock or bind(host, port)
    start = time.perf_counter()
    port = sock.getsockname()[1]
    service = Service(run_dir, data, max_upload_mb, unsafe, max_pixels=max_pixels,
                      max_files=max_files, hosts=served_hosts(host, allow_hosts),
                      log=None if quiet else lambda line: log(line), port=port, inbox=inbox,
                      ort_web=ort_web)
    base = f"http://{url_host(host)}:{port}"
    info = service.info()
    accuracy = info["val_accuracy"]
    multi = info["task"] == "multi_label"
    log(f"graft serve: {run_dir} ({info['backbone']}, {len(info['classes'])} "
        + ("labels, several per image" if multi else "classes")
        + (f", val accuracy {accuracy:.4f}" if isinstance(accuracy, float) else "")
        + (f", val mAP {info['val_map']:.4f}" if isinstance(info["val_map"], float) else "")
        + f"), ready in {time.perf_counter() - start:.1f} s")
    log(f"  try page     {base}/")
    review = service.review
    where = review.why_read_only or f"data {review.root}"
    log(f"  review page  {base}/review?token={service.token}   ({where})")
    if service.inbox is not None:
        why = service.inbox.why_read_only
        log(f"  inbox page   {base}/inbox?token={service.token}   ({service.inbox.folder}"
            + (f"; suggestions only: {why}" if why else "") + ")")
    browser = service.browser.problem
    log(f"  in-browser   {base}/browser/   "
        + ("(the ONNX export, run by ONNX Runtime Web)" if browser is None
           else f"(not available: {browser})"))
    log(f"  API          POST {base}/predict (multipart field 'file'); GET /info, /healthz; "
        "schema at /openapi.json")
    if review.recovered:
        log(f"  journal      {review.recovered} move(s) cut short by an earlier stop were settled")
    problem = review.summary()["journal_problem"]
    if problem:
        log(f"warning: {problem}")
    if host not in LOCAL_HOSTS:
        log(f"warning: listening on {host}: anyone who can reach this machine can use the try "
            "page and the API; the review page still needs the token in its URL")
    log("Ctrl-C stops the server." + ("" if quiet else " One line per request follows "
                                      "(--quiet for none)."))
    try:
        service.run(sock)
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed Ctrl-C on
        pass
    log("graft serve: stopped")
    return 0
