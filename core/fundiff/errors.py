"""Errors a user can cause. The CLI prints their message and exits with status 2."""

from __future__ import annotations

import difflib
from typing import Iterable


class FundiffError(Exception):
    """A problem with the user's input (recipe, plugin set-up, run directory, ...).

    The message names the cause and the fix; the CLI prints it without a traceback.
    """


class RecipeError(FundiffError):
    """One or more problems in a recipe, each tied to a path such as ``sampler.steps``."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        if len(problems) == 1:
            path, msg = problems[0]
            text = f"{where}{path}: {msg}" if path else f"{where}{msg}"
        else:
            lines = [f"{where}{len(problems)} problems in the recipe:"]
            lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
            text = "\n".join(lines)
        super().__init__(text)


class PluginError(FundiffError):
    """A plugin could not be loaded or broke the registration contract."""


def suggest(name: str, known: Iterable[str]) -> str:
    """'did you mean ...?' text for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(c) for c in close) + "? "
