"""Warm start: a new network begins from the weights of an earlier one of the same architecture.

A network of a later recipe (another head, metadata dropout, another augmentation) need not learn
its image features from scratch again when an earlier network of the same backbone has them —
provided the earlier network never saw the rows the new one is validated on. So a fold student
starts from a member of the same fold of an ensemble (trained without that fold), and the final
student from a network trained on the development rows alone; the calibration patients stay out of
both, as they always do.

Weights are copied layer by layer in the graph's order, every layer that holds weights except the
new network's own heads (:data:`NEW_LAYERS`, e.g. the differential's head: it starts fresh). The
shapes must agree one for one, or nothing is copied and the reason is said.
"""

from __future__ import annotations

import logging
from pathlib import Path

from model.errors import ModelError
from model.inference.network import DIAGNOSIS_HEAD

log = logging.getLogger(__name__)

NEW_LAYERS = (DIAGNOSIS_HEAD,)


def parse(value: str) -> tuple[Path, int | None]:
    """``PATH`` (a bundle folder or a ``.keras`` file) or ``PATH#k`` (the k-th member of an
    ensemble bundle, in the order the bundle holds them)."""
    path, _, member = value.partition("#")
    if member and not member.isdigit():
        raise ModelError(f"warm start {value!r}: after '#' comes a member number (0, 1, …)")
    return Path(path), int(member) if member else None


def source_network(value: str):
    """The network a warm start copies from."""
    import keras

    path, member = parse(value)
    if path.is_dir():
        from model.inference import bundle

        network = bundle.load(path).network
    elif path.is_file():
        network = keras.saving.load_model(path, compile=False)
    else:
        raise ModelError(f"warm start {value!r}: no such bundle folder or .keras file")
    nested = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    if member is None:
        if nested:
            raise ModelError(f"warm start {value!r}: an ensemble of {len(nested)} members: name one with #k")
        return network
    if not 0 <= member < len(nested):
        raise ModelError(f"warm start {value!r}: the bundle holds {len(nested)} member(s)")
    return nested[member]


def weighted_layers(model, skip=()) -> list:
    return [layer for layer in model.layers if layer.weights and layer.name not in skip]


def copy_weights(target, source) -> int:
    """Copy ``source``'s weights into ``target`` (in place); returns the number of tensors copied."""
    # a source with heads of its own (a bundle with a differential: v4 on) gives them to no one
    to, frm = weighted_layers(target, NEW_LAYERS), weighted_layers(source, NEW_LAYERS)
    if len(to) != len(frm):
        raise ModelError(f"warm start: {len(frm)} layers with weights in the source, {len(to)} in the new network")
    for a, b in zip(to, frm, strict=True):
        shapes_a = [tuple(w.shape) for w in a.weights]
        shapes_b = [tuple(w.shape) for w in b.weights]
        if shapes_a != shapes_b:
            raise ModelError(f"warm start: layer {a.name} {shapes_a} does not match the source's {b.name} {shapes_b}")
    for a, b in zip(to, frm, strict=True):
        a.set_weights(b.get_weights())
    copied = sum(len(layer.weights) for layer in to)
    log.info("warm start: %d weight tensors in %d layers copied", copied, len(to))
    return copied
