"""Which devices compute: GPUs when TensorFlow sees any, else the CPU.

On a GPU, training and the frozen pass run through Keras on the GPU; on a CPU, the frozen pass
runs through a converted engine (TFLite or OpenVINO) where it pays
(``graftkit.frozen.engine.FrozenPart``).
"""

from __future__ import annotations


def gpus() -> list[str]:
    """Names of the GPUs TensorFlow can use (empty on a CPU-only machine or build)."""
    import tensorflow as tf

    return [d.name for d in tf.config.list_logical_devices("GPU")]


def describe() -> str:
    """One line for the start of a run's log: where it trains, what computes frozen outputs."""
    found = gpus()
    if found:
        return (f"devices: {len(found)} GPU{'s' if len(found) > 1 else ''} "
                f"({', '.join(found)}): training and the frozen base on the GPU through Keras")
    from graftkit.frozen.runtimes import openvino_bf16, wanted_precision

    engines = ("OpenVINO in bfloat16" if wanted_precision() == "bf16" and openvino_bf16()
               else "TFLite")
    return ("devices: CPU (TensorFlow sees no GPU): training on the CPU; the frozen base "
            f"through {engines} where converting it pays, else compiled Keras")
