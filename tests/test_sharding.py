"""Sharded slots follow their weights; sharded steps equal one-device steps.

The cases run on 8 virtual CPU devices in one subprocess (``sharding_worker.py``;
the device count must be set before JAX starts); this module checks what it
recorded against the slot layout of SPEC section 3 and against the same steps
on one device. The API's error paths run here, on one device.
"""

import fcntl
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding_cases as sc
import treeopt
from treeopt import sharding

from helpers import assert_reordered_close, assert_sum_close, isa_flags

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = [f"{i}/{c}" for _, _, i in sc.OPTIMIZERS for c in sc.COMBOS]
OPT_OF = {i: (cls, kw) for cls, kw, i in sc.OPTIMIZERS}


def _run_worker(out):
    env = {**os.environ, "XLA_FLAGS": isa_flags(), "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "sharding_worker.py"), str(out)],
            env=env,
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"sharding_worker.py timed out:\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"sharding_worker.py failed:\n{proc.stderr[-4000:]}")
    (out / "done").touch()


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """Runs every sharded case once; returns (summary dict, arrays npz).

    Under pytest-xdist the worker processes share one run (the first takes a
    lock and runs it, the others wait and read its files) instead of each
    paying for its own.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this session's xdist workers only
    out = root / "sharded"
    out.mkdir(exist_ok=True)
    with open(root / "sharded.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done").exists():
                _run_worker(out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return summary, np.load(out / "arrays.npz")


def _full(spec):
    """A spec as JSON would carry it: tuples of mesh axes as lists."""
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def expected_slot_specs(opt, spec):
    """SPEC section 3's slot layout, leaf by leaf in flatten order, with each
    slot leaf taking the weight's spec entries of the axes it keeps."""
    spec = _full(spec)
    if isinstance(opt, treeopt.SGD):
        return []
    if isinstance(opt, treeopt.Adam):
        return [spec, spec]
    if isinstance(opt, treeopt.Momentum | treeopt.RMSProp):
        return [spec]
    if isinstance(opt, treeopt.Adafactor):
        if opt.factored and len(spec) >= 2:
            stats = [spec[:-1], spec[:-2] + spec[-1:]]
        else:
            stats = [spec]
        return stats + ([spec] if opt.do_momentum else [])
    assert isinstance(opt, treeopt.SM3)
    per_axis = [[e] for e in spec] or [[]]
    m = [spec] if opt.has_momentum else []
    return m + per_axis + (per_axis if opt.graft else [])


@pytest.mark.parametrize("key", KEYS)
def test_slots_follow_weights(worker, key):
    summary, _ = worker
    case_id, combo_id = key.split("/")
    cls, kwargs = OPT_OF[case_id]
    layout = sc.COMBOS[combo_id]["layout"]
    assert list(layout) == sorted(layout)  # the order jax.tree flattens a dict
    want = [s for k in layout for s in expected_slot_specs(cls(**kwargs), layout[k])]
    rec = summary[key]
    assert rec["rule_specs"] == want, "slot_shardings"
    assert rec["init_specs"] == want, "sharding.tree_init"
    assert rec["slot_specs"] == want, "slots returned by the jitted tree_update"
    assert rec["weight_specs"] == {k: _full(v) for k, v in layout.items()}


@pytest.mark.parametrize("key", KEYS)
def test_no_weight_or_slot_moves(worker, key):
    """Only reductions communicate: no all-gather, all-to-all or permute."""
    assert set(worker[0][key]["collectives"]) <= {"all-reduce"}


@pytest.mark.parametrize("case_id", ["adam", "momentum-nesterov"])
def test_elementwise_optimizers_do_not_communicate(worker, case_id):
    for combo_id in sc.COMBOS:
        assert worker[0][f"{case_id}/{combo_id}"]["collectives"] == []


@pytest.mark.parametrize("key", KEYS)
def test_sharded_equals_one_device(worker, key):
    _, arrays = worker
    case_id = key.split("/")[0]
    n = len([k for k in arrays.files if k.startswith(f"{case_id}/single/")])
    assert n >= len(sc.SHAPES)
    leaves = [arrays[f"{key}/{i}"] for i in range(n)]
    single = [arrays[f"{case_id}/single/{i}"] for i in range(n)]
    path = [
        [arrays[f"{case_id}/path{t}/{i}"] for i in range(n)]
        for t in range(sc.STEPS + 1)
    ]
    # Sharded reductions (Adafactor's means, SM3's maxima, norms) add partial
    # sums across devices: another order over at most every element of a leaf.
    most = max(int(np.prod(s)) for s in sc.SHAPES.values())
    what = f"{key} (weights first, then slots)"
    assert_reordered_close(leaves, single, path, most, what)


# The axis sharding.fsdp picks for each leaf of MEMORY_MODEL (largest divisible
# by 8; the last on a tie).
FSDP_AXIS = {
    "embed": 0,
    "attn_qkv": 1,
    "attn_out": 1,
    "mlp_in": 1,
    "mlp_out": 0,
    "mlp_bias": 0,
    "ln_scale": 0,
}


def expected_bytes(opt, n):
    """Bytes per device of ``opt``'s slots for MEMORY_MODEL sharded n ways: a
    slot leaf is split n ways if it keeps the leaf's FSDP axis, else whole."""
    total = 0
    for name, shape in sc.MEMORY_MODEL.items():
        # The layout reference, fed axis numbers instead of mesh axis names,
        # tells which axes each slot leaf keeps.
        for kept in expected_slot_specs(opt, list(range(len(shape)))):
            size = 4 * int(np.prod([shape[a] for a in kept]))
            total += size // n if FSDP_AXIS[name] in kept else size
    return total


def test_memory_per_device_falls_as_one_over_n(worker):
    rows = worker[0]["memory"]
    names = [name for name, _, _ in sc.MEMORY_OPTIMIZERS]
    total_w = 4 * sum(int(np.prod(s)) for s in sc.MEMORY_MODEL.values())
    print("\nKiB per device, FSDP over n devices")
    print(f"{'n':>3} {'weights':>9} " + " ".join(f"{k:>10}" for k in names))
    for row in rows:
        n = row["n"]
        print(
            f"{n:>3} {row['weights'][0] / 1024:>9.1f} "
            + " ".join(f"{row[k][0] / 1024:>10.1f}" for k in names)
        )
        # Every leaf shards evenly: each of the n devices holds exactly 1/n.
        assert row["weights"] == [total_w // n] * n
        for name, cls, kwargs in sc.MEMORY_OPTIMIZERS:
            assert row[name] == [expected_bytes(cls(**kwargs), n)] * n, name
    assert rows[-1]["Adam"] == [2 * total_w // 8] * 8


TRAINER_KEYS = [
    f"{o}/{c}" for o, _, _ in sc.TRAINER_OPTIMIZERS for c in sc.TRAINER_COMBOS
]
TRAINER_OPT = {o: (cls, kw) for o, cls, kw in sc.TRAINER_OPTIMIZERS}


@pytest.mark.parametrize("key", TRAINER_KEYS)
def test_data_parallel_trainer_equals_one_device(worker, key):
    summary, arrays = worker
    opt_id, combo_id = key.split("/")
    rec, single = summary[f"trainer/{key}"], summary[f"trainer/{opt_id}/single"]
    assert_sum_close(rec["losses"], single["losses"], sc.MLP_SUM_TERMS, "losses")
    assert rec["traces"] == 1  # the sharded step compiles once
    path = [
        [arrays[f"trainer/{opt_id}/path{t}/{i}"] for i in range(3)]
        for t in range(sc.TRAINER_STEPS + 1)
    ]
    leaves = [arrays[f"trainer/{key}/{i}"] for i in range(3)]
    single_leaves = [arrays[f"trainer/{opt_id}/single/{i}"] for i in range(3)]
    assert_reordered_close(leaves, single_leaves, path, sc.MLP_SUM_TERMS, key)
    want = sc.TRAINER_COMBOS[combo_id]["weights"]
    assert rec["weight_specs"] == want
    cls, kwargs = TRAINER_OPT[opt_id]
    opt = cls(**kwargs)
    assert rec["slot_specs"] == [
        s for k in sorted(want) for s in expected_slot_specs(opt, want[k])
    ]


def test_data_parallel_trainer_rejects_an_uneven_batch(worker):
    assert (
        "30 rows in all, not divisible by the 8 devices"
        in (worker[0]["trainer_errors"]["rows"])
    )


# ------------------------------------------------------------- one device


def test_trainer_mesh_without_the_data_axis():
    weights, _ = sc.mlp_problem()
    with pytest.raises(ValueError, match="data_axis 'data' is not an axis"):
        treeopt.Trainer(sc.mlp_loss, treeopt.SGD(), weights, mesh=_mesh())


def test_one_device_mesh_trainer_equals_plain_trainer():
    weights, batch = sc.mlp_problem()
    mesh = jax.make_mesh((1,), ("data",))
    plain = treeopt.Trainer(sc.mlp_loss, treeopt.Adam(), weights)
    meshed = treeopt.Trainer(sc.mlp_loss, treeopt.Adam(), weights, mesh=mesh)
    key = jax.random.key(0)
    for _ in range(2):
        a, b = plain.one_step(batch, key)[0], meshed.one_step(batch, key)[0]
        assert_sum_close(a, b, sc.MLP_SUM_TERMS)
    assert isinstance(meshed.weights["w1"].sharding, NamedSharding)


def _mesh():
    return jax.make_mesh((1,), ("x",))


def test_square_weight_rows_and_columns_are_told_apart():
    mesh = _mesh()
    w = jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    got = sharding.slot_shardings(treeopt.Adafactor(do_momentum=True), [w])
    assert [s.spec for s in got[0]] == [P("x"), P(None), P("x", None)]
    got = sharding.slot_shardings(treeopt.SM3(), {"w": w})
    m, v1s, v2s = got[0]
    assert (m.spec, [s.spec for s in v1s], v2s) == (P("x", None), [P("x"), P(None)], [])


def test_shardings_alone_equal_arrays():
    mesh = _mesh()
    weights = {"a": jnp.ones((3, 5)), "b": jnp.ones((2,))}
    sh = {"a": NamedSharding(mesh, P(None, "x")), "b": NamedSharding(mesh, P("x"))}
    placed = jax.device_put(weights, sh)
    for opt in (treeopt.Adafactor(), treeopt.SM3(), treeopt.SGD()):
        assert sharding.slot_shardings(opt, sh) == sharding.slot_shardings(opt, placed)


def test_tree_init_matches_plain_tree_init():
    mesh = _mesh()
    weights = {"a": jnp.arange(6.0).reshape(2, 3), "s": jnp.asarray(2.0)}
    placed = jax.device_put(weights, NamedSharding(mesh, P()))
    opt = treeopt.RMSProp()
    slots, params = sharding.tree_init(opt, placed)
    want, want_params = opt.tree_init(weights, store_slots=False)
    assert jax.tree.structure(slots) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(slots), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert params.keys() == want_params.keys()


class _FactorsLargeOnly(treeopt.Adafactor):
    """Factors only leaves whose dims are all >= 128 (like optax's min_dim)."""

    def _is_factored(self, w):
        return super()._is_factored(w) and min(w.shape) >= 128


@pytest.mark.parametrize(
    "opt, leaf, error, match",
    [
        (treeopt.Adam(), np.ones(3), TypeError, "without a sharding"),
        (treeopt.Adam(), 1.0, TypeError, "without a sharding"),
        (
            treeopt.Adam(),
            jax.sharding.SingleDeviceSharding(jax.devices()[0]),
            TypeError,
            "NamedSharding",
        ),
        (
            treeopt.Adam(),
            jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=None),
            TypeError,
            "without a sharding",
        ),
    ],
)
def test_bad_input(opt, leaf, error, match):
    with pytest.raises(error, match=match):
        sharding.slot_shardings(opt, {"w": leaf})


def test_layout_that_depends_on_sizes_is_refused():
    # Its init no longer matches the axes Adafactor declares for the rank.
    sh = NamedSharding(_mesh(), P("x"))
    for shape in [(4, 4), (4, 6)]:
        w = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)
        with pytest.raises(ValueError, match=r"declares .*\['w'\].*init makes"):
            sharding.slot_shardings(_FactorsLargeOnly(), {"w": w})
    w = jax.ShapeDtypeStruct((128, 256), jnp.float32, sharding=sh)
    v_row, v_col = sharding.slot_shardings(_FactorsLargeOnly(), {"w": w})[0]
    assert (v_row.spec, v_col.spec) == (P("x"), P(None))


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((16, 3), P("x", None)),
        ((3, 16), P(None, "x")),
        ((8, 16), P(None, "x")),
        ((3,), P(None)),
        ((), P()),
    ],
)
def test_fsdp_rule_picks_the_largest_divisible_axis(shape, spec):
    # A 4-way mesh described abstractly (this process has one device).
    mesh = jax.sharding.AbstractMesh((4,), ("x",))
    assert sharding.fsdp(mesh, "x")((), np.zeros(shape)) == spec


def test_bytes_per_device():
    x = jnp.ones((4, 8), jnp.float32)
    y = jnp.ones((3,), jnp.bfloat16)
    assert sharding.bytes_per_device({"x": x, "y": y}) == {
        jax.devices()[0]: 4 * 8 * 4 + 3 * 2
    }
