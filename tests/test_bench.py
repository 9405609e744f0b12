"""The benchmark: a tiny run end to end, its arithmetic, its steps' numbers,
its timing and its command line."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("optax")

from treeopt import bench, cli, fusion, registry
from treeopt.bench import steps, timing
from treeopt.packed import Packed

from helpers import assert_reordered_close, random_leaves

SMALL = {"a/w": (8, 4), "a/b": (4,), "c": (16,)}  # 52 parameters in 3 leaves
ROUNDS = 3


def _config(**changes) -> bench.Config:
    cfg = bench.Config(
        trees={"small": SMALL},
        rounds=ROUNDS,
        bandwidth_elements=1 << 12,
        profile_shape=(8, 4),
    )
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def tiny_result():
    return bench.run(_config())


def test_every_optimizer_has_a_row_with_consistent_numbers(tiny_result):
    rows = tiny_result["rows"]
    assert [(r["tree"], r["optimizer"]) for r in rows] == [
        ("small", name) for name in registry.NAMES
    ]
    for row in rows:
        assert "error" not in row, row
        assert (row["n_leaves"], row["n_params"]) == (3, 52)
        assert row["param_bytes"] == 4 * row["n_params"]
        # The packed layout holds the same slots, only regrouped.
        assert row["packed"]["state_bytes"] == row["treeopt"]["state_bytes"]
        bandwidth = row["axpy"]["gbs"] * 1e9
        for v in ("treeopt", "optax", "packed"):
            rec = row[v]
            assert rec["ms"] > 0 and rec["compile_s"] > 0
            assert rec["samples"] == ROUNDS
            moved = 3 * row["param_bytes"] + 2 * rec["state_bytes"]
            assert rec["bound_ms"] == pytest.approx(1e3 * moved / bandwidth)
            assert rec["pct_of_bound"] == pytest.approx(
                100 * rec["bound_ms"] / rec["ms"]
            )
        assert row["ratio"] == pytest.approx(row["treeopt"]["ms"] / row["optax"]["ms"])
        assert row["packed_ratio"] == pytest.approx(
            row["packed"]["ms"] / row["optax"]["ms"]
        )
        # The probe: as many elements as the tree, at least 1024; timed in the
        # same rounds; 12 bytes per element over its median time.
        probe = row["axpy"]
        assert probe["elements"] == 1024 and probe["samples"] == ROUNDS
        assert probe["gbs"] == pytest.approx(12 * probe["elements"] / probe["ms"] / 1e6)
    assert tiny_result["config"]["rounds"] == ROUNDS
    assert "interrupted" not in tiny_result and tiny_result["wall_s"] > 0


def test_state_bytes_follow_the_slot_layouts(tiny_result):
    by_opt = {r["optimizer"]: r for r in tiny_result["rows"]}
    p = by_opt["adam"]["param_bytes"]
    assert by_opt["sgd"]["treeopt"]["state_bytes"] == 0
    assert by_opt["momentum"]["treeopt"]["state_bytes"] == p
    assert by_opt["rmsprop"]["packed"]["state_bytes"] == p
    assert by_opt["adam"]["treeopt"]["state_bytes"] == 2 * p
    assert by_opt["adam"]["optax"]["state_bytes"] > 2 * p  # and a step count
    # Factored statistics are smaller than the parameters.
    assert 0 < by_opt["adafactor"]["treeopt"]["state_bytes"] < p


def test_markdown_and_json_hold_the_rows(tiny_result):
    md = bench.to_markdown(tiny_result)
    header = next(line for line in md.splitlines() if line.startswith("| tree |"))
    lines = [line for line in md.splitlines() if line.startswith("| small (3")]
    assert len(lines) == len(registry.NAMES)
    for line, row in zip(lines, tiny_result["rows"], strict=True):
        assert line.count("|") == header.count("|") == 12
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == row["optimizer"]
        assert cells[2:5] == [
            f"{row['treeopt']['ms']:.3f}",
            f"{row['optax']['ms']:.3f}",
            f"{row['ratio']:.2f}",
        ]
        assert cells[5] == f"{row['packed']['ms']:.3f}"
    assert f"medians of {ROUNDS} rounds" in md
    assert json.loads(bench.to_json(tiny_result)) == tiny_result


def test_row_reports_medians_of_the_rounds_and_their_ratios(monkeypatch):
    samples = {  # seconds per round, as timing.interleaved returns them
        "treeopt": [3e-3, 1e-3, 2e-3],
        "optax": [4e-3, 9e-3, 4e-3],
        "packed": [1e-3, 1e-3, 5e-3],
        "axpy": [2e-3, 1e-3, 1e-3],
    }
    monkeypatch.setattr(timing, "interleaved", lambda runners, rounds: samples)
    params = bench.make_tree(SMALL, 0)
    row = bench.measure_row("small", params, params, "adam", _config())
    assert [row[v]["ms"] for v in ("treeopt", "optax", "packed")] == pytest.approx(
        [2.0, 4.0, 1.0]
    )
    assert row["ratio"] == pytest.approx(0.5)
    assert row["packed_ratio"] == pytest.approx(0.25)
    assert row["axpy"]["gbs"] == pytest.approx(12 * 1024 / 1e-3 / 1e9)
    moved = 3 * 4 * 52 + 2 * 2 * 4 * 52  # w, g, w' and Adam's m, v, m', v'
    assert row["treeopt"]["bound_ms"] == pytest.approx(1e3 * moved / (12 * 1024e3))


def test_interleaved_times_one_call_per_round_in_alternating_order():
    now, calls = [0.0], []
    durations = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 10.0, 30.0, 20.0])}

    def step(name):
        def call():
            calls.append(name)
            now[0] += next(durations[name])

        return call

    seconds = timing.interleaved(
        {"a": step("a"), "b": step("b")}, rounds=3, clock=lambda: now[0]
    )
    # One untimed call each, then rounds a b, b a, a b.
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert seconds == {"a": [1.0, 2.0, 3.0], "b": [10.0, 30.0, 20.0]}
    assert timing.median_ms(seconds["b"]) == 20_000.0
    assert timing.median_ms([1.0, 4.0]) == 2_500.0


def test_make_tree_draws_every_leaf_from_its_seed():
    shapes = {"a/w": (3, 4), "a/b": (4,), "c": (), "d/e/f": (2, 1, 5)}
    tree = bench.make_tree(shapes, seed=3)
    assert jax.tree.structure(tree) == jax.tree.structure(
        {"a": {"w": 0, "b": 0}, "c": 0, "d": {"e": {"f": 0}}}
    )
    leaves = {"a/w": tree["a"]["w"], "a/b": tree["a"]["b"], "c": tree["c"]}
    leaves["d/e/f"] = tree["d"]["e"]["f"]
    for name, shape in shapes.items():
        assert leaves[name].shape == shape and leaves[name].dtype == jnp.float32
    flat = np.concatenate([np.ravel(leaves[n]) for n in shapes])
    assert len(np.unique(flat)) == flat.size  # no leaf repeats another's draw
    again = bench.make_tree(shapes, seed=3)
    other = bench.make_tree(shapes, seed=4)
    trees = (tree, again, other)
    for a, b, c in zip(*map(jax.tree.leaves, trees), strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c) or a.size == 0
    big = np.ravel(bench.make_tree({"w": (200, 500)}, seed=0)["w"])
    assert abs(big.mean()) < 1e-3 and big.std() == pytest.approx(0.02, rel=0.02)
    assert bench.make_tree({"w": (2, 3)}, 0, jnp.bfloat16)["w"].dtype == jnp.bfloat16


def _one_step(step: steps.Step, params, grads):
    carry, const = step.init(params, grads)
    return jax.jit(step.fn)(carry, const)[0]


_ELEMENTWISE = ("sgd", "momentum", "rmsprop", "adam")
# The longest sum of a step on the tree below: Adafactor's row and column
# means over its largest leaf (24 elements); the others add no terms.
_TERMS = {"adafactor": 24}
# optax's Adam takes its second moment's (1 - b2) in float64 and its bias
# correction's in float32, 1 - float32(b2): their ratio is off by up to
# eps32 / (2 (1 - b2)) and the update, through the square root, by half that,
# as much as a sum of 1 / (4 (1 - b2)) = 250 more terms in the policy's bound.
_OPTAX_TERMS = {"adam": round(1 / (4 * (1 - 0.999)))}


@pytest.mark.parametrize("name", registry.NAMES)
def test_each_registry_pair_steps_the_same_tree(name):
    shapes = [(3, 4), (5,), (2, 3, 4)]
    w0 = {f"p{i}": x for i, x in enumerate(random_leaves(1, shapes))}
    g = {f"p{i}": x for i, x in enumerate(random_leaves(2, shapes))}
    opt = steps.matched_optimizer(name)
    ours = _one_step(steps.treeopt_step(opt), w0, g)
    theirs = _one_step(steps.optax_step(steps.optax_optimizer(name)), w0, g)
    w_packed = Packed(opt, w0).unpack(_one_step(steps.packed_step(opt, w0), w0, g))
    for key in w0:
        assert np.all(np.isfinite(ours[key])), key
        assert not np.array_equal(ours[key], w0[key]), key
    # The optax step is the reference run: [w0, w1] is its trajectory.
    terms = _TERMS.get(name, 1)
    optax_terms = terms + _OPTAX_TERMS.get(name, 0)
    assert_reordered_close(ours, theirs, [w0, theirs], optax_terms, f"{name} vs optax")
    assert_reordered_close(w_packed, ours, [w0, ours], terms, f"{name} packed")


def test_sibling_outputs_wrap_only_the_elementwise_optimizers():
    for name in registry.NAMES:
        opt = steps.matched_optimizer(name, sibling_outputs=True)
        wrapped = isinstance(opt, fusion.SiblingOutputs)
        assert wrapped == (name in _ELEMENTWISE), name
        assert not isinstance(steps.matched_optimizer(name), fusion.SiblingOutputs)


def test_runner_steps_on_the_carry_the_last_step_returned():
    r = steps.Runner(lambda y, x: 2 * y + x, jnp.arange(4.0), jnp.ones(4))
    assert r.compile_s > 0
    r()
    r()
    np.testing.assert_array_equal(r.carry, 4 * np.arange(4.0) + 3)


def test_failing_row_is_recorded_budget_skips_and_probe_is_capped():
    cfg = _config(
        trees={"t": {"w": (64, 64)}},
        rows=[("t", "no_such_optimizer"), ("t", "sgd")],
        rounds=1,
        bandwidth_elements=2048,
        profile_shape=None,
    )
    result = bench.run(cfg)
    failed, ok = result["rows"]
    assert "no_such_optimizer" in failed["error"]
    assert ok["treeopt"]["ms"] > 0 and ok["axpy"]["elements"] == 2048
    header, _, failed_line, ok_line = bench.to_markdown(result).splitlines()[2:6]
    assert failed_line.count("|") == ok_line.count("|") == header.count("|")
    skipped = bench.run(dataclasses.replace(cfg, budget_s=0.0))["rows"]
    assert [r["error"] for r in skipped] == ["skipped: budget"] * 2


def test_a_run_leaves_no_array_behind(monkeypatch):
    # The second row fails after its arrays exist: they are dropped all the same.
    real, calls = timing.interleaved, []

    def fail_the_second(runners, rounds):
        calls.append(list(runners))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(runners, rounds)

    monkeypatch.setattr(timing, "interleaved", fail_the_second)
    before = jax.live_arrays()  # held, so that no new array takes their ids
    known = {id(x) for x in before}
    rows = bench.run(_config(optimizers=("adam", "sm3"), profile_shape=None))["rows"]
    assert "error" not in rows[0] and "out of memory" in rows[1]["error"]
    assert calls == [["treeopt", "optax", "packed", "axpy"]] * 2
    assert [x for x in jax.live_arrays() if id(x) not in known] == []


def test_a_failing_profile_is_recorded_and_the_rows_kept(monkeypatch):
    def broken(*args):
        raise ValueError("cannot profile")

    monkeypatch.setattr(bench, "profile_leaf", broken)
    result = bench.run(_config(optimizers=("sgd",)))
    assert "error" not in result["rows"][0]
    assert "cannot profile" in result["profile"]["error"]
    assert "Profile of one (8, 4) leaf failed" in bench.to_markdown(result)


def test_profile_counts_kernels_and_bytes(tiny_result):
    rows = {r["optimizer"]: r for r in tiny_result["profile"]["rows"]}
    assert list(rows) == list(registry.NAMES)
    # SGD is one kernel reading w and g and writing w, in both libraries.
    for lib in ("treeopt", "optax"):
        assert rows["sgd"][lib] == {"kernels": 1, "bytes": 12}
    for r in rows.values():
        for lib in ("treeopt", "optax"):
            assert r[lib]["bytes"] >= r["ideal_bytes"] > 0
    assert rows["adam"]["ideal_bytes"] == 28
    assert "ideal B/param" in bench.to_markdown(tiny_result)


# Hand-written optimized HLO: a multi-output fusion writing two full-size
# arrays, a second kernel reading one of them through get-tuple-element and a
# copy; scalars and small arrays do not count.
_HLO = """HloModule m

ENTRY %main.1 (p.1: f32[8,4], m.1: f32[8,4], g.1: f32[8,4], lr.1: f32[]) -> (...) {
  %p.1 = f32[8,4]{1,0} parameter(0)
  %m.1 = f32[8,4]{1,0} parameter(1)
  %g.1 = f32[8,4]{1,0} parameter(2)
  %lr.1 = f32[] parameter(3)
  %small = f32[4]{0} fusion(%lr.1), kind=kLoop, calls=%c0
  %mof = (f32[8,4]{1,0}, f32[8,4]{1,0}) fusion(%g.1, %m.1, %lr.1, /*i=3*/%p.1), calls=%c
  %gte.0 = f32[8,4]{1,0} get-tuple-element(%mof), index=0
  %gte.1 = f32[8,4]{1,0} get-tuple-element(%mof), index=1
  %copy.1 = f32[8,4]{1,0} copy(%gte.1)
  ROOT %tuple = (f32[8,4]{1,0}, f32[8,4]{1,0}) tuple(%gte.0, %copy.1)
}
"""


def test_hlo_passes_counts_multi_output_fusions():
    assert bench.hlo_passes(_HLO, (8, 4)) == [("mof", 3 + 2), ("copy.1", 2)]
    assert bench.hlo_passes(_HLO, (4,)) == [("small", 1)]


def test_presets():
    tiny, quick, full = (bench.config(n) for n in ("tiny", "quick", "full"))
    for cfg in (tiny, quick, full):
        assert list(cfg.trees) == ["transformer", "many_small", "one_big"]
        assert tuple(cfg.optimizers) == registry.NAMES
    sizes = [sum(map(np.prod, c.trees["many_small"].values())) for c in (tiny, quick)]
    assert sizes[0] < sizes[1] < sum(map(np.prod, full.trees["many_small"].values()))
    with pytest.raises(ValueError, match="full, quick, tiny"):
        bench.config("huge")


# ------------------------------------------------------------- command line


def test_cli_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--tiny", "--trees", "one_big", "--optimizers", "sgd"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| one_big (1 leaves, 0.0M) | sgd |" in table
    result = json.loads(out.read_text())
    assert [(r["tree"], r["optimizer"]) for r in result["rows"]] == [("one_big", "sgd")]
    assert [r["optimizer"] for r in result["profile"]["rows"]] == ["sgd"]


def _parse_error(capsys, monkeypatch, argv) -> str:
    monkeypatch.setattr(cli, "_bench", _must_not_run)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    return captured.err


def _must_not_run(*args, **kwargs):
    raise AssertionError("ran although the arguments are wrong")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--optimizers", "adam,lion"], "unknown optimizer 'lion'; choose from sgd, "),
        (["--optimizers", ","], "no optimizer given"),
        (["--quick", "--tiny"], "not allowed with argument --quick"),
    ],
)
def test_cli_rejects_bad_arguments_while_parsing(capsys, monkeypatch, argv, match):
    err = _parse_error(capsys, monkeypatch, ["bench", *argv])
    assert err.startswith("treeopt bench: error: ") and match in err


def test_cli_rejects_an_unknown_tree_before_running(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", _must_not_run)
    assert cli.main(["bench", "--tiny", "--trees", "one_big,huge"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "treeopt bench: error: unknown tree 'huge'; choose from transformer, "
        "many_small, one_big\n"
    )


def test_cli_fusion_option_needs_a_fresh_backend(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", _must_not_run)
    jax.devices()  # started without the option: it can no longer be turned on
    monkeypatch.setenv("XLA_FLAGS", "")  # restored by monkeypatch whatever happens
    fusion._probe.cache_clear()
    try:
        assert cli.main(["bench", "--quick", "--xla-cpu-multi-output-fusion"]) == 2
    finally:
        fusion._probe.cache_clear()
    err = capsys.readouterr().err
    assert re.match(r"treeopt bench: error: JAX's CPU backend started before", err)
