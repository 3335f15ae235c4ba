"""The errors zimage-trt raises on purpose, one class per kind of failure, each with the exit
code the ``zimage-trt`` command ends with.

Every message is one line that names the bad value, where it came from (``FILE:LINE`` for prompts
files and YAML, ``node N`` for ComfyUI graphs, the file's name for unreadable files) and the
allowed range or the fix. The CLI prints ``zimage-trt: error: MESSAGE`` and exits with
``exit_code``; ``zimage-trt --debug`` shows the traceback as well.

Each class also derives from the built-in exception a caller would expect (``ValueError`` for bad
values and bad files, ``RuntimeError`` for a backend that cannot run, ``OSError`` for outputs that
cannot be written), so code that catches those keeps working.
"""

from __future__ import annotations

import errno

#: exit codes of the ``zimage-trt`` command, by kind of failure (README "Errors and safety")
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_FILE = 3
EXIT_UNAVAILABLE = 4
EXIT_OUTPUT = 5
EXIT_RUN = 6
EXIT_INTERRUPTED = 130


class ZimageError(Exception):
    """Any failure zimage-trt reports on purpose."""

    exit_code = EXIT_INTERNAL


class InputError(ZimageError, ValueError):
    """A value the user gave (argument, workflow, graph, prompts file, request) is out of range or
    malformed."""

    exit_code = EXIT_INPUT


class FileError(ZimageError, ValueError):
    """A file the run needs is missing, unreadable or damaged: weights, LoRAs, engine folders,
    images."""

    exit_code = EXIT_FILE


class MissingFileError(FileError, FileNotFoundError):
    """A file or folder the run needs is not there."""


class UnavailableError(ZimageError, RuntimeError):
    """What was asked for cannot run here: a backend or library not installed, no such device,
    engines built for another machine."""

    exit_code = EXIT_UNAVAILABLE


class OutputError(ZimageError, OSError):
    """An output cannot be written: permissions, a full disk, a name the file system refuses."""

    exit_code = EXIT_OUTPUT


class RunError(ZimageError, RuntimeError):
    """The run itself failed: an engine that refused to execute, an export or build step that
    failed."""

    exit_code = EXIT_RUN


class NonFiniteError(RunError, FloatingPointError):
    """NaN or Inf values appeared in the run (the message names the stage and step)."""


class MissingLibraryError(UnavailableError, ModuleNotFoundError):
    """An optional library the asked-for path needs is not installed (the message names the
    extra that installs it)."""


#: OSError numbers that mean "this output cannot be written here" rather than a bug
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "the name is too long for the file system",
}


def os_error(exc: OSError, path: object = None) -> ZimageError:
    """The project's error for an OSError that escaped: an OutputError for a full disk,
    permissions, a read-only file system or a refused name, a FileError for anything else (a
    missing or unreadable file), naming the path (the error's own, else ``path``)."""
    name = exc.filename if exc.filename is not None else path
    where = str(name) if name is not None else "a file"
    if exc.filename2 is not None:
        where = f"{where} → {exc.filename2}"
    if exc.errno in WRITE_ERRNOS:
        hint = ": free some space or write elsewhere" if exc.errno == errno.ENOSPC else ""
        return OutputError(f"{where}: {WRITE_ERRNOS[exc.errno]}{hint}")
    return FileError(f"{where}: {exc.strerror or exc}")


__all__ = [
    "EXIT_FILE",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_RUN",
    "EXIT_UNAVAILABLE",
    "FileError",
    "InputError",
    "MissingFileError",
    "MissingLibraryError",
    "NonFiniteError",
    "OutputError",
    "RunError",
    "UnavailableError",
    "ZimageError",
    "os_error",
]
