"""JSON Lines files: reading with errors that name the file and the line, atomic writes, durable appends.

Every reader reports a malformed line as `DataError("<file>:<line>: ...")` (line numbers from 1); blank lines
are skipped. Writers never leave a half-written file under the final name: `write_jsonl_atomic` writes a
temporary file in the same folder and renames it over the target; `JsonlAppender` flushes and fsyncs each
batch of rows, and `read_jsonl(..., allow_torn_tail=True)` drops the one incomplete last line a crash can leave.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Union

__all__ = ["DataError", "read_jsonl", "read_text_lines", "write_jsonl_atomic", "JsonlAppender", "file_sha256",
           "check_writable_folder", "check_writable_file", "remove_stale_temporaries"]

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file and, where it applies, the line."""


def read_jsonl(path: PathLike, *, allow_torn_tail: bool = False) -> list[tuple[int, dict]]:
    """`(line number, object)` for every non-blank line of a JSON Lines file.

    Each line must hold one JSON object in UTF-8. `allow_torn_tail=True` drops a last line that has no
    newline and does not decode or parse (a write interrupted by a crash or a full disk, which may end inside
    a multi-byte character) instead of raising. The file is split into lines as bytes and each line decoded
    on its own, so an error names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn_tail_allowed = allow_torn_tail and not data.endswith(b"\n")
    rows = []
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            if last and torn_tail_allowed:
                break
            raise DataError(
                f"{path}:{number}: not valid UTF-8 (byte {raw[error.start]:#04x} at byte {error.start + 1} of the "
                "line); save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            if last and torn_tail_allowed:
                break
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        rows.append((number, value))
    return rows


def read_text_lines(path: PathLike) -> list[tuple[int, str]]:
    """`(line number, line)` of a UTF-8 text file, line endings removed; DataError naming the line that is
    not UTF-8."""
    path = Path(path)
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}:{number}: not valid UTF-8 (byte {raw[error.start]:#04x} at byte {error.start + 1} of the "
                "line); save the file as UTF-8"
            ) from None
    return lines


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_jsonl_atomic(path: PathLike, rows: Iterable[dict]) -> None:
    """Write `rows` to `path` as JSON Lines; readers see the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's files are private (0600); give the usual mode
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(_dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)  # the rename itself durable
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OSError(error.errno, f"writing {path}: {error.strerror or error}") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class JsonlAppender:
    """Appends rows to a JSON Lines file, each `append` call durable on return (flush + fsync)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        created = not self.path.exists()
        self._handle = open(self.path, "a", encoding="utf-8")
        if created:
            fsync_directory(self.path.parent)

    def _repair_tail(self) -> None:
        """Cut an incomplete last line (no trailing newline) so that new rows start on a line of their own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def append(self, rows: Iterable[dict]) -> None:
        try:
            for row in rows:
                self._handle.write(_dumps(row) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:  # a full disk: say which file (the rows written so far are kept)
            raise OSError(error.errno, f"writing {self.path}: {error.strerror or error}") from error

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self.close()
        except OSError:
            if exc_type is None:
                raise  # else the error already raised (a full disk) says more than the failed flush at close


def fsync_directory(folder: PathLike) -> None:
    """fsync a folder, so that the files created or renamed in it are durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_writable_folder(folder: PathLike, role: str = "output") -> Path:
    """Create `folder` (and its parents) and check that files can be written in it; ValueError naming it
    otherwise (a read-only folder, a path under a file), so that a run fails before it loads anything."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason = "a file is in the way (a path component is not a folder)"
        raise ValueError(f"{role} folder {folder}: cannot write there ({reason})") from None
    return folder


def check_writable_file(path: PathLike, role: str = "output") -> Path:
    """`check_writable_folder` for the folder of the file `path`, which must not be a folder itself."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{role} {path}: is a folder, expected a file name")
    check_writable_folder(path.parent, f"{role} {path}:")
    return path


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Delete the `.<name>.*.tmp` files that `write_jsonl_atomic(path, ...)` leaves when killed before its
    rename (the next run of the same command calls this). Returns what was removed."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if stale.is_file():
                stale.unlink()
                removed.append(stale)
    return removed


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes (identifies a data file in checkpoints)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
