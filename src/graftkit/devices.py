"""Which devices compute: GPUs when TensorFlow sees any, else the CPU.

On a GPU, training and the frozen pass run through Keras on the GPU; on a CPU, the frozen pass
runs through a converted engine (TFLite or OpenVINO) where it pays
(``graftkit.frozen.engine.FrozenPart``, which also says so at the start of a run).
"""

from __future__ import annotations


def gpus() -> list[str]:
    """Names of the GPUs TensorFlow can use (empty on a CPU-only machine or build)."""
    import tensorflow as tf

    return [d.name for d in tf.config.list_logical_devices("GPU")]
