"""The files around the package agree with each other: environment.yml and pyproject.toml,
the Makefile's `test` target, CI's entry point and the committed notebooks."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def normalize(name: str) -> str:
    """PEP 503 name normalisation: Tensor_Flow, tensor.flow and tensor-flow are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(req: str) -> tuple[str, str]:
    """'triton>=3.6; sys_platform == "linux"' -> ('triton', '>=3.6;sys_platform=="linux"')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?(.*)", req)
    assert match, f"not a requirement: {req!r}"
    rest = re.sub(r"\s+", "", match.group(3)).replace("'", '"')
    return normalize(match.group(1)), rest


def environment_yml() -> dict:
    """A small parser for environment.yml's shape (no yaml dependency): top-level keys, the
    `dependencies` list and its nested `- pip:` list. Returns {"name", "channels",
    "conda": [...], "pip": [...]}."""
    out: dict = {"conda": [], "pip": [], "channels": []}
    section, pip_indent = None, None
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            key, _, value = text.partition(":")
            section = key.strip()
            if value.strip():
                out[section] = value.strip()
            pip_indent = None
            continue
        assert text.startswith("- "), f"unexpected line in environment.yml: {raw!r}"
        item = text[2:].strip()
        if section == "channels":
            out["channels"].append(item)
        elif section == "dependencies":
            if item == "pip:":
                pip_indent = indent
            elif pip_indent is not None and indent > pip_indent:
                out["pip"].append(item)
            else:
                pip_indent = None
                out["conda"].append(item)
    return out


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_parser_reads_the_file():
    env = environment_yml()
    assert env["name"] == "moelab" and env["channels"] == ["conda-forge"]
    assert "pip" in env["conda"] and any(c.startswith("python") for c in env["conda"])
    assert "-e ." in env["pip"], "the learner's environment must install moelab itself"
    assert len(env["pip"]) > 5


def test_environment_and_pyproject_name_the_same_packages(pyproject):
    project = pyproject["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    conda_env = [r for r in environment_yml()["pip"] if r != "-e ."]
    want, have = dict(map(split_requirement, declared)), dict(map(split_requirement, conda_env))
    assert len(want) == len(declared) and len(have) == len(conda_env), "a package is listed twice"
    assert sorted(have) == sorted(want), (
        f"only in pyproject.toml: {sorted(set(want) - set(have))}; "
        f"only in environment.yml: {sorted(set(have) - set(want))}"
    )
    for name in want:  # the same version ranges and markers, too
        assert have[name] == want[name], f"{name}: environment.yml {have[name]!r} != pyproject {want[name]!r}"
    for core in ("torch", "transformers", "triton", "pytest", "nbval"):
        assert core in want


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_python_version_is_consistent(pyproject):
    requires = pyproject["project"]["requires-python"]
    assert requires == ">=3.11"
    minimum = version_tuple(requires[2:])
    pins = [c for c in environment_yml()["conda"] if re.match(r"python\b", c)]
    assert len(pins) == 1, pins
    match = re.fullmatch(r"python\s*(=|==|>=)\s*([\d.]+)", pins[0])
    assert match, f"environment.yml pins python as {pins[0]!r}"
    pinned = version_tuple(match.group(2))
    assert pinned[:2] == minimum[:2], f"environment.yml's {pins[0]!r} is not the lowest python {requires!r} allows"


def make_rule(target: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of a Makefile target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    for n, line in enumerate(lines):
        if re.match(rf"{re.escape(target)}\s*:(?!=)", line):
            prereqs = line.split(":", 1)[1].split()
            recipe = []
            for body in lines[n + 1:]:
                if not body.startswith("\t"):
                    break
                recipe.append(body.strip())
            return prereqs, recipe
    raise AssertionError(f"no {target!r} target in the Makefile")


def make_variables() -> dict[str, str]:
    found = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"([A-Z_]+)\s*[?:]?=\s*(.*)", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def test_make_test_runs_notebooks_and_unit_tests_in_both_environments(pyproject):
    prereqs, recipe = make_rule("test")
    assert "$(VENV)/.installed" in prereqs and "$(LOWEST)/.installed" in prereqs

    def runs(pattern):
        return [line for line in recipe if re.search(pattern, line)]
    assert runs(r"^\$\(VENV\)/bin/python -m pytest tests\b"), recipe
    notebooks = runs(r"^\$\(VENV\)/bin/python -m pytest .*--nbval")
    assert notebooks and all(re.search(r"\bnotebooks\s*(-q)?$", line) for line in notebooks), recipe
    assert all("notebooks/sanitize.cfg" in line for line in notebooks)
    assert (ROOT / "notebooks" / "sanitize.cfg").is_file()
    assert runs(r"^\$\(LOWEST\)/bin/python -m pytest tests\b"), "unit tests must also run in the lowest env"
    # The lowest env pins the lowest transformers that pyproject.toml admits.
    variables = make_variables()
    pin = re.fullmatch(r"transformers==([\d.]+)", variables["LOWEST_TRANSFORMERS"])
    assert pin, variables["LOWEST_TRANSFORMERS"]
    _, lowest_recipe = make_rule("$(LOWEST)/.installed")
    assert any("$(LOWEST_TRANSFORMERS)" in line for line in lowest_recipe)
    spec = dict(map(split_requirement, pyproject["project"]["dependencies"]))["transformers"]
    floor = re.search(r">=([\d.]+)", spec).group(1)
    assert version_tuple(pin.group(1)) == (version_tuple(floor) + (0, 0))[:3], (pin.group(1), spec)


def test_ci_entry_point_calls_make_test():
    script = ROOT / ".ci" / "run"
    assert script.stat().st_mode & 0o111, ".ci/run must be executable"
    lines = [line.strip() for line in script.read_text().splitlines()]
    assert lines[0].startswith("#!") and "bash" in lines[0]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert "set -euo pipefail" in commands, "a failing step must fail CI"
    assert "make test" in commands


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


def source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs_and_a_checked_cell(path):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    missing = [n for n, c in enumerate(code) if c.get("execution_count") is None]
    assert not missing, f"{path.name}: code cells {missing} were never run; commit the notebook with its outputs"
    counts = [c["execution_count"] for c in code]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{path.name}: execution counts {counts} are not one top-to-bottom run"
    )
    checked = [c for c in code if source(c).startswith("# NBVAL_CHECK_OUTPUT")]
    assert checked, f"{path.name} has no cell marked # NBVAL_CHECK_OUTPUT"
    for cell in checked:
        text = "".join(
            "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
            for o in cell["outputs"]
        )
        assert text.strip(), f"{path.name}: a # NBVAL_CHECK_OUTPUT cell has no committed text output"
        assert not any(o["output_type"] == "error" for o in cell["outputs"])
