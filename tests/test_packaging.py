"""What the project says about itself agrees with what it is: version, command lists."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import neuralode
from neuralode.cli import ANALYSES, TRAINERS

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_takes_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"], "the version has one source: __init__.py"
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "neuralode.__version__"}


def test_installed_version_is_the_package_version():
    # the installed metadata comes from pyproject (`make setup` reinstalls when it changes)
    assert importlib.metadata.version("neuralode") == neuralode.__version__


@pytest.mark.parametrize("kind,names", [("train", TRAINERS), ("analyze", ANALYSES)])
def test_readme_lists_every_command_name(kind, names):
    readme = (ROOT / "README.md").read_text()
    line = re.search(rf"neuralode {kind} NAME --help\s+#(.*)", readme)
    assert line, f"README has no 'neuralode {kind} NAME --help' line"
    listed = {n.strip() for n in line.group(1).split(",")}
    assert listed == set(names), (listed, set(names))
