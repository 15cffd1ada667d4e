"""What a wheel of llmshrink holds: every subpackage must be listed in pyproject.toml, or a
non-editable install (pip install llmshrink) silently lacks it."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_in_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]  # llmshrink.kernels -> kernels/, llmshrink.evals -> evals/
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llmshrink").rglob("__init__.py")}
    found |= {name for name, d in dirs.items() if (ROOT / d / "__init__.py").exists()}
    listed = set(tool["packages"])
    assert found - listed == set(), f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"
