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
    ci = (REPO / ".ci" / "run").read_text()
    assert "test-command" in ci and "demo-command" in ci
    # the demo first, then the tests, in one clone
    assert ci.index("readme_block demo-command") < ci.index("readme_block test-command")
    demo = re.search(r"<!-- demo-command -->\s*```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert "snakemake --cores 2" in demo


def _env(name: str) -> dict:
    return yaml.safe_load((REPO / "envs" / name).read_text())


def test_cpu_and_cuda_envs_differ_only_in_the_torch_index():
    cpu, cuda = _env("cpu.yaml"), _env("cuda.yaml")
    assert [d for d in cpu["dependencies"] if not isinstance(d, dict)] == \
        [d for d in cuda["dependencies"] if not isinstance(d, dict)]
    pip = {n: next(d for d in e["dependencies"] if isinstance(d, dict))["pip"] for n, e in (("cpu", cpu), ("cuda", cuda))}
    assert [p for p in pip["cpu"] if not p.startswith("--")] == [p for p in pip["cuda"] if not p.startswith("--")]
    idx = {n: [p for p in v if p.startswith("--extra-index-url")] for n, v in pip.items()}
    assert idx["cpu"] == ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    assert len(idx["cuda"]) == 1 and re.search(r"/whl/cu\d+$", idx["cuda"][0])


def test_env_python_satisfies_requires_python():
    from packaging.specifiers import SpecifierSet

    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    for name in ("cpu.yaml", "cuda.yaml"):
        py = next(d for d in _env(name)["dependencies"] if isinstance(d, str) and d.startswith("python="))
        assert requires.contains(py.split("=", 1)[1] + ".0"), (name, py, str(requires))


def test_rules_use_the_env_files():
    """Every rule file names its conda env through common.smk's CPU_ENV / GPU_ENV, which point at envs/."""
    rules = REPO / "workflow" / "rules"
    common = (rules / "common.smk").read_text()
    for env in ("cpu.yaml", "cuda.yaml"):
        assert f'"../../envs/{env}"' in common and (rules / "../../envs" / env).resolve().is_file()
    for smk in rules.glob("*.smk"):
        text = smk.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, re.M))
        assert len(re.findall(r"^    conda:\n        (?:CPU_ENV|GPU_ENV)$", text, re.M)) == n_rules, smk.name
