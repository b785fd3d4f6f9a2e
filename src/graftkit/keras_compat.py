"""Every place graftkit reaches into Keras' private modules, in one file.

Multi-worker training needs two fixes inside Keras' TensorFlow trainer and one primed cache in
its saving code (keras-team/keras#20585). They replace private functions, so they hold only for
the Keras versions they were measured on: ``check()`` refuses any other version, or one whose
private names moved, with a message that names this file, instead of letting a patched trainer
fail later in a way nobody can trace. The next Keras upgrade is this file and its test
(``tests/test_distribute.py``).
"""

from __future__ import annotations

from graftkit.errors import UsageError

# Keras versions (major, minor) the fixes below were measured on: two workers end with
# identical weights (tests/test_distribute.py).
TESTED = ((3, 15),)

# The private names the fixes read or replace, by module.
PRIVATE_NAMES = {
    "keras.src.backend.tensorflow.trainer": ("TensorFlowTrainer", "reduce_per_replica",
                                             "_collective_all_reduce_multi_worker"),
    "keras.src.saving.saving_lib": ("get_attr_skipset",),
    "keras.src.backend.common.global_state": ("set_global_attribute",),
    "keras.src.tree": ("map_structure",),
}

_PATCHED = False


class KerasVersionError(UsageError):
    """Keras is a version graftkit's private fixes were not made for (one line in the CLI)."""


def check(version: str | None = None) -> None:
    """Refuse a Keras version (or layout) the multi-worker fixes were not measured on."""
    import importlib

    import keras

    version = version or keras.__version__
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    tested = ", ".join(f"{a}.{b}" for a, b in TESTED)
    if major_minor not in TESTED:
        raise KerasVersionError(
            f"multi-worker training patches Keras internals measured on Keras {tested}, and "
            f"Keras {version} is installed: install keras=={tested}.* (pip install "
            f"'keras~={tested}.0'), or update graftkit/keras_compat.py for this version")
    for module, names in PRIVATE_NAMES.items():
        found = importlib.import_module(module)
        missing = [n for n in names if not hasattr(found, n)]
        if missing:
            raise KerasVersionError(
                f"Keras {version} has no {module}.{missing[0]}: graftkit/keras_compat.py "
                "must be updated for it")


def patch_multi_worker_trainer() -> None:
    """Two fixes Keras 3's TensorFlow trainer needs under ``MultiWorkerMirroredStrategy``.

    Measured with Keras 3.15 / TF 2.21 (keras-team/keras#20585): ``fit`` averages the first
    *input batch* across workers to build the model (``PerReplica`` conversion error), and
    averages scalar logs along axis 0 ("Invalid reduction dimension 0"). The first batch of
    the local replica builds the model as well; scalars are averaged with no axis. With both,
    two workers end with identical weights.
    """
    global _PATCHED
    if _PATCHED:
        return
    check()
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    def local(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tree.map_structure(
                    lambda v: local(self.distribute_strategy, v), batch)
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    reduce_per_replica = trainer.reduce_per_replica

    def reduce_fixed(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(
                strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_fixed
    _PATCHED = True


def prime_saving_cache() -> None:
    """Make Keras' saving create no variables when only the chief saves.

    Each save builds reference objects (an ``Optimizer`` among them) to learn which attributes
    to skip, and its cache never hits (Keras 3.15 stores under ``saving_attr_skipset_`` and
    reads ``saving_attr_skiplist_``). A variable created under ``MultiWorkerMirroredStrategy``
    is a collective broadcast, so a checkpoint written by the chief alone would desynchronise
    the workers ("Collective instance ... expected type"). Computed here, outside the scope,
    and stored where the lookup reads.
    """
    check()
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    for kind in ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer",
                 "Loss"):
        global_state.set_global_attribute(f"saving_attr_skiplist_{kind}",
                                          saving_lib.get_attr_skipset(kind))
