"""Shared fixtures of the conformance suite: the targets are every default mode of every
installed backend (each framework is imported once per test process)."""

import pytest

from xformer.conformance import default_targets


@pytest.fixture(scope="session")
def targets():
    found = default_targets()
    if len(found) < 2:
        pytest.skip("conformance needs at least two backend/mode targets installed")
    return found


def assert_conformant(report):
    """Fail with one line per diverging tensor (name, pair, max abs / max rel, tolerance)."""
    assert report.ok, f"{report.case.name}: {len(report.failures)} tensors out of tolerance:\n" \
        + "\n".join(d.message() for d in report.failures[:40])
