"""The example scripts run, and write only where they are told (--out) or into a new
temporary folder: never into the working folder."""

import subprocess
import sys
from pathlib import Path

import pytest

from xformer.backend import is_installed

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,written", [("quickstart.py", "tiny.safetensors"),
                                            ("native_torch.py", "trained.safetensors"),
                                            ("train_three_frameworks.py", "trained.safetensors")])
def test_example_leaves_the_working_folder_empty(script, written, tmp_path):
    if not is_installed("torch"):
        pytest.skip("the examples use torch")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    path = Path(r.stdout.strip().splitlines()[0 if script == "quickstart.py" else -1]
                .split(": ", 1)[1])
    assert path.name == written and path.is_file()
    if script == "train_three_frameworks.py":  # every backend lands on the same weights
        lines = [ln for ln in r.stdout.splitlines() if "largest relative difference" in ln]
        assert len(lines) == sum(map(is_installed, ("torch", "tensorflow", "mxnet"))) - 1
        assert all(float(ln.rsplit(" ", 1)[1]) <= 1e-10 for ln in lines), lines
        losses = {ln.split(":")[1] for ln in r.stdout.splitlines() if ": loss " in ln}
        assert len(losses) == 1, losses  # the same losses, printed to 4 decimals
    if script == "native_torch.py":  # the named folder (one script: each run costs seconds)
        r = subprocess.run([sys.executable, str(EXAMPLES / script), "--out",
                            str(tmp_path / "o")], cwd=cwd, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and (tmp_path / "o" / written).is_file()
        assert list(cwd.iterdir()) == []
