"""The example scripts run, and write only where they are told (--out) or into a new
temporary folder: never into the working folder."""

import subprocess
import sys
from pathlib import Path

import pytest

from xformer.backend import is_installed

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,written", [("quickstart.py", "tiny.safetensors"),
                                            ("native_torch.py", "trained.safetensors")])
def test_example_leaves_the_working_folder_empty(script, written, tmp_path):
    if not is_installed("torch"):
        pytest.skip("the examples use torch")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    path = Path(r.stdout.strip().splitlines()[-1 if script == "native_torch.py" else 0]
                .split(": ", 1)[1])
    assert path.name == written and path.is_file()
    if script == "native_torch.py":  # the named folder (one script: each run costs seconds)
        r = subprocess.run([sys.executable, str(EXAMPLES / script), "--out",
                            str(tmp_path / "o")], cwd=cwd, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and (tmp_path / "o" / written).is_file()
        assert list(cwd.iterdir()) == []
