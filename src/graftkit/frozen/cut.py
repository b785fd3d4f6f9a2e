"""The base cut at a block boundary into a frozen bottom and a trainable top.

Everything below the fine-tuned blocks is frozen and in inference mode, so its output is a pure
function of the image: computed once (``graftkit.frozen.extract``) instead of every epoch.
``split_base`` cuts the base for training; ``SplitClassifier`` runs a trained model the same way
for prediction, through the engine training converted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from graftkit.backbones.registry import block_groups, layers_within
from graftkit.frozen.engine import FrozenPart, compiled, engine_path
from graftkit.frozen.precision import EngineFile
from graftkit.graft import weights_digest


@dataclass
class BaseSplit:
    """The base cut at a block boundary: ``top(bottom(x)) == base(x)``, layers shared."""

    bottom: keras.Model  # raw pixels -> activations at the cut (frozen)
    top: keras.Model | None  # activations -> pooled features; None when the cut is the output
    cut: str  # the name of the first layer above the cut, or "output"
    blocks: int  # blocks above the cut

    def frozen_model(self) -> keras.Model:
        """Pixels -> [pooled features] or [cut activations, pooled features], in one pass.

        Phase 1 needs the pooled features of the pretrained top, phase 2 the activations at
        the cut; both are pure functions of the image before phase 2, so one run gives both.
        """
        if self.top is None:
            return self.bottom
        x = keras.Input(self.bottom.inputs[0].shape[1:], name="pixels")
        cut = self.bottom(x)
        return keras.Model(x, [cut, self.top(cut)], name="frozen_" + self.cut)



def _node_in(model: keras.Model, layer) -> Any:
    """The call of ``layer`` inside ``model``'s graph (a layer also used elsewhere has more)."""
    mine = getattr(model, "_nodes", ())  # Keras' keys: "{id(operation)}_ib-{node index}"
    nodes = [n for i, n in enumerate(getattr(layer, "_inbound_nodes", []))
             if f"{id(layer)}_ib-{i}" in mine]
    return nodes[0] if len(nodes) == 1 else None



def cut_model(model: keras.Model, first: keras.layers.Layer):
    """``(bottom, top)`` of ``model`` cut just below ``first``, recursing into nested models."""
    outputs = model.outputs if len(model.outputs) > 1 else model.outputs[0]
    if first in model.layers:
        node = _node_in(model, first)
        if node is None or len(node.input_tensors) != 1:
            return None
        cut = node.input_tensors[0]
        return keras.Model(model.inputs, cut), keras.Model(cut, outputs)
    for child in model.layers:
        if isinstance(child, keras.Model) and any(
                layer is first for layer in layers_within(child)):
            node = _node_in(model, child)
            inner = cut_model(child, first)
            if node is None or inner is None or len(node.input_tensors) != 1:
                return None
            inner_bottom, inner_top = inner
            before = _between(model.inputs[0], node.input_tensors[0])
            after = _between(node.output_tensors[0], outputs)
            x = keras.Input(model.inputs[0].shape[1:])
            bottom = keras.Model(x, inner_bottom(before(x) if before else x))
            a = keras.Input(inner_top.inputs[0].shape[1:])
            y = inner_top(a)
            return bottom, keras.Model(a, after(y) if after else y)
    return None



def _between(start, end) -> keras.Model | None:
    """The layers from tensor ``start`` to tensor ``end`` as a model; None when they coincide."""
    return None if start is end else keras.Model(start, end)



def _weighted_leaves(model) -> set[int]:
    from graftkit.backbones.registry import layers_within

    return {id(layer) for layer in layers_within(model, leaves_only=True) if layer.weights}



def first_above(groups: list, top_n: int):
    """The first layer of the top ``top_n`` blocks; None when there are not more blocks."""
    return groups[-top_n][0] if 0 < top_n < len(groups) else None



def cut_blocks(unfreeze: int | str, fine_tune_epochs: int, mode: str | None = None) -> int:
    """Blocks above the cut for a run's options: the top blocks it fine-tuned, else none.

    Fine-tuning "all" changes every layer, so only the head sits above a frozen bottom then;
    ``--mode head`` fine-tunes nothing, so the cut is above the whole base.
    """
    fine_tunes = fine_tune_epochs and mode != "head"
    return unfreeze if isinstance(unfreeze, int) and fine_tunes else 0


def serving_cut(unfreeze: int | str, fine_tune_epochs: int, mode: str | None,
                chosen: str | None) -> tuple[int, int]:
    """``(top_n, pooled_top)`` of a finished run's fast path.

    A run cut below its top blocks whose ``--mode auto`` kept the head (``chosen`` "head")
    trained that head on the frozen part's pooled output, the pretrained top blocks run by the
    engine with the bottom. It is served the same way (``pooled_top`` blocks above the engine's
    cut, the head alone in Keras): in int8 the top blocks round differently from Keras, and
    the head would meet features it never saw (up to half a point of validation
    accuracy, either way, on the photo sets).
    """
    top_n = cut_blocks(unfreeze, fine_tune_epochs, mode)
    return (0, top_n) if top_n and chosen == "head" else (top_n, 0)



def split_base(base: keras.Model, block_pattern: str, top_n: int) -> BaseSplit | None:
    """Cut ``base`` below its top ``top_n`` blocks; None where no single tensor separates them.

    A skip connection that crosses the cut would make the top depend on more than the cut
    activations; the check that the top holds exactly the top blocks' layers refuses that.
    """
    if top_n == 0:
        return BaseSplit(base, None, "output", 0)
    groups = block_groups(base, block_pattern)
    first = first_above(groups, top_n)
    if first is None:
        return None
    try:
        parts = cut_model(base, first)
    except (ValueError, TypeError):
        return None
    if parts is None:
        return None
    bottom, top = parts
    wanted = {id(layer) for group in groups[-top_n:] for layer in group}
    if _weighted_leaves(top) != wanted:
        return None
    return BaseSplit(bottom, top, first.name, top_n)



def part_key(model: keras.Model, image_size: int, cut: str) -> str:
    """Names a frozen part by what decides its output: weights, input size, cut."""
    text = f"{weights_digest(model)[:16]}:{image_size}:{cut}:{keras.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]



class SplitClassifier:
    """A trained classifier run as frozen bottom (``FrozenPart``) + Keras for the rest.

    The bottom of a model fine-tuned above a cut still holds the pretrained weights, so the
    engine ``graft fit`` converted (named by ``engine_key``) serves it without converting
    again; the parity check on the first batch guards the match. Twice Keras' images/s here.
    """

    def __init__(self, model: keras.Model, block_pattern: str, top_n: int,
                 engine_key: str | None = None, frozen: FrozenPart | None = None,
                 int8_engine: EngineFile | None = None, pooled_top: int = 0):
        from graftkit.graft import BASE, HEAD_DROPOUT

        # ``pooled_top``: the engine is the fit's frozen part cut below this many blocks
        # ([cut activations, pooled features]); its pooled output feeds the head (serving_cut)
        self.index = 1 if pooled_top else 0
        if top_n > 0:
            first = first_above(block_groups(model.get_layer(BASE), block_pattern), top_n)
            if first is None:
                raise ValueError(f"cannot cut below {top_n} blocks")
        else:
            first = model.get_layer(HEAD_DROPOUT)
        parts = cut_model(model, first)
        if parts is None:
            raise ValueError("no single tensor separates the top blocks")
        self.bottom, self.rest = parts
        self._rest: Callable[[np.ndarray], list[np.ndarray]] | None = None
        # ``frozen``: a part already running whose first output is this bottom's (fit's own).
        # Only that output is used, and only it is checked against Keras: the others may pass
        # through layers trained since (fit's pooled features, through the fine-tuned top).
        if frozen is not None:
            frozen.checked_outputs = 1
        engine_model, cut_name = self.bottom, first.name
        if frozen is None and pooled_top:
            split = split_base(model.get_layer(BASE), block_pattern, pooled_top)
            if split is None or split.top is None:
                raise ValueError(f"cannot cut below {pooled_top} blocks")
            engine_model, cut_name = split.frozen_model(), split.cut
        key = engine_key
        if not key or not engine_path(key).is_file():
            key = part_key(engine_model, int(model.inputs[0].shape[1]), cut_name)
        # ``int8_engine``: an int8 run's engine (its head trained on that engine's outputs)
        self.frozen = frozen or FrozenPart(engine_model, key, engine_file=int8_engine)

    def plan(self, images: int) -> str:
        return self.frozen.plan(images)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """The model's (last) output: its probabilities."""
        return self.outputs(pixels)[-1]

    def outputs(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Every output of the model (``[features, probabilities]`` for ``with_features``)."""
        return self.rest_outputs(self.frozen(pixels)[self.index])

    def rest_outputs(self, cut: np.ndarray) -> list[np.ndarray]:
        """The model's outputs from the bottom's outputs (e.g. cached activations)."""
        if self._rest is None:
            self._rest = compiled(self.rest)
        return self._rest(cut)



def block_pattern_of(backbone: str | None) -> str:
    """The block names of a run's base: the registry's for its backbone, else the generic
    pattern (a user's own base)."""
    from graftkit.backbones.registry import GENERIC_BLOCK_PATTERN, REGISTRY

    entry = REGISTRY.get(backbone or "")
    return entry.block_pattern if entry else GENERIC_BLOCK_PATTERN


def split_classifier(model: keras.Model, backbone: str | None, top_n: int,
                     key: str | None, int8_engine: EngineFile | None = None,
                     pooled_top: int = 0) -> SplitClassifier | None:
    """The fast path for a run's model, cut below its top ``top_n`` blocks (what the run
    fine-tuned) with the cached engine ``key`` (or an int8 run's engine); None if the model
    does not split. ``pooled_top``: see ``serving_cut``."""
    try:
        return SplitClassifier(model, block_pattern_of(backbone), top_n, key,
                               int8_engine=int8_engine, pooled_top=pooled_top)
    except (ValueError, KeyError):
        return None
