"""Where training runs: one device, several GPUs, or several machines, through ``tf.distribute``.

TensorFlow's own distribution engine trains a Keras 3 model (TensorFlow backend) on several
devices (``MirroredStrategy``) and machines (``MultiWorkerMirroredStrategy``, configured by the
standard ``TF_CONFIG``); graftkit only chooses the strategy, scales batch size and learning rate
with the replicas, and keeps the run folder to the chief. Rules (README, "Scaling out"):

- ``--batch-size`` is per replica: the global batch is ``batch_size x replicas``;
- both learning rates scale linearly with the replicas (Goyal et al., 2017), since a batch
  ``k`` times larger takes ``k`` times fewer steps;
- every worker runs the same command with the same ``--out``, readable by all of them (a resume
  reads the checkpoint from it); only the chief (worker 0) writes there.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftkit import keras_compat
from graftkit.defaults import STRATEGIES


@dataclass
class Distribution:
    """The strategy a run trains under, and this process's place in it."""

    name: str  # "default", "mirrored" or "multi-worker"
    strategy: Any  # a tf.distribute.Strategy; None for the default one
    replicas: int = 1  # model copies in sync, over all workers
    workers: int = 1
    worker: int = 0  # this process's index among the workers
    chief: bool = True  # writes the run folder

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def batch_size(self, per_replica: int) -> int:
        return per_replica * self.replicas

    def learning_rate(self, lr: float) -> float:
        return lr * self.replicas

    def barrier(self) -> None:
        """Wait until every worker gets here (one all-reduce); nothing to wait for alone."""
        if self.workers > 1:
            import tensorflow as tf

            s = self.strategy
            assert s is not None  # several workers: a MultiWorkerMirroredStrategy
            one = tf.function(lambda: s.run(lambda: tf.constant(1.0)))  # eager run: a warning
            s.reduce("SUM", one(), axis=None)

    def describe(self) -> str:
        if self.name == "default":
            return "one device (default strategy)"
        where = f"{self.replicas} replica{'s' if self.replicas > 1 else ''}"
        if self.workers > 1:
            role = "chief" if self.chief else "writes nothing"
            return (f"{self.name}: {where} on {self.workers} workers, this is worker "
                    f"{self.worker} ({role})")
        return f"{self.name}: {where}"


def _cluster() -> tuple[dict, dict]:
    from graftkit.errors import UsageError

    text = os.environ.get("TF_CONFIG", "")
    if not text:
        raise UsageError("--strategy multi-worker needs TF_CONFIG (the cluster and this worker's "
                         "task) in the environment of every worker; see README 'Scaling out'")
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        int(task["index"])
        str(task["type"])
    except (ValueError, KeyError, TypeError):
        raise UsageError('TF_CONFIG is not valid: it must be JSON like {"cluster": {"worker": '
                         '["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
                         ) from None
    return cluster, task


def make_distribution(name: str = "auto") -> Distribution:
    """The strategy for ``--strategy``: create it before any other TensorFlow work."""
    import tensorflow as tf

    from graftkit.errors import UsageError

    if name not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {name!r})")
    from graftkit.devices import gpus

    if name == "auto":
        name = "mirrored" if len(gpus()) > 1 else "default"
    if name == "default":
        return Distribution("default", None)
    if name == "mirrored":
        devices = gpus() or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        return Distribution("mirrored", strategy, strategy.num_replicas_in_sync)
    cluster, task = _cluster()
    keras_compat.patch_multi_worker_trainer()  # checks the Keras version first
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras_compat.prime_saving_cache()
    members = [(kind, i) for kind in ("chief", "worker") for i in range(len(cluster.get(kind, [])))]
    me = (task["type"], int(task["index"]))
    if me not in members:
        raise UsageError(f"TF_CONFIG's task {me[0]}:{me[1]} is not in its cluster")
    return Distribution("multi-worker", strategy, strategy.num_replicas_in_sync, len(members),
                        members.index(me), bool(strategy.extended.should_checkpoint))


def eval_batch_size(n: int, batch: int, replicas: int) -> int:
    """A batch size near ``batch`` whose last batch still has a row for every replica.

    An empty replica batch breaks evaluation (BatchNormalization on zero rows), and
    validation must see every image exactly once, so dropping or padding rows is no answer.
    """
    if replicas <= 1:
        return batch
    from graftkit.errors import DataError

    if n < replicas:
        raise DataError(f"{n} validation images cannot be spread over {replicas} replicas: "
                        "use more validation images or fewer replicas")
    start = min(batch, n)
    upward = range(max(start + 1, replicas), n + 1)  # b == n always does
    for b in [*range(start, replicas - 1, -1), *upward]:
        if n % b == 0 or n % b >= replicas:
            return b
    return n


def _ephemeral_floor() -> int:
    """The lowest port the OS hands out for ``bind(0)`` and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # the IANA dynamic range: macOS and Windows use it


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, rng=None) -> list[int]:
    """``count`` free ports on 127.0.0.1, chosen below the OS's ephemeral range.

    A port from ``bind(0)`` is free only until its socket closes: the OS may hand the same
    number to the next ``bind(0)`` or outgoing connection of any process before the worker binds
    it. Ports below the ephemeral range are never handed out so; one that is free now stays free
    unless another program asks for that exact number.
    """
    import random

    rng = rng or random.SystemRandom()
    top = min(_ephemeral_floor(), 65536)
    low = max(1024, top - 16384)
    found: list[int] = []
    for _ in range(2000):
        port = rng.randrange(low, top)
        if port not in found and _bindable(port):
            found.append(port)
            if len(found) == count:
                return found
    raise OSError(f"no {count} free ports on 127.0.0.1 between {low} and {top}")


def loopback_configs(workers: int) -> list[str]:
    """``TF_CONFIG`` values for ``workers`` processes on this machine (free ports on 127.0.0.1).

    For trying a cluster locally: the tests and ``benchmarks/scaling.py`` start workers so.
    """
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(workers)]


def worker_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is TensorFlow reporting a lost peer (a worker died or got cut off)."""
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return isinstance(exc, (tf.errors.UnavailableError, tf.errors.AbortedError,
                            tf.errors.DeadlineExceededError, tf.errors.CancelledError))
