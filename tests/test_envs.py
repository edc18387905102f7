"""Every rule names a conda environment that exists and pins the same packages as pyproject.toml."""

import re
import tomllib

import yaml
from packaging.requirements import Requirement


def _pyproject_requirements(repo_root):
    with open(repo_root / "pyproject.toml", "rb") as handle:
        deps = tomllib.load(handle)["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def _rules(repo_root):
    """(rule name, conda file or None) for every rule in workflow/rules/*.smk."""
    found = []
    for smk in sorted((repo_root / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule |checkpoint )", smk.read_text(), flags=re.M)[1:]:
            name = re.match(r"(?:rule|checkpoint) (\w+)", block).group(1)
            conda = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", block, flags=re.M)
            found.append((smk, name, conda.group(1) if conda else None))
    return found


def test_every_rule_has_an_existing_conda_env(repo_root):
    rules = _rules(repo_root)
    assert len(rules) >= 3
    for smk, name, conda in rules:
        if name == "all":
            continue
        assert conda, f"rule {name} in {smk.name} has no conda: directive"
        env = (smk.parent / conda).resolve()
        assert env.is_file(), f"rule {name}: conda file {env} does not exist"
        assert env.with_name(env.stem + ".post-deploy.sh").is_file(), (
            f"{env.name}: no post-deploy script installing the core"
        )


def test_env_pins_match_pyproject(repo_root):
    pinned = _pyproject_requirements(repo_root)
    envs = sorted((repo_root / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert any(str(d).startswith("python=3.11") for d in spec["dependencies"] if isinstance(d, str))
        for line in pip:
            req = Requirement(line)
            assert req.name.lower() in pinned, f"{env.name}: {req.name} is not a dependency in pyproject.toml"
            assert req.specifier == pinned[req.name.lower()].specifier, (
                f"{env.name}: {req} differs from pyproject's {pinned[req.name.lower()]}"
            )
