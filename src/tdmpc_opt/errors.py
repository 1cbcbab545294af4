"""Exceptions of tdmpc-opt.

Every error a user can cause (bad file, bad task name, bad option) is raised as a subclass of
:class:`TdmpcError`; the CLI prints its message as one line and exits non-zero. Anything else
is a bug and keeps its traceback.
"""


class TdmpcError(Exception):
    """Base class of every user-facing error; the CLI maps it to exit code 2."""


class ConfigError(TdmpcError):
    """A configuration value or override is invalid."""


class CheckpointError(TdmpcError):
    """A checkpoint file is missing, unsafe, corrupted or fits no known architecture."""


class TaskError(TdmpcError):
    """A task or task-set name is unknown, or not part of a model's task set."""


class DataError(TdmpcError):
    """A dataset file or directory is missing, corrupted or in the wrong layout."""


class InputError(TdmpcError):
    """An input (observation, action, JSON document) has the wrong shape or type."""


class OutputError(TdmpcError, OSError):
    """An output file could not be written (a folder in its way, no permission, disk full).

    Also an :class:`OSError` with the original ``errno`` and ``strerror``, so code that
    handles write failures (a run keeping its last good checkpoint) still sees one.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"
