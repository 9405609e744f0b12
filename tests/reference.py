"""float64 NumPy references for every optimizer, written from SPEC section 3.

Each optimizer has ``<name>_init(w)`` returning the Trax slot layout and
``<name>_step(step, g, w, slots, **hyperparameters)`` returning
``(w, slots)``. Defaults are the seed's documented defaults. ``run`` drives a
whole tree (with Trax's global-norm clipping) over several steps.
"""

import numpy as np

f64 = np.float64


def _a(x):
    return np.asarray(x, f64)


def _mean(x, axis=None, keepdims=False):
    """Mean that is 0 over an empty axis (SPEC: finite in, finite out)."""
    x = _a(x)
    n = x.size if axis is None else x.shape[axis]
    return np.sum(x, axis=axis, keepdims=keepdims) / max(n, 1)


# ------------------------------------------------------------------- SGD


def sgd_init(w):
    return None


def sgd_step(step, g, w, slots, learning_rate=0.01):
    return _a(w) - learning_rate * _a(g), None


# ------------------------------------------------------------------ Adam


def adam_init(w):
    return (np.zeros(np.shape(w)), np.zeros(np.shape(w)))


def adam_step(
    step,
    g,
    w,
    slots,
    learning_rate=1e-4,
    weight_decay_rate=1e-5,
    b1=0.9,
    b2=0.999,
    eps=1e-5,
):
    g, w = _a(g), _a(w)
    m, v = slots
    t = step + 1
    m = (1 - b1) * g + b1 * m
    v = (1 - b2) * g * g + b2 * v
    mhat = m / (1 - b1**t)
    vhat = v / (1 - b2**t)
    w = (1 - weight_decay_rate) * w - learning_rate * mhat / (np.sqrt(vhat) + eps)
    return w, (m, v)


# -------------------------------------------------------------- Momentum


def momentum_init(w):
    return np.zeros(np.shape(w))


def momentum_step(
    step,
    g,
    w,
    v,
    learning_rate=0.01,
    mass=0.9,
    weight_decay_rate=1e-5,
    nesterov=True,
):
    g, w = _a(g), _a(w)
    v = mass * v + g
    u = mass * v + g if nesterov else v
    return (1 - weight_decay_rate) * w - learning_rate * u, v


# --------------------------------------------------------------- RMSProp


def rms_prop_init(w):
    return np.ones(np.shape(w))


def rms_prop_step(step, g, w, a, learning_rate=1e-3, gamma=0.9, eps=1e-8):
    g, w = _a(g), _a(w)
    a = gamma * a + (1 - gamma) * g * g
    return w - learning_rate * g / (np.sqrt(a) + eps), a


# ------------------------------------------------------------- Adafactor


def adafactor_init(w, factored=True, do_momentum=False, **unused):
    shape = np.shape(w)
    if factored and len(shape) >= 2:
        slots = [np.zeros(shape[:-1]), np.zeros(shape[:-2] + shape[-1:])]
    else:
        slots = [np.zeros(shape)]
    if do_momentum:
        slots.append(np.zeros(shape))
    return slots


def _rms(x):
    return np.sqrt(_mean(_a(x) ** 2))


def adafactor_step(
    step,
    g,
    w,
    slots,
    learning_rate=0.05,
    factored=True,
    multiply_by_parameter_scale=True,
    do_clipping=True,
    do_momentum=False,
    momentum_in_bfloat16=False,
    beta1=0.0,
    decay_rate=0.8,
    clipping_threshold=1.0,
    weight_decay_rate=1e-5,
    weight_decay_n_steps=0,
    epsilon1=1e-16,
    epsilon2=1e-3,
):
    g, w = _a(g), _a(w)
    t = step + 1
    rho = 1 - t ** (-decay_rate)
    if factored and w.ndim >= 2:
        v_row, v_col = slots[0], slots[1]
        v_row = rho * v_row + (1 - rho) * _mean(g * g, axis=-1)
        v_col = rho * v_col + (1 - rho) * _mean(g * g, axis=-2)
        y = np.empty_like(g)
        # Element by element: row factor from v_row, column factor from v_col.
        for idx in np.ndindex(*g.shape):
            lead, i, j = idx[:-2], idx[-2], idx[-1]
            row_mean = _mean(v_row[lead])
            row = np.sqrt(row_mean / (v_row[(*lead, i)] + epsilon1))
            col = (v_col[(*lead, j)] + epsilon1) ** -0.5
            y[idx] = g[idx] * row * col
        new = [v_row, v_col]
    else:
        v = rho * slots[0] + (1 - rho) * g * g
        y = g * (v + epsilon1) ** -0.5
        new = [v]
    if do_clipping and clipping_threshold is not None:
        y = y / max(1.0, _rms(y) / clipping_threshold)
    scale = learning_rate
    if multiply_by_parameter_scale:
        scale = learning_rate * max(_rms(w), epsilon2)
    u = scale * y
    if do_momentum:
        m = beta1 * slots[-1] + (1 - beta1) * u
        u = m
        new.append(m)
    n = weight_decay_n_steps or 0
    wd = weight_decay_rate if n < 1 else weight_decay_rate * max(n - step, 0) / n
    return (1 - wd) * w - u, new


# ------------------------------------------------------------------- SM3


def sm3_init(w, momentum=0.9, second_moment_averaging=1.0, **unused):
    shape = np.shape(w)
    m = np.zeros(shape) if momentum > 0 else []
    axes = [(d,) for d in shape] or [()]
    v1s = [np.zeros(s) for s in axes]
    v2s = [np.zeros(s) for s in axes] if second_moment_averaging != 1 else []
    return (m, v1s, v2s)


def _precond(acc, g):
    out = np.zeros_like(g)
    pos = acc > 0
    out[pos] = g[pos] / (np.sqrt(acc[pos]) + 1e-16)
    return out


def _sm3_accumulate(vs, g, beta2, c):
    """Returns (acc, new per-axis accumulators) with explicit index loops."""
    if g.ndim <= 1:
        acc = beta2 * vs[0] + c * g * g
        return acc, [acc]
    acc = np.empty_like(g)
    for idx in np.ndindex(*g.shape):
        cover = min(vs[i][k] for i, k in enumerate(idx))
        acc[idx] = beta2 * cover + c * g[idx] ** 2
    new = []
    for i, d in enumerate(g.shape):
        row = np.zeros(d)
        for idx in np.ndindex(*g.shape):
            row[idx[i]] = max(row[idx[i]], acc[idx])
        new.append(row)
    return acc, new


def sm3_step(
    step,
    g,
    w,
    slots,
    learning_rate=0.01,
    momentum=0.9,
    second_moment_averaging=1.0,
    weight_decay=0.0,
    momentum_type=1,
):
    g, w = np.atleast_1d(_a(g)), np.atleast_1d(_a(w))
    m, v1s, v2s = slots
    b2 = second_moment_averaging
    c = 1.0 if b2 == 1 else 1 - b2
    v1s = [np.atleast_1d(v) for v in v1s]
    acc, new_v1s = _sm3_accumulate(v1s, g, b2, c)
    pg = _precond(acc, g)
    new_v2s = []
    if b2 != 1:
        acc2, new_v2s = _sm3_accumulate([np.atleast_1d(v) for v in v2s], g, 1.0, 1.0)
        pg_graft = _precond(acc2, g)
        pg = pg * np.linalg.norm(pg_graft) / (np.linalg.norm(pg) + 1e-16)
    pg = pg + weight_decay * w
    u, new_m = pg, []
    if momentum > 0:
        b = momentum
        if momentum_type == 1:
            new_m = (1 - b) * pg + b * np.reshape(m, g.shape)
            u = new_m
        else:
            new_m = pg + b * np.reshape(m, g.shape)
            u = pg + b * new_m if momentum_type == 3 else new_m
    w_new = w - u * learning_rate
    if np.ndim(slots[1][0]) == 0:  # rank-0 weight: undo atleast_1d
        w_new = w_new.reshape(())
        new_m = new_m.reshape(()) if momentum > 0 else []
        new_v1s = [v.reshape(()) for v in new_v1s]
        new_v2s = [v.reshape(()) for v in new_v2s]
    return w_new, (new_m, new_v1s, new_v2s)


# ------------------------------------------------------------------ tree


REFERENCES = {
    "SGD": (sgd_init, sgd_step),
    "Adam": (adam_init, adam_step),
    "Momentum": (momentum_init, momentum_step),
    "RMSProp": (rms_prop_init, rms_prop_step),
    "Adafactor": (adafactor_init, adafactor_step),
    "SM3": (sm3_init, sm3_step),
}

_STRUCTURAL = {"factored", "do_momentum", "momentum", "second_moment_averaging"}


def global_norm(leaves):
    return np.sqrt(sum(np.sum(_a(x) ** 2) for x in leaves))


def run(name, kwargs, weights, grads_per_step, start_step=0):
    """Runs optimizer ``name`` over a list of leaves for ``len(grads_per_step)``
    steps; returns (weights, slots) in float64, slots in the Trax layout."""
    init, step_fn = REFERENCES[name]
    kwargs = dict(kwargs)
    clip = kwargs.pop("clip_grad_norm", None)
    init_kwargs = {k: v for k, v in kwargs.items() if k in _STRUCTURAL}
    ws = [_a(w) for w in weights]
    slots = [init(w, **init_kwargs) if init_kwargs else init(w) for w in ws]
    for k, grads in enumerate(grads_per_step):
        grads = [_a(g) for g in grads]
        if clip is not None:
            norm = global_norm(grads)
            if norm >= clip:
                grads = [g * (clip / norm) for g in grads]
        out = [
            step_fn(start_step + k, g, w, s, **kwargs)
            for g, w, s in zip(grads, ws, slots, strict=True)
        ]
        ws = [o[0] for o in out]
        slots = [o[1] for o in out]
    return ws, slots
