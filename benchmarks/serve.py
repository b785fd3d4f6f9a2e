"""``graft serve`` under concurrent clients against ``graftkit.load(run).predict``, in one run.

    .venv/bin/python benchmarks/serve.py [--data flowers5] [--run DIR] [--clients 1 4 16]

Trains a default run on ``--data`` (one of ../shared/datasets, or a folder) unless ``--run``
holds one, then:
1. batch: ``graftkit.load(run).predict`` on the validation images in this process, warm (one
   call first, not timed), best of 3 calls: images/s, decoding included;
2. server: ``graft serve RUN --port 0`` in a subprocess on 127.0.0.1; for each client count,
   that many threads each post one image per request (multipart field ``file``, keep-alive
   connections) until every client has sent its share of 2 passes over the images, after 32
   warm-up requests: images/s, and p50/p99 latency per request. The server runs with its
   defaults, access log included (read by this script as a terminal would).
The line "ratio" is the server's images/s over the batch images/s. One JSON line per run is
appended to ``benchmarks/serve-runs.jsonl``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"
RESULTS = HERE / "serve-runs.jsonl"


def cpu_flags() -> str:
    """The vector instructions of this CPU, recorded beside every speed figure."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def ensure_run(data: Path, run: Path) -> None:
    if (run / "model.keras").is_file():
        return
    from graftkit.train.workflow import fit

    print(f"training a default run on {data} in {run} ...", flush=True)
    fit(data, run, overwrite=True, verbose=0, log=lambda _m: None)


def batch_throughput(run: Path, paths: list[str]) -> float:
    import graftkit

    clf = graftkit.load(run)
    clf.predict(paths[:64])  # warm: model loaded, traced, first batch excluded
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        clf.predict(paths)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def multipart(path: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{Path(path).name}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + Path(path).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(run: Path) -> tuple[subprocess.Popen, int]:
    graft = Path(sys.executable).with_name("graft")
    proc = subprocess.Popen([str(graft), "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "try page" in line:
            port = int(line.rsplit(":", 1)[1].strip("/\n "))
        if line.startswith("Ctrl-C"):
            # the access log (on by default, as a user runs it) goes on: keep reading it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, port
    raise RuntimeError(f"graft serve did not start: {proc.stderr.read()}")


def load_test(port: int, bodies: list, clients: int, requests: int) -> dict:
    """``clients`` threads, ``requests`` in all, one image each: images/s and latencies."""
    latencies: list[float] = []
    lock = threading.Lock()
    share = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.connect()  # with TCP_NODELAY, as curl and urllib3 (requests) set it
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mine = []
        for n in range(share[i]):
            body, ctype = bodies[(i * 7919 + n) % len(bodies)]
            t = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": ctype})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "images_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="flowers5")
    parser.add_argument("--run", help="a run folder (default: /tmp/graftkit-bench/<data>)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    data = SHARED / args.data if (SHARED / args.data).is_dir() else Path(args.data)
    run = Path(args.run or f"/tmp/graftkit-bench/{data.name}")
    ensure_run(data, run)
    paths = [row[0] for row in json.loads((run / "split.json").read_text())["val"]]  # [path, label]
    batch = batch_throughput(run, paths)
    print(f"batch: graftkit.load(run).predict on {len(paths)} images: {batch:.1f} images/s")
    bodies = [multipart(p) for p in paths]
    proc, port = start_server(run)
    rows = []
    try:
        load_test(port, bodies, 4, 32)  # warm-up
        for clients in args.clients:
            row = load_test(port, bodies, clients, 2 * len(paths))
            row["ratio"] = row["images_per_s"] / batch
            rows.append(row)
            print(f"server, {clients:>2} clients: {row['images_per_s']:6.1f} images/s "
                  f"({row['ratio']:.2f} x batch), p50 {row['p50_ms']:.0f} ms, "
                  f"p99 {row['p99_ms']:.0f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "data": data.name, "images": len(paths),
            "batch_images_per_s": batch, "server": rows, "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags()}
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
