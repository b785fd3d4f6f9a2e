"""Crash graft serve's review as badly as we can, then check "restore everything" brings every
image home, byte for byte.

    .venv/bin/python scripts/serve_crash_restore.py RUN DATA

On a copy of DATA (DATA itself is never changed):
1. a server gets a burst of 20 relabels from a client thread and is killed with SIGKILL in the
   middle of it;
2. the journal's last line is cut, as a power loss or a full disk leaves it;
3. two servers are started on the same folder, and two clients send them conflicting relabels,
   set-asides and undos of the same images at once;
4. both servers are stopped and ``graft review undo COPY --all`` runs.
Then every image must be at its original path with its original SHA-256, nothing may be left in
``.graft-set-aside/``, and ``graft review log`` must list no move. Exit 0 when so, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

GRAFT = [sys.executable, "-m", "graftkit.cli"]


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".graft-")
            and ".graft-set-aside" not in p.parts}


class Server:
    """``graft serve RUN --data DATA --port 0`` in a subprocess, with its URL and token."""

    def __init__(self, run: Path, data: Path):
        self.proc = subprocess.Popen([*GRAFT, "serve", str(run), "--data", str(data),
                                      "--port", "0", "--quiet"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            if "review page" in line:
                url = line.split()[2]
                self.base, self.token = url.split("/review?token=")
            if line.startswith("Ctrl-C"):
                break
        else:
            raise RuntimeError(f"graft serve did not start: {self.proc.stderr.read()[-2000:]}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep pipes drained
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        deadline = time.time() + 120
        while self.call("GET", "/review/api/items")[1]["state"] == "checking":
            if time.time() > deadline:
                raise RuntimeError("the review's data check did not finish")
            time.sleep(0.2)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        ask = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "X-Graft-Token": self.token, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(ask, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def keys_and_classes(server: Server) -> tuple[list[str], list[str]]:
    items = server.call("GET", "/review/api/items")[1]
    keys = sorted({i["key"] for g in items["groups"] for i in g["items"]
                   if not i["key"].startswith("outside/")})
    return keys, items["classes"]


def burst(server: Server, keys: list[str], classes: list[str], n: int, seed: int,
          mixed: bool, answered: list[int]) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        key = rng.choice(keys)
        try:
            roll = rng.random() if mixed else 0.0
            if roll < 0.5:
                status, _ = server.call("POST", "/review/api/relabel",
                                        {"key": key, "to": rng.choice(classes)})
            elif roll < 0.8:
                status, _ = server.call("POST", "/review/api/set-aside", {"key": key})
            else:
                actions = server.call("GET", "/review/api/items")[1]["actions"]
                if not actions:
                    continue
                status, _ = server.call("POST", "/review/api/undo",
                                        {"id": rng.choice(actions)["id"]})
        except (OSError, ValueError):  # the server was killed under us
            return
        if status >= 500:
            raise RuntimeError(f"server error {status}")
        answered.append(status)


def run(run_dir: Path, data: Path, work: Path) -> list[str]:
    copy = work / "data"
    shutil.copytree(data, copy)
    before = digests(copy)
    problems: list[str] = []

    first = Server(run_dir, copy)
    keys, classes = keys_and_classes(first)
    print(f"{len(before)} images, {len(keys)} listed by the review, classes {classes}")
    answered: list[int] = []
    client = threading.Thread(target=burst, args=(first, keys, classes, 20, 1, False, answered))
    client.start()
    while len(answered) < 6 and client.is_alive():
        time.sleep(0.005)
    first.proc.send_signal(signal.SIGKILL)  # mid-burst
    client.join(60)
    first.proc.wait(30)
    print(f"1. killed with SIGKILL after {len(answered)} of 20 relabels were answered")

    with open(copy / ".graft-journal.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id":"t","act')
    print("2. journal's last line cut")

    second, third = Server(run_dir, copy), Server(run_dir, copy)
    answers: list[int] = []
    clients = [threading.Thread(target=burst, args=(s, keys, classes, 30, seed, True, answers))
               for s, seed in ((second, 2), (third, 3))]
    for c in clients:
        c.start()
    for c in clients:
        c.join(300)
    second.stop()
    third.stop()
    codes = {code: answers.count(code) for code in sorted(set(answers))}
    print(f"3. two servers, conflicting actions from two clients: answers {codes}")

    undo = subprocess.run([*GRAFT, "review", "undo", str(copy), "--all"], capture_output=True,
                          text=True, timeout=300)
    print(f"4. graft review undo --all: {undo.stdout.strip().splitlines()[-1:]}")
    if undo.returncode != 0:
        problems.append(f"graft review undo --all failed: {undo.stderr.strip()}")
    after = digests(copy)
    for path, digest in before.items():
        if after.get(path) != digest:
            problems.append(f"{path}: {'missing' if path not in after else 'different content'}")
    problems += [f"{path}: not in the original data" for path in after if path not in before]
    aside = copy / ".graft-set-aside"
    left = [p for p in aside.rglob("*") if p.is_file()] if aside.exists() else []
    problems += [f"left in .graft-set-aside: {p.relative_to(copy)}" for p in left]
    log = subprocess.run([*GRAFT, "review", "log", str(copy)], capture_output=True, text=True,
                         timeout=120)
    if "nothing to undo" not in log.stdout:
        problems.append(f"graft review log still lists moves:\n{log.stdout}")
    if "could not be read" not in log.stderr:
        problems.append(f"the cut journal line was not reported: {log.stderr!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory() as work:
        problems = run(args.run, args.data, Path(work))
    for p in problems:
        print("PROBLEM:", p)
    print("every image back in its place, byte for byte" if not problems else
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
