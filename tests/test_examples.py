"""The example scripts run and agree with one device (so they cannot rot)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["replicated", "fsdp"])
def test_data_parallel_example_matches_one_device(flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "data_parallel.py"),
            "--steps",
            "7",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "8 in the mesh" in out.stdout
    rows = re.findall(r"loss ([\d.]+)\s+one device ([\d.]+)", out.stdout)
    assert len(rows) == 3  # steps 0, 5 and the last
    for sharded, single in rows:
        assert float(sharded) == pytest.approx(float(single), rel=1e-5)
    assert float(rows[-1][0]) < float(rows[0][0])
