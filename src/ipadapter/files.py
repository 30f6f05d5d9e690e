"""Writing files: whole or not at all, with the permissions an ordinary `open()` would give.

Every file the library writes (adapters, embeddings, training checkpoints and caches, the tiny world's weights) goes
through a temporary file in the destination folder and a rename, so a crash or a kill never leaves half a file.

Permissions: safetensors >= 0.8 writes through its own temporary file, which is created with mode 0600 whatever the
umask (safetensors/safetensors#782), so a trained adapter could not be read by the other users of a shared machine or
by a container's non-root user. The helpers here give each written file what `open(path, "w")` would: an existing
file keeps its mode, a new one gets 0666 minus the umask.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def plain_mode(path: Path) -> int:
    """The permission bits `open(path, "w")` would leave: the existing file's, or 0666 minus the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Calls `write(tmp)` on a temporary path beside `path`, gives it `plain_mode(path)`, then renames it onto
    `path`: readers see the old file or the new one, never a part. A failed write removes its temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = plain_mode(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """`safetensors.torch.save_file`, atomically and with ordinary permissions."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fix_modes(folder: str | os.PathLike) -> None:
    """Gives the .safetensors files under `folder` that were written with safetensors' private 0600 (e.g. by a
    diffusers / transformers `save_pretrained`) the mode a new file gets under the umask."""
    mode = 0o666 & ~umask()
    for path in Path(folder).rglob("*.safetensors"):
        if stat.S_IMODE(path.stat().st_mode) == 0o600 and mode != 0o600:
            os.chmod(path, mode)
