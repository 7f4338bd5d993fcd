"""Every error a user can cause, and the one-line rule the command line applies to them.

This module is the ground floor of the application: it imports nothing of it. Every other module raises these
classes; :func:`one_line` and :data:`USER_ERRORS` are what the CLI (and ``plan``) use to turn one into a single
``error: ...`` line with exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ConfigError",
    "DataError",
    "RunError",
    "NonFiniteLoss",
    "OutOfMemory",
    "EvaluateError",
    "PointCloudError",
    "USER_ERRORS",
    "one_line",
]


class ConfigError(ValueError):
    """An invalid configuration. ``str(err)`` names every offending key path, what was given and what was expected.

    Attributes:
        problems: list of ``(key_path, message)`` pairs, one per problem found.
        key: key path of the first problem (``""`` for problems with the file as a whole).
        source: the YAML file the settings came from, if any.
    """

    def __init__(
        self, message: str | None = None, key: str = "", problems: Sequence[tuple[str, str]] | None = None,
        source: str | None = None,
    ) -> None:
        if problems is None:
            problems = [(key, message or "invalid value")]
        self.problems: list[tuple[str, str]] = list(problems)
        self.key: str = self.problems[0][0] if self.problems else key
        self.source = source
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"{k}: {m}" if k else m for k, m in self.problems]
        if len(lines) == 1:
            return f"Invalid configuration{where}: {lines[0]}"
        body = "\n".join(f"  - {line}" for line in lines)
        return f"Invalid configuration{where} ({len(lines)} problems):\n{body}"

    def with_source(self, source: str | Path) -> ConfigError:
        """Same problems, with the config file named in the message."""
        return ConfigError(problems=self.problems, source=str(source))


class DataError(ValueError):
    """A problem with the data or the data configuration (names the file/key and what was expected)."""


class RunError(RuntimeError):
    """A run cannot start or resume; the message says why and what to do."""


class NonFiniteLoss(RunError):
    """A loss became NaN or infinite on some process (every process raises it with the same message)."""


class OutOfMemory(RunError):
    """The work does not fit the device's memory: found before it started (the estimate) or when an allocation failed.

    Attributes:
        section: the settings section whose knobs apply (``autoencoder``, ``diffusion``, ``sampling``), so that the
            command line can add the ``--set`` changes that ``plan`` suggests.
    """

    def __init__(self, message: str, section: str | None = None) -> None:
        super().__init__(message)
        self.section = section


class EvaluateError(ValueError):
    """A user error in the evaluation inputs (folder, shapes, counts, weights file)."""


class PointCloudError(ValueError):
    """A problem with a point-cloud file or a voxelisation request (names the file or option and what was expected)."""


# the exceptions that mean "the user's input is wrong", as opposed to a bug
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, RunError, EvaluateError, PointCloudError, FileExistsError,
)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: the lines of a multi-problem message joined with '; '."""
    parts = [part.strip(" -") for part in str(exc).splitlines() if part.strip(" -")]
    text = "; ".join(parts) if parts else type(exc).__name__
    return text.replace(":;", ":")
