"""The optimizers by name: the one list that the CLI, the demo and the
benchmark read.

Importing this module imports neither JAX nor optax (the command line checks
names while parsing, before JAX loads): each constructor imports what it needs
when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import treeopt  # its names load on first use (PEP 562): no JAX here

if TYPE_CHECKING:
    from treeopt.base import Optimizer


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer.

    ``make(lr)`` is the optimizer as the demo trains it; ``make_matched(lr)``
    the treeopt side of the benchmark, with the hyperparameters of
    ``make_optax(lr)``, the closest optax configuration; ``demo_learning_rate``
    is the demo's peak learning rate; ``class_name`` names the class in
    ``treeopt`` (a name: importing this module must not import JAX).
    """

    name: str
    class_name: str  # the treeopt class, e.g. for options given by name
    demo_learning_rate: float
    make: Callable[[float], Optimizer]
    make_matched: Callable[[float], Optimizer]
    make_optax: Callable[[float], Any]  # an optax.GradientTransformation


def _optax() -> Any:
    import optax

    return optax


def _adamw(lr: float) -> Any:
    # Trax's decay w <- (1 - wd) w is adamw's lr * weight_decay * w.
    return _optax().adamw(lr, eps=1e-5, weight_decay=1e-5 / lr)


# Each demo learning rate is the best of a sweep over factors of about 3 (400
# steps, the demo's default model); SGD and Momentum clip the global gradient
# norm at 1 there, every other argument is Trax's default. The matched
# configurations drop what optax's counterpart lacks: clipping, and Momentum's
# and Adafactor's weight decay.
ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(
            name="sgd",
            class_name="SGD",
            demo_learning_rate=1.0,
            make=lambda lr: treeopt.SGD(lr, clip_grad_norm=1.0),
            make_matched=lambda lr: treeopt.SGD(lr),
            make_optax=lambda lr: _optax().sgd(lr),
        ),
        Entry(
            name="momentum",
            class_name="Momentum",
            demo_learning_rate=0.3,
            make=lambda lr: treeopt.Momentum(lr, clip_grad_norm=1.0),
            make_matched=lambda lr: treeopt.Momentum(
                lr, mass=0.9, weight_decay_rate=0.0
            ),
            make_optax=lambda lr: _optax().sgd(lr, momentum=0.9, nesterov=True),
        ),
        Entry(
            name="rmsprop",
            class_name="RMSProp",
            demo_learning_rate=3e-3,
            make=lambda lr: treeopt.RMSProp(lr),
            make_matched=lambda lr: treeopt.RMSProp(lr, gamma=0.9, eps=1e-8),
            make_optax=lambda lr: _optax().rmsprop(
                lr, decay=0.9, eps=1e-8, initial_scale=1.0
            ),
        ),
        Entry(
            name="adam",
            class_name="Adam",
            demo_learning_rate=1e-2,
            make=lambda lr: treeopt.Adam(lr),
            make_matched=lambda lr: treeopt.Adam(lr, weight_decay_rate=1e-5, eps=1e-5),
            make_optax=_adamw,
        ),
        Entry(
            name="adafactor",
            class_name="Adafactor",
            demo_learning_rate=0.03,
            make=lambda lr: treeopt.Adafactor(lr),
            make_matched=lambda lr: treeopt.Adafactor(lr, weight_decay_rate=0.0),
            # min_dim_size_to_factor=1: optax then factors every matrix, as Trax.
            make_optax=lambda lr: _optax().adafactor(lr, min_dim_size_to_factor=1),
        ),
        Entry(
            name="sm3",
            class_name="SM3",
            demo_learning_rate=0.1,
            make=lambda lr: treeopt.SM3(lr),
            make_matched=lambda lr: treeopt.SM3(lr, momentum=0.9),
            make_optax=lambda lr: _optax().sm3(lr, momentum=0.9),
        ),
    )
}
NAMES: tuple[str, ...] = tuple(ENTRIES)


def parse_names(text: str) -> tuple[str, ...]:
    """``'adam,sm3'`` as names; raises ``ValueError`` naming an unknown one."""
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("no optimizer given")
    for name in names:
        if name not in ENTRIES:
            raise ValueError(
                f"unknown optimizer {name!r}; choose from {', '.join(NAMES)}"
            )
    return names
