"""The benchmark runs end to end in a tiny configuration (structure only, no timing)."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("optax")

from treeopt import bench

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def tiny_result():
    cfg = bench.dataclasses.replace(
        bench.config("tiny"),
        trees={k: bench.config("tiny").trees[k] for k in ("many_small",)},
    )
    return bench.run(cfg)


cfg_tiny = bench.config("tiny")


def test_every_row_has_both_libraries_and_consistent_numbers(tiny_result):
    rows = tiny_result["rows"]
    assert [(r["tree"], r["optimizer"]) for r in rows] == [
        ("many_small", o) for o in bench.OPTIMIZERS
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["n_leaves"] == 12
        assert row["param_bytes"] == 4 * row["n_params"]
        variants = {"treeopt", "optax", "packed"}
        # The packed layout holds the same slots, only regrouped.
        assert row["packed"]["state_bytes"] == row["treeopt"]["state_bytes"]
        for v in variants:
            rec = row[v]
            assert rec["ms"] > 0 and rec["compile_s"] > 0 and rec["bound_ms"] > 0
            moved = 3 * row["param_bytes"] + 2 * rec["state_bytes"]
            bandwidth = row["axpy"]["gbs"] * 1e9
            expected_bound = 1e3 * moved / bandwidth
            assert rec["bound_ms"] == pytest.approx(expected_bound)
            assert rec["pct_of_bound"] == pytest.approx(
                100 * rec["bound_ms"] / rec["ms"]
            )
        assert row["ratio"] == pytest.approx(row["treeopt"]["ms"] / row["optax"]["ms"])
        # The probe covers as many elements as the tree (at least 1024) and its
        # bandwidth is its 12 bytes per element over its median time.
        probe = row["axpy"]
        # Timed in every round with the steps: as many samples as each step.
        samples = cfg_tiny.rounds * cfg_tiny.steps_per_round
        assert probe["samples"] == samples
        assert all(row[v]["samples"] == samples for v in variants)
        assert probe["elements"] == max(1024, row["n_params"])
        assert probe["gbs"] == pytest.approx(12 * probe["elements"] / probe["ms"] / 1e6)


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


def test_state_bytes_follow_the_slot_layouts(tiny_result):
    by_opt = {r["optimizer"]: r for r in tiny_result["rows"]}
    p = by_opt["adam"]["param_bytes"]
    assert by_opt["sgd"]["treeopt"]["state_bytes"] == 0
    assert by_opt["adam"]["treeopt"]["state_bytes"] == 2 * p
    assert by_opt["momentum"]["treeopt"]["state_bytes"] == p
    assert by_opt["rmsprop"]["packed"]["state_bytes"] == p
    # Factored statistics are far smaller than the parameters.
    assert 0 < by_opt["adafactor"]["treeopt"]["state_bytes"] < p


def test_markdown_and_json_outputs(tiny_result):
    md = bench.to_markdown(tiny_result)
    table = [line for line in md.splitlines() if line.startswith("| many_small (12")]
    assert len(table) == len(bench.OPTIMIZERS)
    assert all(line.count("|") == 12 for line in table)
    assert json.loads(bench.to_json(tiny_result))["rows"][0]["optimizer"] == "sgd"


@pytest.mark.parametrize("pipeline", [True, False])
def test_failing_row_is_recorded_and_budget_skips_rows(pipeline):
    cfg = bench.Config(
        trees={"t": {"w": (8, 8)}},
        rows=[("t", "no_such_optimizer"), ("t", "sgd")],
        rounds=1,
        steps_per_round=1,
        bandwidth_elements=1 << 10,
        profile_shape=None,
        pipeline=pipeline,
    )
    result = bench.run(cfg)
    failed, ok = result["rows"]
    assert "no_such_optimizer" in failed["error"]
    header, _, failed_line, ok_line = bench.to_markdown(result).splitlines()[2:6]
    assert failed_line.count("|") == ok_line.count("|") == header.count("|") == 12
    assert "error" not in ok and ok["treeopt"]["ms"] > 0
    skipped = bench.run(bench.dataclasses.replace(cfg, budget_s=0.0))["rows"]
    assert [r["error"] for r in skipped] == ["skipped: budget"] * 2


@pytest.mark.parametrize("ahead", [True, False])
def test_small_trees_get_their_arrays_while_compiling(monkeypatch, ahead):
    events = []
    arm, time_row = bench._arm_row, bench._time_row

    def logged_arm(row, trees):
        events.append(("arm", row.optimizer))
        arm(row, trees)

    def logged_time(row, *args):
        events.append(("time", row.optimizer))
        return time_row(row, *args)

    def logged_wait(futures):  # the wait for every compile to end
        events.append(("wait", ""))
        return wait(futures)

    wait = bench.wait
    monkeypatch.setattr(bench, "wait", logged_wait)
    monkeypatch.setattr(bench, "_arm_row", logged_arm)
    monkeypatch.setattr(bench, "_time_row", logged_time)
    cfg = bench.dataclasses.replace(
        bench.config("tiny"),
        trees={"many_small": bench.config("tiny").trees["many_small"]},
        optimizers=("adam", "sm3"),
        arm_ahead_bytes=1 << 25 if ahead else 0,
        profile_shape=None,
    )
    rows = bench.run(cfg)["rows"]
    timed = [("time", "adam"), ("arm", "adam"), ("time", "sm3"), ("arm", "sm3")]
    if ahead:  # every row armed while the compiles run
        armed = [("arm", "adam"), ("arm", "sm3"), ("wait", "")]
        assert events == [*armed, ("time", "adam"), ("time", "sm3")]
    else:  # each row armed as it is timed
        assert events == [("wait", ""), *timed]
    for row in rows:
        assert "error" not in row, row
        assert row["param_bytes"] == 4 * row["n_params"]
        for v in ("treeopt", "optax", "packed"):
            assert row[v]["ms"] > 0 and row[v]["state_bytes"] >= row["param_bytes"]


def test_probe_size_has_a_floor_and_a_cap():
    cfg = bench.Config(
        trees={"small": {"w": (8, 8)}, "big": {"w": (64, 64)}},
        optimizers=("sgd",),
        rounds=1,
        steps_per_round=2,
        bandwidth_elements=2048,
        profile_shape=None,
    )
    small, big = bench.run(cfg)["rows"]
    assert small["axpy"]["elements"] == 1024 and big["axpy"]["elements"] == 2048
    assert big["axpy"]["samples"] == 2


def test_tree_arrays_are_dropped_after_their_last_row():
    rows = [("a", "sgd"), ("b", "sgd"), ("a", "adam")]
    trees = bench._TreeArrays(rows)
    row_a = bench._Row("a", "sgd", {"w": (2, 3)}, {}, {}, {})
    row_b = bench._Row("b", "sgd", {"w": (4,)}, {}, {}, {})
    weights, grads = trees.get(row_a)
    assert trees.get(row_a)[0] is weights  # made once
    trees.get(row_b)
    trees.row_done("a")
    assert trees.get(row_a)[0] is weights  # a row on "a" is still to come
    trees.row_done("b")
    assert "b" not in trees._arrays
    trees.row_done("a")
    assert trees._arrays == {}
    np.testing.assert_array_equal(grads["w"], bench.make_tree({"w": (2, 3)}, 1)["w"])


def test_a_failing_row_frees_its_arrays(monkeypatch):
    cfg = bench.Config(trees={"t": {"w": (8, 8)}}, rounds=1, steps_per_round=1)
    row = bench._plan_row("t", cfg.trees["t"], "adam", cfg)
    bench.compile_all(list(row.runners.values()))

    def broken_probe(n):
        raise RuntimeError("no memory for the probe")

    monkeypatch.setattr(bench, "_axpy_runner", broken_probe)
    with pytest.raises(RuntimeError, match="no memory"):
        bench._time_row(row, cfg)
    assert not row.armed
    assert all(r._args == () for r in row.runners.values())


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_failing_profile_is_recorded_and_the_rows_kept(monkeypatch, pipeline):
    def broken(shape):
        raise ValueError("cannot profile")

    monkeypatch.setattr(bench, "profile_leaf", broken)
    cfg = bench.Config(
        trees={"t": {"w": (8, 8)}},
        optimizers=("sgd",),
        rounds=1,
        steps_per_round=1,
        profile_shape=(8, 8),
        pipeline=pipeline,
    )
    result = bench.run(cfg)
    assert "error" not in result["rows"][0]
    assert "cannot profile" in result["profile"]["error"]
    assert "Profile of one (8, 8) leaf failed" in bench.to_markdown(result)


def test_row_by_row_order_keeps_the_profile_and_the_row_record():
    cfg = bench.Config(
        trees={"t": {"w": (8, 8)}},
        rows=[("t", "adam")],
        rounds=1,
        steps_per_round=1,
        bandwidth_elements=1 << 10,
        profile_shape=(8, 8),
        pipeline=False,
    )
    result = bench.run(cfg)
    (row,) = result["rows"]
    assert row["treeopt"]["ms"] > 0 and row["wall_s"] > 0
    assert [r["optimizer"] for r in result["profile"]["rows"]] == list(bench.OPTIMIZERS)


def test_script_writes_table_and_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "r.json"
    assert (
        script.main(
            ["--tiny", "--trees", "one_big", "--opts", "sgd", "--json", str(out)]
        )
        == 0
    )
    assert "| one_big (1 leaves, 0.0M) | sgd |" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"][0]["tree"] == "one_big"


def test_cli_bench_rejects_unknown_optimizer(capsys):
    from treeopt import cli

    assert cli.main(["bench", "--optimizers", "adam,lion"]) == 2
    assert "unknown optimizer 'lion'" in capsys.readouterr().err


def test_cli_bench_fusion_option_needs_a_fresh_backend(capsys, monkeypatch):
    from treeopt import cli, fusion

    def must_not_run(*args, **kwargs):
        raise AssertionError("the bench ran although the option could not be set")

    monkeypatch.setattr(bench, "run", must_not_run)
    jax.devices()  # started without the option: it can no longer be turned on
    monkeypatch.setenv("XLA_FLAGS", "")  # restored by monkeypatch whatever happens
    fusion._probe.cache_clear()
    try:
        argv = ["bench", "--quick", "--xla-cpu-multi-output-fusion"]
        assert cli.main(argv) == 2
    finally:
        fusion._probe.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("treeopt bench: error: JAX's CPU backend started before")


def test_profile_counts_kernels_and_bytes(tiny_result):
    rows = {r["optimizer"]: r for r in tiny_result["profile"]["rows"]}
    assert set(rows) == set(bench.OPTIMIZERS)
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


@pytest.mark.parametrize("concurrent", [True, False])
def test_runners_compiled_together_or_in_turn_step_the_same(concurrent):
    import jax.numpy as jnp
    import numpy as np

    runners = [  # the first argument is donated and replaced by the output
        bench._Runner(
            lambda a, b: (a * 2 + b,), (jnp.arange(4.0), jnp.ones(4)), (0,), ()
        ),
        bench._Runner(
            lambda s, a: (a - s,), (jnp.arange(4.0),), (1,), (jnp.float32(1),)
        ),
    ]
    assert all(r.lower_s > 0 and np.isnan(r.compile_s) for r in runners)
    bench.compile_all(runners, concurrent=concurrent)
    assert all(r.compile_s > r.lower_s for r in runners)
    for r in runners:
        r.step(record=True)
        r.step(record=True)
    np.testing.assert_array_equal(runners[0]._args[0], 4 * np.arange(4.0) + 3)
    np.testing.assert_array_equal(runners[1]._args[0], np.arange(4.0) - 2)
    assert all(len(r.times) == 2 and r.median_ms() > 0 for r in runners)
