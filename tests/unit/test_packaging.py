"""What a wheel of llmshrink holds: every subpackage must be listed in pyproject.toml, or a
non-editable install (pip install llmshrink) silently lacks it."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[2]


def _packages_under(folder: Path, name: str) -> set[str]:
    return {".".join([name, *p.parent.relative_to(folder).parts]) for p in folder.rglob("__init__.py")}


def test_every_subpackage_is_in_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = _packages_under(ROOT / "llmshrink", "llmshrink")
    for name, folder in tool["package-dir"].items():  # llmshrink.kernels -> kernels/, llmshrink.evals -> evals/
        found |= _packages_under(ROOT / folder, name)
    listed = set(tool["packages"])
    assert found - listed == set(), f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"
