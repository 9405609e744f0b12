"""The demo's model: a small decoder-only Transformer over characters (Flax linen)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: causal self-attention, then a GELU MLP."""

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, mask=mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(h)))


class CharTransformer(nn.Module):
    """Next-character logits ``(batch, time, vocab)`` for tokens ``(batch, time)``."""

    vocab: int
    context: int
    d_model: int
    layers: int
    heads: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        pos = self.param(
            "pos", nn.initializers.normal(0.02), (self.context, self.d_model)
        )
        x = nn.Embed(self.vocab, self.d_model)(tokens)
        x = x + pos[None, : tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            x = Block(self.heads)(x, mask)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of ``targets`` in nats."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def generate(
    model: CharTransformer,
    params: dict,
    prompt: list[int],
    n_chars: int,
    rng: jax.Array,
    temperature: float = 0.8,
) -> list[int]:
    """Samples ``n_chars`` tokens after ``prompt`` (one compiled loop), each from
    the logits over a window of at most ``model.context`` preceding tokens."""
    ctx = model.context
    buf = np.zeros(max(len(prompt) + n_chars, ctx), np.int32)
    buf[: len(prompt)] = prompt

    def body(cur: jax.Array, buf: jax.Array) -> jax.Array:
        start = jnp.maximum(cur - ctx, 0)
        window = jax.lax.dynamic_slice(buf, (start,), (ctx,))
        logits = model.apply(params, window[None])[0, cur - start - 1]
        token = jax.random.categorical(
            jax.random.fold_in(rng, cur), logits / temperature
        )
        return buf.at[cur].set(token.astype(buf.dtype))

    loop = jax.jit(
        lambda b: jax.lax.fori_loop(len(prompt), len(prompt) + n_chars, body, b)
    )
    return [int(t) for t in loop(jnp.asarray(buf))[len(prompt) : len(prompt) + n_chars]]
