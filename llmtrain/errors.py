"""Errors a user can fix: bad config keys, bad input files, a full disk. run.py prints them without a traceback."""
from __future__ import annotations

import contextlib
import errno
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # errors a user fixes by freeing disk space
# an errno in a message: Rust libraries' (safetensors, tokenizers) "(os error 28)", or an OSError passed on as text
_OS_ERROR = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
CACHE_ADVICE = "free disk space, or point LLMTRAIN_CACHE (data.cache_dir) at a disk with room"


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


class NoSpaceError(UserError):
    """The disk filled up (or a quota ran out) while writing `what` in `path`; `advice` says what to do."""

    def __init__(self, what: str, path: Path | str, advice: str = "free disk space"):
        self.what, self.path, self.advice = what, path, advice
        super().__init__(f"no space left to write {what} in {path}: {advice}")

    def also(self, hint: str) -> NoSpaceError:
        """The same error with one more piece of advice (where a resumed run would continue from)."""
        return NoSpaceError(self.what, self.path, f"{self.advice}; {hint}")


def is_no_space(error: BaseException | None) -> bool:
    """A full disk, however it was reported: an OSError, a Rust library's message, or the cause of torch's error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        if any(int(m.group(1) or m.group(2)) in NO_SPACE for m in _OS_ERROR.finditer(str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _filename(error: BaseException | None) -> str | None:
    while error is not None:
        if isinstance(error, OSError) and error.filename:
            return str(error.filename)
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(what: str | None, path: Path | str, advice: str = "free disk space",
            partial: Path | None = None) -> Iterator[None]:
    """Write `what` into `path`: a full disk becomes a NoSpaceError saying what to do; on any error the
    half-written `partial` (a temporary file or directory) is removed. `what=None`: the file the error names."""
    try:
        yield
    except Exception as e:
        if partial is not None:
            _remove(Path(partial))
        if isinstance(e, NoSpaceError) or not is_no_space(e):
            raise
        if what is None:
            name = _filename(e)
            what, path = (Path(name).name, Path(name).parent) if name else ("the run's outputs", path)
        raise NoSpaceError(what, path, advice) from e


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. `code` is the conventional exit status."""

    def __init__(self, signum: int, run_dir: Path | None = None, step: int | None = None):
        super().__init__(signum, run_dir, step)
        self.code, self.signum, self.run_dir, self.step = 128 + signum, signum, run_dir, step
        # what to add to the command to continue; a sweep job says hydra.sweep.dir=... instead (run.py)
        self.again = f"hydra.run.dir={run_dir} trainer.resume=auto" if run_dir else "trainer.resume=auto"

    def __str__(self) -> str:
        where = f" at step {self.step}; checkpoint saved in {self.run_dir}/checkpoints/step-{self.step}" \
            if self.run_dir else ""
        return f"stopped by {signal.Signals(self.signum).name}{where}. To continue, run the same command with " \
               f"{self.again}"
