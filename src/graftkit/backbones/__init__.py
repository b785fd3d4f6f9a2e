"""Pretrained bases: a registry of names, each built to take raw pixels and end in features."""

from graftkit.backbones.registry import (
    REGISTRY,
    Backbone,
    BaseInfo,
    Preprocessing,
    block_groups,
    layers_within,
    load_base,
)

__all__ = ["REGISTRY", "Backbone", "BaseInfo", "Preprocessing", "block_groups", "layers_within",
           "load_base"]
