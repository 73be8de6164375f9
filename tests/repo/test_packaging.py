"""The project's own files agree with each other: pyproject, environment.yml, Makefile, CI, README."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _normalise(requirement):
    return requirement.replace(" ", "").lower().replace("_", "-")


def test_environment_yml_lists_exactly_the_pyproject_requirements():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    wanted = {_normalise(r) for r in project["dependencies"] + extras["test"] + extras["notebooks"]
              + extras["llama3-tokenizer"]}
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    listed = {_normalise(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, (f"only in environment.yml: {listed - wanted}; "
                              f"only in pyproject: {wanted - listed}")
    assert "-e ." in pip_section, "environment.yml must install the package itself"


def test_python_version_of_environment_is_allowed_by_pyproject():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minor = int(python.split("=")[1].split(".")[1])
    floor = int(_pyproject()["project"]["requires-python"].removeprefix(">=").split(".")[1])
    assert minor >= floor


def test_supported_transformers_range_covers_both_tested_versions():
    from packaging.specifiers import SpecifierSet

    spec = next(r for r in _pyproject()["project"]["dependencies"] if r.startswith("transformers"))
    allowed = SpecifierSet(spec.removeprefix("transformers"))
    makefile = (ROOT / "Makefile").read_text()
    old = next(line.split("==")[1].strip() for line in makefile.splitlines()
               if line.startswith("TRANSFORMERS_4"))
    assert old in allowed and "5.0.0" in allowed and "6.0.0" not in allowed


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert any(line.strip() == "make test" for line in ci.splitlines())
