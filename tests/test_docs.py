"""The docs site stays current: generated pages match the code, and mkdocs builds it strictly.

docs/generate.py writes docs/index.md (README.md for the site), docs/reference/components.md
(every built-in component with its parameter table) and docs/reference/hooks.md (the hookspec
docstrings). These tests regenerate them into a temporary folder and compare with the
committed files: a new component, parameter, hook or README edit fails here until
``.venv/bin/python docs/generate.py`` is run and the result committed.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

from fundiff.components import KINDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fundiff_docs_generate", ROOT / "docs" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    return generate.generate(out), out


@pytest.mark.parametrize("page", ["index.md", "reference/components.md", "reference/hooks.md"])
def test_committed_pages_are_current(pages, page):
    generated, _ = pages
    committed = (ROOT / "docs" / page).read_text(encoding="utf-8")
    assert committed == generated[page], f"docs/{page} is stale: run `.venv/bin/python docs/generate.py` and commit the result"


def test_every_builtin_component_and_hook_is_documented(pages, registry):
    generated, _ = pages
    components = generated["reference/components.md"]
    for kind in KINDS:
        for entry in registry.entries(kind):
            if entry.distribution == "fundiff":
                assert f"### {kind}/{entry.name} " in components, f"{kind}/{entry.name} missing from the component reference"
    hooks = generated["reference/hooks.md"]
    names = generate.hook_names()
    assert len(names) == len(KINDS)  # one registration hook per kind
    for name in names:
        assert f"## `{name}(" in hooks
        assert "(undocumented)" not in hooks


def test_survey_map_names_registered_components(registry):
    """Every name the survey map gives is a registered component of the kind it names."""
    text = (ROOT / "docs" / "survey-map.md").read_text(encoding="utf-8")
    known = {kind: set(registry.names(kind)) for kind in KINDS}
    checked = 0
    for row in text.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or not row.startswith("| "):
            continue
        cell = cells[3]
        for kind_word, names in re.findall(r"\b(data|schedules?|noises?|chains?|denoisers?|parameterizations?|weightings?|guidances?|samplers?|spacings?)\s+((?:`[^`]+`(?:,\s*|\s+and\s+)?)+)", cell):
            kind = kind_word.rstrip("s") if kind_word != "data" else "data"
            for name in re.findall(r"`([^`]+)`", names):
                assert name in known[kind], f"survey map: {kind} {name!r} is not registered"
                checked += 1
    assert checked > 60


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "components" / "index.html").exists()


# ------------------------------------------------------------------ CLI help and completion


def test_every_command_help_has_a_description_and_top_level_examples():
    from fundiff import cli

    parser = cli.build_parser()
    top = parser.format_help()
    assert "examples:" in top
    commands = cli._subcommands(parser)
    assert {"plugins", "show", "train", "sample", "new-plugin", "convert", "completion"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description and sub.description.strip() in text, f"fundiff {name} --help has no description"
        assert f"fundiff {name}" in top, f"the top-level examples do not show fundiff {name}"


def _complete(script: str, *words: str) -> list[str]:
    line = " ".join(f"'{w}'" for w in words)
    result = subprocess.run(
        ["bash", "-c", f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _fundiff_complete; printf "%s\\n" "${{COMPREPLY[@]}}"'],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_script():
    """The script is valid bash and completes commands, options and choices from the parser."""
    from fundiff import cli

    script = cli.completion_script(cli.build_parser(), "bash")
    assert subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0
    assert _complete(script, "fundiff", "sa") == ["sample"]
    assert _complete(script, "fundiff", "-p", "no:x", "new") == ["new-plugin"]  # -p takes a value
    assert set(_complete(script, "fundiff", "sample", "--st")) == {"--steps", "--strength", "--stop-at"}
    assert _complete(script, "fundiff", "completion", "z") == ["zsh"]
    assert _complete(script, "fundiff", "convert", "r") == ["recipe"]
    zsh = cli.completion_script(cli.build_parser(), "zsh")
    assert "bashcompinit" in zsh and zsh.endswith(script.split("\n", 1)[1])
