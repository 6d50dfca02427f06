"""Packaging: conda env files agree with pyproject; the console script is declared."""
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower()


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("env", ["cpu.yaml", "cuda.yaml"])
def test_env_files_match_pyproject(env):
    deps = _pyproject()["project"]["dependencies"]
    spec = yaml.safe_load((REPO / "envs" / env).read_text())
    pip = next(d for d in spec["dependencies"] if isinstance(d, dict))["pip"]
    pip = [p for p in pip if not p.startswith("-")]
    assert {_name(d) for d in deps} == {_name(p) for p in pip}
    # pinned torch stack must satisfy the pyproject ranges
    from packaging.requirements import Requirement

    for p in pip:
        if "==" in p:
            req = next(Requirement(d) for d in deps if _name(d) == _name(p))
            assert req.specifier.contains(p.split("==")[1]), (p, str(req))


def test_console_script():
    assert _pyproject()["project"]["scripts"]["avepipe"] == "avepipe.cli:main"


def test_ci_runs_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert "pip install -e '.[test]'" in block and "pytest" in block
    assert "test-command" in (REPO / ".ci" / "run").read_text()
