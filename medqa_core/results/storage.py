"""Files that survive a crash and prove what they hold: fsync, sha256, umask modes, safetensors headers.

Pure standard library (no torch), so records and checkpoints share it and record readers stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

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
