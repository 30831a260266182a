"""Static checks of the Dockerfile and .dockerignore (there is no Docker engine in CI)."""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import warnings
from functools import partial
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CMD = ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends with a line continuation"
    return out


def first_index(items: list[tuple[str, str]], keyword: str, pattern: str = "") -> int:
    for i, (kw, args) in enumerate(items):
        if kw == keyword and re.search(pattern, args):
            return i
    raise AssertionError(f"no {keyword} matching {pattern!r} in the Dockerfile")


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_base_image_is_python_slim():
    items = instructions()
    assert items[0][0] == "FROM"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", items[0][1]), items[0][1]


def test_dependencies_are_installed_before_the_source_is_copied():
    items = instructions()
    install = first_index(items, "RUN", r"pip install .*\.\[serve,export\]")
    args = items[install][1]
    assert "--no-cache-dir" in args
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in args  # CPU torch wheels, not CUDA
    copies_before = [args for kw, args in items[:install] if kw == "COPY"]
    assert copies_before, "pyproject.toml must be copied before installing"
    for copied in copies_before:
        sources = shlex.split(copied)[:-1]
        assert all(s in ("pyproject.toml", "README.md") for s in sources), f"source copied before deps: {copied}"
    for source in ("detector/", "app/"):
        assert first_index(items, "COPY", rf"^{re.escape(source)}") > install


def test_weights_are_baked_in():
    items = instructions()
    i = first_index(items, "COPY", r"^weights/?\s")
    assert shlex.split(items[i][1])[-1].rstrip("/") in ("weights", "/app/weights")


def test_runs_as_a_non_root_user():
    items = instructions()
    users = [i for i, (kw, _) in enumerate(items) if kw == "USER"]
    assert users, "no USER instruction"
    user = items[users[-1]][1].split(":")[0]
    assert user not in ("root", "0")
    assert any(kw == "RUN" and re.search(rf"(useradd|adduser)\b.*\b{re.escape(user)}\b", a) for kw, a in items)
    last_run = max(i for i, (kw, _) in enumerate(items) if kw == "RUN")
    assert users[-1] > last_run, "USER must come after the root-only installation steps"


def test_healthcheck_uses_python_on_health():
    items = instructions()
    args = items[first_index(items, "HEALTHCHECK")][1]
    command = exec_form(args[args.index("CMD") + 3:].strip())
    assert command[0] in ("python", "python3") and "/health" in " ".join(command)
    assert "curl" not in args and "wget" not in args
    compile(command[command.index("-c") + 1], "<healthcheck>", "exec")  # valid Python


def test_exposes_8000_and_runs_the_factory():
    items = instructions()
    assert items[first_index(items, "EXPOSE")][1].split() == ["8000"]
    cmds = [exec_form(a) for kw, a in items if kw == "CMD"]
    assert cmds[-1] == CMD


def test_cmd_factory_builds_the_app():
    from fastapi import FastAPI

    from app.settings import Settings

    module_name, _, attr = CMD[1].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    app = factory(Settings())  # what --factory calls (without arguments: Settings() from the environment)
    assert isinstance(app, FastAPI)
    assert {"/detect", "/health", "/version"} <= {getattr(r, "path", None) for r in app.routes}


def _serve_target(monkeypatch, call) -> tuple[object, dict]:
    import uvicorn

    runs: list[tuple[object, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    call()
    assert len(runs) == 1, "uvicorn.run was not called"
    return runs[0]


def _assert_same_factory(target: object, kw: dict) -> None:
    from app.main import create_app

    assert kw.get("factory") is True
    if isinstance(target, str):
        assert target == CMD[1]
    else:
        assert isinstance(target, partial) and target.func is create_app


def test_serve_uses_the_same_factory(monkeypatch):
    from app.main import serve

    _assert_same_factory(*_serve_target(monkeypatch, serve))


def test_detect_serve_uses_the_same_factory(monkeypatch):
    from detector import cli

    if "serve" not in getattr(cli, "SUBCOMMANDS", ()):
        pytest.skip("the detect CLI has no 'serve' subcommand yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target, kw = _serve_target(monkeypatch, lambda: cli.main(["serve"]))
    _assert_same_factory(target, kw)


def test_readme_documents_the_same_uvicorn_command():
    blocks = re.findall(r"```[^\n]*\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [ln.split("#")[0].strip() for block in blocks for ln in block.splitlines()]
    commands = [ln for ln in lines if ln.startswith("uvicorn ") or " uvicorn " in f" {ln} "]
    expected = " ".join(CMD)
    assert commands, f"README.md has no uvicorn command in a code block; add this line to one: {expected}"
    for command in commands:
        words = shlex.split(command)
        words = words[words.index("uvicorn"):]
        assert words == CMD, f"README runs {' '.join(words)!r}, the Dockerfile {expected!r}"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a matching folder excludes its contents."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        candidates = [pat] + ([pat[3:]] if pat.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(prefix, c) for prefix in prefixes for c in candidates) or (
            pat.startswith("**/") and any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts)
        ):
            ignored = not negate
    return ignored


def test_dockerignore():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for path in (".venv/bin/python", "runs/m4/last.pt", ".git/HEAD", "app/__pycache__/main.cpython-311.pyc",
                 ".pytest_cache/v", "tests/test_app.py", "rnnpool_face.egg-info/PKG-INFO", "model.onnx"):
        assert _ignored(path, patterns), f"{path} should be excluded from the build context"
    for path in ("pyproject.toml", "README.md", "app/main.py", "app/static/index.html", "detector/__init__.py",
                 "weights/rnnpool_face_m4.pt", "weights/rnnpool_face_m4.onnx"):
        assert not _ignored(path, patterns), f"{path} is needed in the image"
