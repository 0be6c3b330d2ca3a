"""File modes of the weights we write.

safetensors (0.8) creates its files with mode 0600 whatever the umask, so a stage or release copied to a shared
model folder, or mounted into a container running as another user, cannot be read although every other file
beside it can. Weight files are given the mode any other new file gets (0666 minus the umask).
"""

from __future__ import annotations

import os
from pathlib import Path


def umask_file_mode() -> int:
    """The mode a plain new file gets under the current umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def give_umask_mode(folder: str | os.PathLike, pattern: str = "*.safetensors") -> list[Path]:
    """chmod every file matching pattern under folder (recursively) to umask_file_mode(); returns them."""
    mode = umask_file_mode()
    files = sorted(Path(folder).rglob(pattern))
    for f in files:
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)
    return files
