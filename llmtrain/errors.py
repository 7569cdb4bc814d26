"""Errors a user can fix: bad config keys and bad input files. run.py prints them without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config or data; the message says what to change."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


class ConfigError(UserError):
    """A config key has a bad value."""


class DataError(UserError):
    """An input file or directory cannot be used."""
