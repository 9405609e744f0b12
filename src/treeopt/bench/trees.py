"""The benchmark's weight trees: their shapes, and random arrays of them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Shapes = dict[str, tuple[int, ...]]  # "a/b/c" -> shape of that leaf


def transformer_shapes(
    d_model: int = 512,
    n_layers: int = 8,
    vocab: int = 2048,
    seq: int = 512,
    n_heads: int = 8,
    d_ff: int | None = None,
) -> Shapes:
    """Leaf shapes of a decoder-only transformer (Flax-like naming and layout).

    The defaults give 26.5M parameters in 132 leaves; ``d_model=2048,
    n_layers=20, vocab=32768, seq=2048, n_heads=16`` gives 1.08B in 324.
    """
    d, h = d_model, n_heads
    hd, ff = d // h, d_ff or 4 * d_model
    shapes: Shapes = {"embed": (vocab, d), "pos_embed": (seq, d)}
    for i in range(n_layers):
        p = f"layer{i:02d}/"
        shapes |= {
            p + "ln1/scale": (d,),
            p + "ln1/bias": (d,),
            p + "attn/query": (d, h, hd),
            p + "attn/key": (d, h, hd),
            p + "attn/value": (d, h, hd),
            p + "attn/query_bias": (h, hd),
            p + "attn/key_bias": (h, hd),
            p + "attn/value_bias": (h, hd),
            p + "attn/out": (h, hd, d),
            p + "attn/out_bias": (d,),
            p + "ln2/scale": (d,),
            p + "ln2/bias": (d,),
            p + "mlp/wi": (d, ff),
            p + "mlp/bi": (ff,),
            p + "mlp/wo": (ff, d),
            p + "mlp/bo": (d,),
        }
    shapes |= {"final_ln/scale": (d,), "final_ln/bias": (d,)}
    return shapes


# Eight shapes averaging 1000 elements: small matrices, vectors, a 3-d kernel.
_SMALL_SHAPES = (
    (32, 32),
    (1024,),
    (16, 64),
    (8, 8, 16),
    (512,),
    (48, 32),
    (256,),
    (40, 40),
)


def many_small_shapes(n_leaves: int = 2000, scale: int = 1) -> Shapes:
    """``n_leaves`` leaves of about ``1000 * scale`` elements each (8 shapes)."""
    shapes: Shapes = {}
    for i in range(n_leaves):
        s = _SMALL_SHAPES[i % len(_SMALL_SHAPES)]
        shapes[f"block{i // 8:03d}/p{i % 8}"] = (s[0] * scale, *s[1:])
    return shapes


def one_big_shapes(n: int = 4096) -> Shapes:
    """One ``n x n`` matrix."""
    return {"w": (n, n)}


def nbytes(tree: Any) -> int:
    """Bytes of a tree's leaves (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def nest(shapes: Shapes, leaf: Callable[[tuple[int, ...]], Any]) -> dict:
    """The flat ``'a/b/c'`` names as a nested dict, one ``leaf(shape)`` each."""
    tree: dict = {}
    for name, shape in shapes.items():
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf(shape)
    return tree


def make_tree(shapes: Shapes, seed: int, dtype: Any = jnp.float32) -> dict:
    """A nested dict of random normal leaves (std 0.02), drawn on the device.

    One draw of every element, cut into the leaves on the host and put back:
    for 2000 small leaves 0.8 s the first time (compiling the draw), then
    0.2 s, where a draw per leaf took 6 s (dispatch, and a compile per shape)
    and a jitted split 39 s to compile.
    """
    sizes = [math.prod(s) for s in shapes.values()]
    flat = 0.02 * jax.random.normal(jax.random.key(seed), (sum(sizes),), dtype)
    host = np.asarray(flat)
    # Freed now, not when collected: on the CPU ``host`` is a view of ``flat``
    # and ``flat`` caches ``host``, a cycle that only the garbage collector
    # would break. The view keeps the memory it reads.
    flat.delete()
    parts = iter(np.split(host, np.cumsum(sizes)[:-1]))
    return jax.device_put(nest(shapes, lambda shape: next(parts).reshape(shape)))
