"""The small files a secret lives in (private keys, the Redis password): reading them, and
writing a new key file.

One descriptor from open to read: the checks apply to the file that is read, not to whatever
stood at the path a moment before. Only regular files: a FIFO would block the key refresh
forever, and /dev/zero would never end.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path


class NotRegularFile(OSError):
    """The path is a directory, a FIFO, a device or a socket."""


class FileTooLarge(OSError):
    """More octets than the caller's limit: the wrong file, not a key or password."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def read_small_file(path: str | Path, limit: int) -> bytes:
    """The whole file, if it is a regular file of at most `limit` octets.

    Raises NotRegularFile, FileTooLarge, or the OSError of open/read (FileNotFoundError...).
    """
    # Refused before it is opened, so that opening has no side effect (a tty, a device) and a
    # socket gets the same answer as a FIFO; fstat below checks what was opened, in case
    # the path changed in between.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotRegularFile("not a regular file")
    # O_NONBLOCK: a FIFO swapped in since the stat must not block the open either
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile("not a regular file")
        if info.st_size > limit:
            raise FileTooLarge(info.st_size)
        chunks = []
        left = limit + 1  # one more than allowed: a file that grew since fstat is caught
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise FileTooLarge(len(data))
        return data
    finally:
        os.close(fd)


def write_new_secret(path: str | Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; FileExistsError if anything is there
    (a key file is never overwritten, and never readable by others for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# A password file larger than this is the wrong file, not a password.
MAX_PASSWORD_FILE = 4096


class PasswordError(ValueError):
    """The Redis password cannot be read; the text names the variable or file, never the value."""


def read_password(
    env_name: str | None, file_path: str | None, env: Mapping[str, str]
) -> str | None:
    """The Redis password from a secret file or an environment variable; None when neither is
    configured (a Redis without `requirepass`).

    The file wins when both are given: a Docker secret is the safer place, and an admin who
    mounted one means it. One trailing newline is dropped (`echo pw > file` writes one).
    """
    if file_path:
        where = f"redis password file {file_path}"
        data, failure = _read_secret_file(Path(file_path), where)
        if failure:
            raise PasswordError(failure)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # raised below, outside the handler: UnicodeDecodeError carries the bytes it failed
            # on, and a chained __context__ would carry them along
            text = None
        if text is None:
            raise PasswordError(f"{where} is not UTF-8 text")
    elif env_name:
        where = f"environment variable {env_name}"
        if env_name not in env:
            raise PasswordError(f"{where} (the redis password) is not set")
        text = env[env_name]
    else:
        return None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise PasswordError(f"{where} is empty")
    if any(c in text for c in "\r\n\0"):
        raise PasswordError(f"{where} holds more than one line; the password must be one line")
    return text


def _read_secret_file(path: Path, where: str) -> tuple[bytes, str]:
    try:
        return read_small_file(path, MAX_PASSWORD_FILE), ""
    except NotRegularFile:
        return b"", f"{where} is not a regular file"
    except FileTooLarge as exc:
        return b"", f"{where} is {exc.size} bytes: too large to be a password"
    except FileNotFoundError:
        return b"", f"{where} does not exist"
    except OSError as exc:
        return b"", f"{where}: cannot read: {exc.strerror}"
