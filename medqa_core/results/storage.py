"""Files that survive a crash and prove what they hold: fsync, sha256, umask modes, safetensors headers.

Pure standard library (no torch), so records and checkpoints share it and record readers stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# safetensors' own cap on the JSON header (100 MB): a larger length field means the file is not safetensors.
MAX_SAFETENSORS_HEADER = 100_000_000
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (a rename after it is then never of a half-written file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (a rename into it) durable; a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give a file, or a folder and the files in it, the modes a plain ``open``/``mkdir`` would have given
    (0644 / 0755 under umask 022): safetensors and ``tempfile`` create files 0600 and folders 0700.
    """
    mask = current_umask()
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for child in path.iterdir():
        if child.is_file():
            os.chmod(child, 0o666 & ~mask)


def safetensors_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names -> (dtype, shape) from a safetensors file's header, checked against the file's size.

    Reads only the header, so a 15 GB shard is checked in milliseconds.

    Raises:
        ValueError: the file is shorter than its header says (truncated), longer, or not safetensors;
            the message says which, without the path (the caller names the file).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header (truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"header length {n} is not that of a safetensors file")
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError(f"{size} bytes, shorter than its {n}-byte header (truncated)")
    try:
        header: dict[str, Any] = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"header entry {name!r} is malformed") from e
        count = 1
        for d in shape:
            count *= d
        if dtype in _DTYPE_BYTES and stop - start != count * _DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {name!r}: {stop - start} bytes for shape {list(shape)} of {dtype}")
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        raise ValueError(f"{size} bytes, its header needs {expected} (truncated)")
    if size > expected:
        raise ValueError(f"{size} bytes, its header accounts for {expected} (data appended or header rewritten)")
    return tensors


def json_problem(path: Path) -> str | None:
    """Why ``path`` is not a JSON object (missing, not UTF-8, broken), or None when it is one."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        return f"cannot read ({e.strerror})"
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte {e.start})"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    except (ValueError, RecursionError) as e:
        return f"unreadable JSON ({str(e)[:120]})"
    return None if isinstance(data, dict) else f"a JSON {type(data).__name__}, expected an object"


# ---- output folders: checked before the work, writes that fail in one line ---------------------------

# What an error during a write says when the disk or filesystem failed it. OSError carries an errno; safetensors
# (SafetensorError) and torch.save (RuntimeError "[enforce fail at inline_container.cc] ... file write failed")
# only say so in words.
_WRITE_FAILURE_WORDS = ("No space left on device", "os error 28", "file write failed", "Input/output error",
                        "Read-only file system", "Permission denied", "Disk quota exceeded", "File too large")


class OutputFolderError(ValueError):
    """An output folder cannot be used (a file is in the way, it cannot be created or written); found before
    the work starts, so nothing is lost."""


class WriteError(OSError):
    """Writing an output failed part way (a full disk, an I/O error); what was half-written has been removed.

    Attributes:
        path: the file or folder being written.
        reason: the error in words ("No space left on device").
        free_bytes: free space on that filesystem after the failure (None where it cannot be read).
    """

    def __init__(self, path: Path, reason: str, free_bytes: int | None) -> None:
        self.path, self.reason, self.free_bytes = Path(path), reason, free_bytes
        super().__init__(f"cannot write {path}: {reason} ({free_text(path)} there)")


def existing_ancestor(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists (where its free space can be read)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds (or would hold) ``path``, for an unprivileged writer."""
    try:
        return shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """Bytes in binary units: "0 B", "12.0 KiB", "3.4 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_text(path: Path) -> str:
    """E.g. "12.0 KiB free" (or "free space unknown") on the filesystem of ``path``."""
    free = free_bytes(path)
    return "free space unknown" if free is None else f"{size_text(free)} free"


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` says the filesystem refused or failed a write (not a bug in what was being written)."""
    if isinstance(e, OSError):
        return True
    return any(word in str(e) for word in _WRITE_FAILURE_WORDS)


def write_failure_reason(e: BaseException) -> str:
    """The cause of a failed write in words: the OS's text where there is one, else the error's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    for word in _WRITE_FAILURE_WORDS[:1] + _WRITE_FAILURE_WORDS[3:]:
        if word in text:
            return word
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def write_error(path: Path, e: BaseException) -> WriteError:
    """A :class:`WriteError` for a write of ``path`` that raised ``e`` (see :func:`is_write_failure`)."""
    return WriteError(path, write_failure_reason(e), free_bytes(path))


def new_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, innermost first."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each folder (innermost first) that is still empty: what a refused job created and left unused."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone: leave it
            pass


# Tries at making and probing a folder that another process makes and removes meanwhile (probe_dir)
PROBE_ATTEMPTS = 5


def probe_dir(path: Path, option: str) -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be written in it, before any work.

    A tiny file is created exclusively, written, fsynced and removed, so a read-only or full filesystem, a
    missing permission or a file in the way shows now, not after hours of training.

    Args:
        path: the folder.
        option: the command-line option that named it ("--results"), for the message.

    Returns:
        The folder.

    Raises:
        OutputFolderError: naming the folder, what is wrong and what to do.
    """
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "is a file" if blocker == path else f"cannot be created: {blocker} is a file"
        raise OutputFolderError(f"{path}: {what}, not a folder; give {option} a folder (new or existing)")
    # Another process may create and remove the same folder meanwhile (the ranks of a distributed job each check
    # their outputs, and remove what they created for the check): a folder that vanishes is made again.
    for attempt in range(PROBE_ATTEMPTS):
        last = attempt == PROBE_ATTEMPTS - 1
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # it was there for a moment: made and removed by another process
            if last:
                raise OutputFolderError(f"{path}: the folder keeps vanishing ({e.strerror}); give {option} a "
                                        "folder no other job removes") from e
            continue
        except OSError as e:
            raise OutputFolderError(f"{path}: cannot create the folder ({e.strerror}); give {option} a folder you "
                                    "can write") from e
        try:
            _write_probe(path)
            return path
        except FileNotFoundError as e:  # the folder went away under the probe
            if last:
                raise OutputFolderError(f"{path}: the folder keeps vanishing ({e.strerror}); give {option} a "
                                        "folder no other job removes") from e
        except OSError as e:
            raise OutputFolderError(f"{path}: cannot write in the folder ({e.strerror}; {free_text(path)}); give "
                                    f"{option} a folder you can write, or free space there") from e
    return path


def _write_probe(folder: Path) -> None:
    """A tiny file created exclusively in ``folder``, written, fsynced and removed."""
    probe = folder / f".medqa-parity-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        try:
            probe.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            logger.warning("could not remove the write probe %s", probe)


def unique_name(stem: str) -> str:
    """``stem`` with this process's id and a random suffix: two jobs started in the same second never share it."""
    return f"{stem}-{os.getpid()}-{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    """Whether a process of that id runs on this host (a zombie or another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_room(needs: list[tuple[Path, int, str]]) -> None:
    """Refuse before the work when a filesystem has less free space than the outputs bound for it need.

    Args:
        needs: (folder, bytes it will need, option that named it) per output; folders on one filesystem add up.

    Raises:
        OutputFolderError: naming each option, the free space and the space needed.
    """
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, need, option in needs:
        by_device.setdefault(os.stat(existing_ancestor(folder)).st_dev, []).append((folder, need, option))
    for group in by_device.values():
        free, need = free_bytes(group[0][0]), sum(n for _, n, _ in group)
        if free is not None and free < need:
            names = " and ".join(f"{option} {folder}" for folder, _, option in group)
            raise OutputFolderError(f"{names}: {size_text(free)} free, the job's outputs need about "
                                    f"{size_text(need)}; free space there or give {group[0][2]} another disk")
