"""Every shell command in the README (and in docs/*.md) resolves as written on a fresh clone after the
set-up: fenced ``bash``/``sh``/``shell``/``console`` blocks and inline code spans that start with
``.venv/bin/python``, ``python`` or ``make``.

How each is checked, without running it: ``make T`` -> ``make -n T`` exits 0; ``.venv/bin/python train.py
SUB ...`` -> the same arguments plus ``--print_config`` parse (LightningCLI reads every ``--config`` and
override, then exits 0); ``.venv/bin/python -m MODULE WORDS ...`` and ``.venv/bin/python SCRIPT WORDS ...``
-> ``--help`` after the leading words (module and subcommand exist, exit 0); any other first word must be
an executable file of the repository. Files a command names (configs, scripts) must exist; paths under
``runs/`` are what the commands write. Bare ``python`` is refused: on a fresh clone it is not the
environment the set-up built. Relative Markdown links must point at files of the repository.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
VENV_PYTHON = ".venv/bin/python"
RUN_OUTPUTS = "runs/"


def commands_in(text: str) -> list[str]:
    """The shell commands of a Markdown text: fenced shell blocks (comments and prompts dropped,
    backslash continuations joined) and inline spans that start with a command word."""
    found: list[str] = []
    for fence in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if fence.group(1).lower() not in SHELL_FENCES:
            continue
        for line in fence.group(2).replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                found.append(line)
    outside = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`\n]+)`", outside):
        if re.match(rf"({re.escape(VENV_PYTHON)}|python3?|make) ", span):
            found.append(span)
    # drop trailing comments and usage notation: "[--force]" marks an optional argument, not text to type
    return [re.sub(r"\s\[[^\]]*\]", "", re.split(r"\s#", c, maxsplit=1)[0]).strip() for c in found]


def all_commands() -> list[tuple[str, str]]:
    return [(doc.name, c) for doc in DOCUMENTS for c in dict.fromkeys(commands_in(doc.read_text()))]


def test_the_documents_hold_the_commands_this_test_checks():
    # the README's set-up, resume and example commands at least; a restructured README keeps finding them
    commands = [c for _, c in all_commands()]
    assert "make quickstart" in commands and "make test" in commands
    assert any(c.startswith(f"{VENV_PYTHON} train.py fit --config configs/quickstart.yaml") for c in commands)
    assert any(c.startswith(f"{VENV_PYTHON} -m layermoe.data make-synthetic") for c in commands)


def _run_in_process(argv: list[str], target: str, kind: str, monkeypatch, capsys) -> int:
    """Run ``python -m target`` or ``python target`` with ``argv`` here; the exit status (0 if none)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [target, *argv])
    monkeypatch.syspath_prepend(str(REPO))
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(REPO / target), run_name="__main__")
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    finally:
        capsys.readouterr()
    return 0


def _check_named_files(args: list[str]) -> None:
    for arg in args:
        if arg.startswith("-") or "/" not in arg or arg.startswith(RUN_OUTPUTS) or "{" in arg:
            continue
        if Path(arg).suffix in (".yaml", ".yml", ".py", ".json", ".md", ".sh") or arg.startswith("configs/"):
            assert (REPO / arg).exists(), f"{arg} does not exist in the repository"


@pytest.mark.parametrize(("document", "command"), all_commands(), ids=lambda v: v[:70])
def test_command_resolves_as_written(document, command, monkeypatch, capsys):
    words = shlex.split(command)
    head, args = words[0], words[1:]
    assert head not in ("python", "python3"), (
        f"{document}: `{command}` runs the system python, which on a fresh clone lacks the dependencies;"
        f" write {VENV_PYTHON}"
    )
    _check_named_files(args)
    if head == "make":
        env = {**os.environ, "MAKEFLAGS": ""}
        result = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{document}: `{command}`: {result.stderr}"
        return
    if head != VENV_PYTHON:
        assert (REPO / head).is_file() and os.access(REPO / head, os.X_OK), f"{document}: `{command}`"
        return
    if args[:1] == ["train.py"]:
        from layermoe.cli import main

        monkeypatch.chdir(REPO)
        monkeypatch.setattr(sys, "argv", ["train.py"])
        with pytest.raises(SystemExit) as exit_:
            main([*args[1:], "--print_config"])
        capsys.readouterr()
        assert exit_.value.code in (0, None), f"{document}: `{command}` does not parse"
        return
    if args[:1] == ["-m"]:
        target, rest, kind = args[1], args[2:], "module"
    else:
        target, rest, kind = args[0], args[1:], "script"
        assert (REPO / target).is_file(), f"{document}: `{command}`: {target} does not exist"
    leading = [w for w in rest[: next((i for i, w in enumerate(rest) if w.startswith("-")), len(rest))]]
    status = _run_in_process([*leading, "--help"], target, kind, monkeypatch, capsys)
    checked = " ".join([head, *args[: 2 if kind == "module" else 1], *leading, "--help"])
    assert status == 0, f"{document}: `{command}`: `{checked}` failed"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_point_at_files(document):
    text = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (document.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{document.name} links to {target}, which does not exist"
