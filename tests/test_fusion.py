"""XLA:CPU multi-output fusion (treeopt.fusion): the sibling form of a step
(``SiblingOutputs``) computes the same bits, the option is detected only where
it works, and with it each elementwise leaf's step compiles to one loop at the
memory-traffic bound."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import fusion_cases as fc
import treeopt
from treeopt import fusion

HERE = os.path.dirname(os.path.abspath(__file__))
# Arrays one step reads plus writes: g, w and each slot read, w and each slot written.
IDEAL_ARRAYS = {"momentum-nesterov": 5, "rmsprop": 5, "adam": 7}


@pytest.fixture(scope="module")
def option_on(tmp_path_factory):
    """fusion_worker.py's results, run in a process with the option on."""
    out = tmp_path_factory.mktemp("fusion") / "on.npz"
    # Added to this process's flags: the worker must compile for the same
    # instruction set (--xla_cpu_max_isa) for its bits to be comparable.
    flags = fusion.with_option(os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.join(HERE, "fusion_worker.py"), str(out)]
    proc = subprocess.run(
        cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with np.load(out) as data:
        return dict(data)


def _assert_same_bits(actual: dict, expected: dict, case_id: str) -> None:
    assert sorted(actual) == sorted(expected), case_id
    for path, x in expected.items():
        np.testing.assert_array_equal(actual[path], x, err_msg=f"{case_id} {path}")


def test_the_option_is_detected_in_a_process_that_sets_it(option_on):
    assert bool(option_on["on"])


def _results(option_on: dict, case_id: str) -> dict:
    return {
        k.split("/", 1)[1]: v
        for k, v in option_on.items()
        if k.startswith(case_id + "/") and not k.endswith("/kernels")
    }


@pytest.mark.parametrize("case_id", list(fc.CASES))
def test_same_bits_with_the_option_on_and_off(option_on, case_id):
    off = fc.run_case(case_id, sibling=False)
    _assert_same_bits(_results(option_on, case_id), off, case_id)


def test_packed_equals_per_leaf_with_the_option_on(option_on):
    _assert_same_bits(
        _results(option_on, "adam-packed"), _results(option_on, "adam"), "adam"
    )


@pytest.mark.parametrize("case_id", list(fc.PROFILED))
def test_one_loop_per_leaf_with_the_option_on(option_on, case_id):
    # One kernel touches the full-size arrays, and it moves each of them once.
    kernels = option_on[f"{case_id}/kernels"].tolist()
    assert kernels == [IDEAL_ARRAYS[case_id]]


@pytest.mark.parametrize("case_id", list(fc.CASES))
def test_sibling_form_gives_the_same_bits_without_the_option(case_id):
    # Without XLA's multi-output fusion the sibling form is slower (copies) but
    # must still compute exactly what the plain step computes.
    plain = fc.run_case(case_id, sibling=False)
    _assert_same_bits(fc.run_case(case_id, sibling=True), plain, case_id)


def test_sibling_form_refuses_an_optimizer_with_reductions():
    with pytest.raises(TypeError, match=r"elementwise optimizer.*Adafactor"):
        fusion.SiblingOutputs(treeopt.Adafactor())


def _equations(case_id: str, sibling: bool) -> int:
    """Equations of the traced tree_update of a case: the sibling form traces
    the step twice."""
    opt = fc.optimizer(case_id, sibling)
    w = fc.make_tree(0)
    slots, op = opt.tree_init(w, store_slots=False)

    def step(g, w, s):
        return opt.tree_update(0, g, w, s, op, store_slots=False)

    return len(jax.make_jaxpr(step)(w, w, slots).jaxpr.eqns)


def test_sgd_has_no_slots_and_keeps_its_step():
    # Nothing to fuse with one output: the sibling form must not double the trace.
    assert _equations("sgd", sibling=True) == _equations("sgd", sibling=False)
    assert _equations("adam", sibling=True) > _equations("adam", sibling=False)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("", fusion.XLA_FLAGS),
        ("  ", fusion.XLA_FLAGS),
        ("--xla_dump_to=/tmp/d", "--xla_dump_to=/tmp/d " + fusion.XLA_FLAGS),
        (
            "--xla_backend_extra_options='a=1,b' --xla_dump_to=x",
            "--xla_backend_extra_options='a=1,b' --xla_dump_to=x " + fusion.XLA_FLAGS,
        ),
        # Named inside another value only: not the option itself.
        (
            f"--xla_dump_to=/x/{fusion.OPTION}_dump",
            f"--xla_dump_to=/x/{fusion.OPTION}_dump " + fusion.XLA_FLAGS,
        ),
        (fusion.XLA_FLAGS + " --xla_dump_to=x", fusion.XLA_FLAGS + " --xla_dump_to=x"),
        (
            f'--xla_backend_extra_options="a=1,{fusion.OPTION}"',
            f'--xla_backend_extra_options="a=1,{fusion.OPTION}"',
        ),
    ],
)
def test_with_option_adds_to_the_extra_options(before, after):
    assert fusion.with_option(before) == after


def test_with_option_refuses_a_flags_file():
    with pytest.raises(ValueError, match="flags file"):
        fusion.with_option("/etc/xla_flags.txt")


ENABLE_FIRST = """
import jax, jax.numpy as jnp
from treeopt import fusion
fusion.enable_cpu_multi_output_fusion()
import os
print(os.environ["XLA_FLAGS"])
print(len(jax.devices()), fusion.cpu_multi_output_fusion())
x = jax.ShapeDtypeStruct((4096,), jnp.float32)
text = jax.jit(lambda a, b: (a + b, a * b)).lower(x, x).compile().as_text()
print(sum(" fusion(" in line for line in text[text.index("ENTRY"):].splitlines()))
"""


def test_enable_before_the_backend_starts_turns_the_option_on():
    # Flags already set are kept (two host devices; a quoted extra-options
    # list), and the option is on.
    before = (
        '--xla_backend_extra_options="xla_unused_option=1" '
        "--xla_force_host_platform_device_count=2"
    )
    env = {**os.environ, "XLA_FLAGS": before, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", ENABLE_FIRST],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags, devices, fusions = proc.stdout.splitlines()[-3:]
    assert flags == before + " " + fusion.XLA_FLAGS
    assert devices == "2 True"
    assert fusions == "1"  # both outputs from one loop


def test_enable_after_the_backend_started_raises_and_restores(monkeypatch):
    jax.devices()  # the backend starts here, without the option
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=somewhere")
    fusion._probe.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="started before"):
            fusion.enable_cpu_multi_output_fusion()
        assert os.environ["XLA_FLAGS"] == "--xla_dump_to=somewhere"
        assert not fusion.cpu_multi_output_fusion()
        monkeypatch.delenv("XLA_FLAGS")
        with pytest.raises(RuntimeError, match="XLA_FLAGS="):
            fusion.enable_cpu_multi_output_fusion()
        assert "XLA_FLAGS" not in os.environ
        monkeypatch.setenv("XLA_FLAGS", "/etc/xla_flags.txt")
        with pytest.raises(RuntimeError, match="flags file"):
            fusion.enable_cpu_multi_output_fusion()
        assert os.environ["XLA_FLAGS"] == "/etc/xla_flags.txt"
        monkeypatch.delenv("XLA_FLAGS")
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        with pytest.raises(RuntimeError, match=r"XLA:CPU option; .* 'gpu'"):
            fusion.enable_cpu_multi_output_fusion()
    finally:
        fusion._probe.cache_clear()
