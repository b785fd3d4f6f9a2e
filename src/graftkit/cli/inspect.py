"""The guide's introspection (weights, trainable_weights, non_trainable_weights) for any target."""

from __future__ import annotations

from pathlib import Path

from graftkit.errors import BackboneError


def check_target(target: str) -> None:
    """A run folder, an existing ``.keras`` file or a backbone name (no TensorFlow needed)."""
    from graftkit.backbones import REGISTRY
    from graftkit.outputs.run import read_run

    path = Path(target)
    if path.is_dir():
        read_run(path)
    elif target.endswith(".keras"):
        if not path.is_file():
            raise BackboneError(f"model file not found: {path}")
    elif target not in REGISTRY:
        raise BackboneError(f"{target!r} is not a run folder, a .keras file or a backbone "
                            f"({', '.join(REGISTRY)})")


def _load_target(target: str, unsafe: bool = False):
    from graftkit.backbones import REGISTRY, load_base
    from graftkit.backbones.registry import load_keras_file

    path = Path(target)
    if path.is_dir():
        from graftkit.classifier import load

        return f"run {path}", load(path, unsafe).model
    if target.endswith(".keras"):
        if not path.is_file():
            raise BackboneError(f"model file not found: {path}")
        return f"model file {path}", load_keras_file(path, unsafe)
    if target in REGISTRY:
        model, info = load_base(target, weights=None)
        return f"backbone {target} at {info.image_size}x{info.image_size} (as graftkit builds it)", model
    raise BackboneError(
        f"{target!r} is not a run folder, a .keras file or a backbone ({', '.join(REGISTRY)})"
    )


def inspect_target(target: str, flatten: bool = False,
                   unsafe: bool = False) -> tuple[str, list[dict], dict]:
    """``(title, per-layer rows, totals)`` for a run folder, ``.keras`` file or backbone name."""
    from graftkit.backbones.registry import count_params
    from graftkit.graft import weight_table

    title, model = _load_target(target, unsafe)
    totals: dict[str, int | str] = {
        "weights": len(model.weights),
        "trainable_weights": len(model.trainable_weights),
        "non_trainable_weights": len(model.non_trainable_weights),
        "params": count_params(model.weights),
        "trainable_params": count_params(model.trainable_weights),
    }
    if Path(target).is_dir():
        totals["trained"] = run_training(target)
    return title, weight_table(model, flatten=flatten), totals


def run_training(run_dir: str) -> str:
    """What a run trained, in words: a saved run's base is frozen again (it is ready to
    predict), so its trainable counts alone would hide what fine-tuning changed."""
    from graftkit.outputs.run import read_run

    record = read_run(run_dir)[2]
    phases = {p["name"]: p for p in record.phases}
    mode = record.mode or {}
    fine = phases.get("fine_tune")
    if fine is None or mode.get("chosen") == "head":
        why = f" ({mode['reason']}: the head-only weights were kept)" if fine is not None else ""
        return f"this run trained the head only; the base kept its pretrained weights{why}"
    return (f"this run trained the head, then fine-tuned the base: {fine['note']}; the saved "
            "model has its base frozen again, ready for predictions")


def backbone_rows() -> list[dict]:
    """The registry as rows, from its declared facts: nothing is built, TensorFlow not loaded."""
    from graftkit.backbones import REGISTRY
    from graftkit.defaults import photo_image_size

    return [{
        "name": entry.name,
        "input_size": entry.input_size,
        "params": entry.params,
        "imagenet_top1": entry.imagenet_top1,
        "fit_size": photo_image_size(entry.input_size),
        "preprocessing": entry.preprocessing.text,
        "weights_on_disk": entry.weights_on_disk(),
        "weights_source": entry.weights_source,
        "licence": entry.licence,
    } for entry in REGISTRY.values()]
