"""treeopt.trax_checkpoint: real Trax 1.4.1 checkpoints load bit-exactly and
resume to Trax's own next step; files written in Trax's format for the other
optimizers load back into tree_init's layout; bad files raise named errors and
a crafted pickle runs nothing."""

import functools
import gzip
import io
import json
import pickle
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeopt
from treeopt import MomentumType, trax_checkpoint

DATA = Path(__file__).parent / "data" / "trax_checkpoints"
OPTIMIZERS = {"adafactor": treeopt.Adafactor, "adam": treeopt.Adam, "sgd": treeopt.SGD}
TRAX_KEYS = [
    "step",
    "flat_weights",
    "flat_state",
    "flat_eval_state",
    "history",
    "slots_per_task",
    "input_signature",
    "version_timestamp",
]


def _golden(case):
    meta = json.loads((DATA / case / "golden.json").read_text())
    npz = np.load(DATA / case / "golden.npz")
    return meta, npz


def _leaves(npz, prefix):
    n = sum(k.startswith(prefix) for k in npz.files)
    return [npz[f"{prefix}{i}"] for i in range(n)]


def _assert_exact(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g = np.asarray(g)
        assert g.shape == w.shape, i
        # golden stores bfloat16 as exact float32: compare values.
        np.testing.assert_array_equal(g.astype(np.float32), w, err_msg=f"leaf {i}")


# ------------------------------------------------- real Trax checkpoints


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_trax_checkpoint_loads_exactly_and_resumes_like_trax(case):
    meta, npz = _golden(case)
    opt = OPTIMIZERS[case](**meta["constructor_kwargs"])
    ckpt = trax_checkpoint.load(DATA / case / "model", opt)

    assert ckpt.step == meta["checkpoint_step"] == 3
    assert ckpt.state == [] and ckpt.eval_state == []
    assert ckpt.history == {"_values": {}}
    assert ckpt.input_signature == (jax.ShapeDtypeStruct((8, 3), jnp.float32),)
    assert ckpt.version_timestamp == "Mar-10-2021"
    assert len(ckpt.slots_per_task) == 1 and ckpt.slots is ckpt.slots_per_task[0]

    _assert_exact(ckpt.weights, _leaves(npz, "w3__"))
    assert [str(w.dtype) for w in ckpt.weights] == [
        x["dtype"] for x in meta["weight_leaves"]
    ]
    # The slots have tree_init's per-leaf layout and the file's values.
    fresh, _ = opt.tree_init(ckpt.weights, store_slots=False)
    assert jax.tree.structure(ckpt.slots) == jax.tree.structure(fresh)
    slot_leaves = jax.tree.leaves(ckpt.slots)
    _assert_exact(slot_leaves, _leaves(npz, "s3__"))
    assert [str(s.dtype) for s in slot_leaves] == [
        x["dtype"] for x in meta["slot_leaves"]
    ]

    # Resume: Trax's loop saved after step 3 and calls tree_update(step=4) next.
    opt_params = dict(opt.opt_params)
    lr = meta["opt_params_at_step_next"]["learning_rate"]["value"]
    opt_params["learning_rate"] = jnp.asarray(lr, jnp.float32)
    grads = _leaves(npz, "g4__")
    step = jax.jit(functools.partial(opt.tree_update, store_slots=False))
    w4, s4 = step(ckpt.step + 1, grads, ckpt.weights, ckpt.slots, opt_params)
    # 2e-5 rather than exact: float32 rounding of a differently fused step, and
    # Adafactor's epsilon1 sits in the denominators in treeopt but is added to
    # g**2 in Trax, so Trax's statistics are treeopt's plus 1e-16: far below
    # float32 resolution at these magnitudes (README "Differences from Trax").
    # Measured: Adam's and Adafactor's slots equal Trax's bit for bit eagerly;
    # jitted, every leaf is within 1e-6.
    for got, want in zip(w4, _leaves(npz, "w4__"), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)
    s4_want = _leaves(npz, "s4__")
    assert len(jax.tree.leaves(s4)) == len(s4_want)
    for got, want in zip(jax.tree.leaves(s4), s4_want, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)


def test_like_unflattens_the_weights_in_trax_order():
    like = (
        (jax.ShapeDtypeStruct((3, 4), jnp.float32), np.zeros(4, np.float32)),
        {"only": (jnp.zeros((4, 2)), jnp.zeros(2))},
    )
    path = DATA / "adam" / "model.pkl.gz"  # the pickle's name works too
    ckpt = trax_checkpoint.load(path, treeopt.Adam(), like=like)
    assert jax.tree.structure(ckpt.weights) == jax.tree.structure(like)
    _assert_exact(jax.tree.leaves(ckpt.weights), _leaves(_golden("adam")[1], "w3__"))


@pytest.mark.parametrize(
    ("like", "message"),
    [
        ([np.zeros((3, 4), np.float32)] * 3, "`like` has 3 leaves but .*4 weights"),
        (
            {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
            | {"c": np.zeros((4, 2), np.float32), "d": np.zeros(2, np.float32)},
            r"weight leaf 1 \(\['b'\]\): `like` has shape \(5,\) float32, "
            r".*weights.npy.gz record 1 has shape \(4,\) float32",
        ),
        (
            [
                np.zeros((3, 4), np.float32),
                np.zeros(4, jnp.bfloat16),
                np.zeros((4, 2), np.float32),
                np.zeros(2, np.float32),
            ],
            r"weight leaf 1 \(\[1\]\): `like` has shape \(4,\) bfloat16",
        ),
    ],
)
def test_like_that_does_not_fit_is_named(like, message):
    with pytest.raises(ValueError, match=message):
        trax_checkpoint.load(DATA / "adam" / "model", treeopt.Adam(), like=like)


# ------------------------------------------- files written in Trax's format


class _ShapeDtype:
    """Pickles as Trax's ``trax.shapes.ShapeDtype`` does (its __slots__ state)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)


_ShapeDtype.__module__, _ShapeDtype.__qualname__ = "trax.shapes", "ShapeDtype"


@pytest.fixture
def fake_trax(monkeypatch):
    shapes = types.ModuleType("trax.shapes")
    shapes.ShapeDtype = _ShapeDtype
    monkeypatch.setitem(sys.modules, "trax", types.ModuleType("trax"))
    monkeypatch.setitem(sys.modules, "trax.shapes", shapes)


def _np_to_file(arrays, path):
    """Trax's ``np_to_file``: one ``np.save`` per leaf, bfloat16 as uint16."""
    with gzip.open(path, "wb", compresslevel=2) as f:
        for x in arrays:
            x = np.asarray(x)
            if x.dtype == jnp.bfloat16:
                x = x.view(np.uint16)
            np.save(f, x, allow_pickle=False)


def _write_trax(basename, step, weights, slots_per_task, **extra):
    """Writes a checkpoint as Trax 1.4.1's ``Loop.save_checkpoint`` does."""
    d = {
        "step": step,
        "flat_weights": 2,
        "flat_state": [],
        "flat_eval_state": [],
        "history": {"_values": {}},
        "slots_per_task": 2,
        "input_signature": (_ShapeDtype((8, 3), np.float32),),
        "version_timestamp": "Mar-10-2021",
        **extra,
    }
    assert list(d) == TRAX_KEYS
    with gzip.open(f"{basename}.pkl.gz", "wb", compresslevel=2) as f:
        pickle.dump(d, f, protocol=5)
    _np_to_file(jax.tree.leaves(weights), f"{basename}.weights.npy.gz")
    for i, slots in enumerate(slots_per_task):
        # Trax drops None slots; jax.tree.leaves drops None and [] alike.
        _np_to_file(jax.tree.leaves(slots), f"{basename}.opt_slots{i}.npy.gz")


def _trained(opt, dtype=jnp.float32, steps=2):
    """Weights and slots after a few steps, so that no slot is all zeros."""
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 3, 2), ()]
    weights = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
    slots, opt_params = opt.tree_init(weights, store_slots=False)
    for k in range(steps):
        grads = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
        weights, slots = opt.tree_update(
            k, grads, weights, slots, opt_params, store_slots=False
        )
    return weights, slots


def _assert_same_tree(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()  # bit-exact


WRITTEN = [
    pytest.param(
        lambda t=t, b2=b2: treeopt.SM3(momentum_type=t, second_moment_averaging=b2),
        jnp.float32,
        id=f"sm3-{t.name}-{'graft' if b2 != 1 else 'nograft'}",
    )
    for t in MomentumType
    for b2 in (1.0, 0.9)
] + [
    pytest.param(lambda: treeopt.SM3(momentum=0.0), jnp.bfloat16, id="sm3-nomom-bf16"),
    pytest.param(lambda: treeopt.Momentum(), jnp.float32, id="momentum"),
    pytest.param(lambda: treeopt.Momentum(), jnp.bfloat16, id="momentum-bf16"),
    pytest.param(
        lambda: treeopt.Adafactor(do_momentum=True, momentum_in_bfloat16=True),
        jnp.bfloat16,
        id="adafactor-bf16-momentum",
    ),
]


@pytest.mark.parametrize(("make", "dtype"), WRITTEN)
def test_trax_format_loads_back_into_tree_init_layout(make, dtype, tmp_path, fake_trax):
    opt = make()
    weights, slots = _trained(opt, dtype)
    _write_trax(tmp_path / "model", 2, weights, [slots])
    ckpt = trax_checkpoint.load(tmp_path / "model", opt)
    assert ckpt.step == 2
    _assert_same_tree(ckpt.weights, weights)
    _assert_same_tree(ckpt.slots, slots)
    fresh, _ = opt.tree_init(weights, store_slots=False)
    assert jax.tree.structure(ckpt.slots) == jax.tree.structure(fresh)
    assert ckpt.input_signature == (jax.ShapeDtypeStruct((8, 3), jnp.float32),)


def test_bf16_records_are_bit_cast(tmp_path, fake_trax):
    opt = treeopt.Adafactor(do_momentum=True, momentum_in_bfloat16=True)
    weights, slots = _trained(opt, jnp.bfloat16)
    _write_trax(tmp_path / "model", 2, weights, [slots])
    with gzip.open(tmp_path / "model.weights.npy.gz") as f:
        assert np.load(f).dtype == np.dtype("<u2")  # no dtype marker in the file
    ckpt = trax_checkpoint.load(tmp_path / "model", opt)
    assert {w.dtype for w in ckpt.weights} == {np.dtype(jnp.bfloat16)}
    # [v_row, v_col, m] for the (3, 4) weight: statistics float32, m bfloat16.
    assert [s.dtype for s in ckpt.slots[0]] == [np.float32, np.float32, jnp.bfloat16]


def test_trax_bf16_unfactored_v_before_any_update_widens_exactly(tmp_path, fake_trax):
    # Trax made Adafactor's unfactored v in the weight's dtype; treeopt's is
    # float32. Before the first update Trax's file holds it as uint16.
    opt = treeopt.Adafactor()
    weights = [jnp.full((3, 4), 1.5, jnp.bfloat16), jnp.full(4, 2.0, jnp.bfloat16)]
    v = jnp.asarray([0.1, 0.2, 0.3, 1e-3], jnp.bfloat16)
    trax_slots = [[jnp.zeros(3), jnp.zeros(4)], [v]]
    _write_trax(tmp_path / "model", 0, weights, [trax_slots])
    ckpt = trax_checkpoint.load(tmp_path / "model", opt)
    assert ckpt.slots[1][0].dtype == np.float32
    np.testing.assert_array_equal(ckpt.slots[1][0], np.asarray(v, np.float32))


def test_every_task_gets_its_slots(tmp_path, fake_trax):
    opt = treeopt.Momentum()
    weights, slots = _trained(opt)
    other = jax.tree.map(lambda s: s + 1, slots)
    _write_trax(tmp_path / "model", 2, weights, [slots, other])
    ckpt = trax_checkpoint.load(tmp_path / "model", opt)
    assert len(ckpt.slots_per_task) == 2
    _assert_same_tree(ckpt.slots_per_task[1], other)


# ------------------------------------------------------------------ errors


@pytest.fixture
def adam_copy(tmp_path):
    for f in (DATA / "adam").glob("model.*"):
        shutil.copy(f, tmp_path)
    return tmp_path / "model"


@pytest.mark.parametrize("missing", ["pkl.gz", "weights.npy.gz", "opt_slots0.npy.gz"])
def test_missing_file_is_named(adam_copy, missing):
    Path(f"{adam_copy}.{missing}").unlink()
    with pytest.raises(FileNotFoundError, match=f"model.{missing}"):
        trax_checkpoint.load(adam_copy, treeopt.Adam())


@pytest.mark.parametrize("which", ["pkl.gz", "weights.npy.gz", "opt_slots0.npy.gz"])
def test_truncated_gzip_is_named(adam_copy, which):
    path = Path(f"{adam_copy}.{which}")
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=rf"model\.{which}.*truncated"):
        trax_checkpoint.load(adam_copy, treeopt.Adam())


def _rewrite_gzip(path, payload):
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (lambda ok: ok[:-3], "record 3: ends after 5 of 8 bytes"),  # cut in data
        (lambda ok: ok + b"\x93NUMPY\x01", "record 4: "),  # cut in a header
        (lambda ok: ok + b"garbage!" * 20, "record 4: "),  # not npy at all
    ],
    ids=["cut-in-data", "cut-in-header", "garbage"],
)
def test_records_that_do_not_parse_are_named(adam_copy, payload, message):
    path = Path(f"{adam_copy}.weights.npy.gz")
    ok = gzip.decompress(path.read_bytes())
    _rewrite_gzip(path, payload(ok))
    with pytest.raises(ValueError, match=rf"model\.weights\.npy\.gz: {message}"):
        trax_checkpoint.load(adam_copy, treeopt.Adam())


def test_object_records_are_refused(adam_copy):
    path = Path(f"{adam_copy}.weights.npy.gz")
    buf = io.BytesIO()
    np.save(buf, np.array([1, "x"], object), allow_pickle=True)
    _rewrite_gzip(path, gzip.decompress(path.read_bytes()) + buf.getvalue())
    with pytest.raises(ValueError, match="record 4: dtype object holds Python obj"):
        trax_checkpoint.load(adam_copy, treeopt.Adam())


@pytest.mark.parametrize(
    ("case", "opt", "message"),
    [
        (  # SGD's file is empty: its None slots were dropped
            "sgd",
            treeopt.Adam(),
            r"opt_slots0.npy.gz has 0 slot records, Adam\(\) makes 8 .*"
            r"nothing left for slot 0 of weight leaf 0 \(shape \(3, 4\) float32\)",
        ),
        (
            "adam",
            treeopt.Momentum(),
            r"opt_slots0.npy.gz record 1 has shape \(3, 4\) float32 but slot 0 "
            r"of weight leaf 1 .*should have shape \(4,\) float32 .*8 slot records"
            r", Momentum\(\) makes 4",
        ),
        (
            "adam",
            treeopt.SGD(),
            r"8 slot records, SGD\(\) makes 0 .*: records 0 to 7 are left over",
        ),
        (
            "adafactor",
            treeopt.Adafactor(do_momentum=True),
            r"record 2 has shape \(4,\) float32 but slot 2 of weight leaf 0 .*"
            r"should have shape \(3, 4\) float32 .*do_momentum=True",
        ),
        (
            "adafactor",
            treeopt.Adafactor(factored=False),
            r"record 0 has shape \(3,\) float32 but slot 0 of weight leaf 0 .*"
            r"should have shape \(3, 4\) float32 .*factored=False",
        ),
    ],
)
def test_slots_of_another_optimizer_are_refused(case, opt, message):
    with pytest.raises(ValueError, match=message):
        trax_checkpoint.load(DATA / case / "model", opt)


def test_same_shapes_wrong_dtype_is_refused(tmp_path, fake_trax):
    # Momentum's bf16 buffer written as float32: same shapes, same count.
    opt = treeopt.Momentum()
    weights, slots = _trained(opt, jnp.bfloat16)
    _write_trax(
        tmp_path / "model", 2, weights, [[s.astype(jnp.float32) for s in slots]]
    )
    with pytest.raises(ValueError, match=r"record 0 has shape \(3, 4\) float32 but"):
        trax_checkpoint.load(tmp_path / "model", opt)


def test_older_format_with_arrays_in_the_pickle_is_refused(tmp_path, fake_trax):
    weights, slots = _trained(treeopt.SGD())
    _write_trax(tmp_path / "model", 2, weights, [slots])
    d = {k: 2 for k in TRAX_KEYS} | {"flat_weights": [[1.0]]}
    with gzip.open(tmp_path / "model.pkl.gz", "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(ValueError, match="'flat_weights' is a list, not the compre"):
        trax_checkpoint.load(tmp_path / "model", treeopt.SGD())


@pytest.mark.parametrize(
    ("payload", "error", "message"),
    [
        (b"not a pickle", pickle.UnpicklingError, "model.pkl.gz: invalid load key"),
        (pickle.dumps([1, 2]), ValueError, "model.pkl.gz holds a list, not a dict"),
        (pickle.dumps({"step": 3}), ValueError, "has no 'flat_weights'"),
        (
            pickle.dumps({k: 2 for k in TRAX_KEYS} | {"step": "3"}),
            ValueError,
            "model.pkl.gz: 'step' is '3', not an int",
        ),
    ],
    ids=["garbage", "list", "no-weights-key", "str-step"],
)
def test_a_pickle_that_is_not_a_trax_dict_is_named(adam_copy, payload, error, message):
    _rewrite_gzip(f"{adam_copy}.pkl.gz", payload)
    with pytest.raises(error, match=message):
        trax_checkpoint.load(adam_copy, treeopt.Adam())


class _Exploit:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize(
    ("call", "refused"), [("system", "(posix|os).system"), ("eval", "builtins.eval")]
)
def test_a_pickle_that_would_run_code_is_refused(adam_copy, tmp_path, call, refused):
    import builtins
    import os

    marker = tmp_path / "pwned"
    if call == "system":
        payload = _Exploit(os.system, f"touch {marker}")
    else:
        payload = _Exploit(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    with gzip.open(f"{adam_copy}.pkl.gz", "wb") as f:
        pickle.dump({"step": payload}, f, protocol=5)
    with pytest.raises(pickle.UnpicklingError, match=rf"model.pkl.gz: .*{refused}"):
        trax_checkpoint.load(adam_copy, treeopt.Adam())
    assert not marker.exists()


# ------------------------------------------------ the README and the Trainer


def test_readme_snippet_resumes_the_shipped_checkpoint():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Moving a Trax checkpoint\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```\n", 1)[0]
    assert '"output_dir/model"' in code
    namespace = {}
    exec(code.replace("output_dir/model", str(DATA / "adam" / "model")), namespace)
    ckpt, opt = namespace["ckpt"], namespace["opt"]
    assert ckpt.step == 3
    fresh, _ = opt.tree_init(ckpt.weights, store_slots=False)
    assert jax.tree.structure(namespace["slots"]) == jax.tree.structure(fresh)


def test_trainer_resumes_a_trax_run_on_trax_batch():
    meta, npz = _golden("adam")
    opt = treeopt.Adam(**meta["constructor_kwargs"])
    ckpt = trax_checkpoint.load(DATA / "adam" / "model", opt)

    def loss_fn(weights, batch, rng):
        # Trax's Serial(Dense(4), Relu(), Dense(2)) and L2Loss.
        del rng
        w1, b1, w2, b2 = weights
        x, y, mask = batch
        out = jax.nn.relu(x @ w1 + b1[None]) @ w2 + b2[None]
        return jnp.sum((out - y) ** 2 * mask) / jnp.sum(mask)

    trainer = treeopt.Trainer(loss_fn, opt, ckpt.weights, first_step=ckpt.step + 1)
    trainer.slots = jax.tree.map(jnp.array, ckpt.slots)
    batch = tuple(npz[f"batch4_{k}"] for k in ("x", "y", "loss_weights"))
    loss, _ = trainer.one_step(batch, jax.random.key(0))
    np.testing.assert_allclose(loss, meta["loss_at_step_next"], rtol=1e-6)
    for got, want in zip(trainer.weights, _leaves(npz, "w4__"), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_to_optax_resumes_a_trax_run():
    optax = pytest.importorskip("optax")
    from treeopt.optax import to_optax

    meta, npz = _golden("adam")
    opt = treeopt.Adam(**meta["constructor_kwargs"])
    ckpt = trax_checkpoint.load(DATA / "adam" / "model", opt)
    tx = to_optax(opt)
    state = tx.init(ckpt.weights)._replace(
        slots=ckpt.slots, count=jnp.asarray(ckpt.step + 1, jnp.int32)
    )
    updates, _ = tx.update(_leaves(npz, "g4__"), state, ckpt.weights)
    weights = optax.apply_updates(ckpt.weights, updates)
    for got, want in zip(weights, _leaves(npz, "w4__"), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)


# ------------------------------------------------- treeopt import-trax


def test_import_trax_writes_a_treeopt_checkpoint(tmp_path, capsys):
    pytest.importorskip("orbax.checkpoint")
    from treeopt import checkpoint, cli

    out = tmp_path / "ckpt"
    argv = [
        "import-trax",
        str(DATA / "adafactor" / "model"),
        "--optimizer",
        "Adafactor",
    ]
    assert cli.main([*argv, "--option", "do_momentum=false", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 steps done (resume with step 4); 4 weight leaves, 26" in printed
    assert "leaf 0: float32[3, 4]  slots: float32[3], float32[4]" in printed
    assert f"wrote treeopt checkpoint {out / '3'}" in printed

    opt = treeopt.Adafactor()
    ckpt = trax_checkpoint.load(DATA / "adafactor" / "model", opt)
    like = {"step": 0, "weights": ckpt.weights, "slots": ckpt.slots}
    like["opt_params"] = opt.opt_params
    state = checkpoint.restore(out, like, optimizer=opt)
    assert checkpoint.latest_step(out) == 3 and state["step"] == 4
    _assert_same_tree(state["weights"], ckpt.weights)
    _assert_same_tree(state["slots"], ckpt.slots)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sgd", "--optimizer", "adam"], r"sgd/model.opt_slots0.npy.gz has 0 slot"),
        (["adam", "--optimizer", "nadam"], r"invalid choice: 'nadam'"),
        (["adam", "--optimizer", "adam", "--option", "lr"], r"must be KEY=VALUE"),
        (
            ["adam", "--optimizer", "adam", "--option", "b1=2"],
            r"b1 must be in \[0, 1\), got 2",
        ),
        (
            ["nothing", "--optimizer", "sgd"],
            r"no Trax checkpoint file .*nothing/model.pkl.gz",
        ),
    ],
)
def test_import_trax_bad_input_is_one_line(tmp_path, capsys, args, message):
    pytest.importorskip("orbax.checkpoint")
    from treeopt import cli

    argv = ["import-trax", str(DATA / args[0] / "model"), *args[1:]]
    try:
        code = cli.main([*argv, "--out", str(tmp_path / "out")])
    except SystemExit as e:  # argparse exits on its own errors
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert re.search(message, captured.err), captured.err
    assert not (tmp_path / "out" / "3").exists()


_WITHOUT_ORBAX = """
import importlib.abc, runpy, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "orbax":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
runpy.run_module("treeopt", run_name="__main__", alter_sys=True)
"""


def test_import_trax_without_the_checkpoint_extra_is_one_line(tmp_path):
    basename = str(DATA / "adam" / "model")
    argv = [basename, "--optimizer", "adam", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ORBAX, "import-trax", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == (
        "treeopt import-trax: error: import-trax needs orbax: "
        "pip install 'treeopt[checkpoint]'\n"
    )
