"""The examples users copy first run as written: every Python block of ``docs/tutorial.rst``
and ``docs/application.rst``, and the quick start of ``README.md``.

Each block is a whole program (it defines ``async def main()`` and calls ``trio.run(main)``);
it runs in a subprocess with this interpreter, in an empty temporary directory (its ``app.db``
lands there), and must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.rst"
APPLICATION = ROOT / "docs" / "application.rst"
README = ROOT / "README.md"


def rst_python_blocks(text: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of a reST text, dedented."""
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        body: list[str] = []
        for following in lines[i + 1 :]:
            if following.strip() and not following.startswith((" ", "\t")):
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def markdown_python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```` ```python ```` blocks of a Markdown text."""
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)]


def is_program(block: str) -> bool:
    """Whether a block is a whole program: it defines ``main`` and runs it with Trio."""
    return "async def main(" in block and "trio.run(main" in block


def _examples() -> list[Any]:
    tutorial = rst_python_blocks(TUTORIAL.read_text(encoding="utf-8"))
    readme = markdown_python_blocks(README.read_text(encoding="utf-8"))
    application = rst_python_blocks(APPLICATION.read_text(encoding="utf-8"))
    params = [pytest.param(b, id=f"tutorial-{n}") for n, b in enumerate(tutorial, 1)]
    params += [pytest.param(b, id=f"application-{n}") for n, b in enumerate(application, 1)]
    params += [pytest.param(b, id=f"readme-{n}") for n, b in enumerate(readme, 1) if is_program(b)]
    return params


def test_the_extractors_find_the_blocks_and_only_them() -> None:
    rst = (
        "Intro\n\n.. code-block:: python\n\n   x = 1\n\n   y = 2\n\n"
        "Text\n\n.. code-block:: sh\n\n   ls\n"
    )
    assert rst_python_blocks(rst) == ["x = 1\n\ny = 2\n"]
    md = "# T\n\n```python\nprint(1)\n```\n\n```sh\nls\n```\n"
    assert markdown_python_blocks(md) == ["print(1)\n"]


def test_every_tutorial_block_is_a_whole_program_and_the_readme_has_one() -> None:
    tutorial = rst_python_blocks(TUTORIAL.read_text(encoding="utf-8"))
    assert len(tutorial) >= 5
    # A fragment would not be run by test_the_example_runs_as_written: none may slip in.
    assert [b.splitlines()[0] for b in tutorial if not is_program(b)] == []
    readme = markdown_python_blocks(README.read_text(encoding="utf-8"))
    assert any(is_program(b) for b in readme)


@pytest.mark.parametrize("source", _examples())
def test_the_example_runs_as_written(source: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(source, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{source}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_the_concepts_page_gives_the_real_safety_limit_defaults() -> None:
    from dataclasses import fields

    from supervisor import SafetyLimits

    text = (ROOT / "docs" / "concepts.rst").read_text(encoding="utf-8")
    documented = {
        name: None if default == "``None``" else float(default.removesuffix(" s"))
        for name, default in re.findall(r"^``(\w+)``\s+(``None``|[\d.]+ s)\s", text, re.M)
    }
    actual = {f.name: getattr(SafetyLimits(), f.name) for f in fields(SafetyLimits)}
    assert documented == actual


TESTING = ROOT / "docs" / "testing.rst"


def _test_modules() -> list[Any]:
    blocks = rst_python_blocks(TESTING.read_text(encoding="utf-8"))
    modules = [b for b in blocks if "\nasync def test_" in "\n" + b]
    return [pytest.param(b, id=f"testing-{n}") for n, b in enumerate(modules, 1)]


def test_the_testing_guide_has_its_three_examples() -> None:
    assert len(_test_modules()) >= 3


@pytest.mark.parametrize("source", _test_modules())
def test_the_testing_guides_example_passes_under_pytest(source: str, tmp_path: Path) -> None:
    (tmp_path / "test_example.py").write_text(source, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
