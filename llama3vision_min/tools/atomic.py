"""Outputs that appear whole or not at all: the exports write under temporary names, then rename.

A full disk, a refusal half-way or an interrupted run must not leave a truncated ``model.gguf``, nor a
folder that looks like an export and lacks its tokenizer -- a retry would then be refused ("will not
overwrite") or, worse, load it. On failure only what this call wrote is removed, never what was there.
"""

import contextlib
import os
import secrets
import shutil
from pathlib import Path


@contextlib.contextmanager
def new_files(folder, names):
    """Yield one temporary path in ``folder`` per name in ``names``; when the block ends without an error,
    each becomes ``folder/name``. None of those may exist already (nothing is overwritten)."""
    folder = Path(folder)
    taken = [str(folder / name) for name in names if os.path.lexists(folder / name)]
    if taken:
        raise ValueError(f"will not overwrite {', '.join(taken)}: choose another folder")
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    temporary = [folder / f".{name}.partial-{secrets.token_hex(4)}" for name in names]
    done = []
    try:
        yield temporary
        for path, name in zip(temporary, names):
            path.rename(folder / name)
            done.append(folder / name)
    except BaseException:
        for path in temporary + done:
            path.unlink(missing_ok=True)
        if made and not any(folder.iterdir()):
            folder.rmdir()
        raise


@contextlib.contextmanager
def new_folder(folder):
    """Yield a temporary folder beside ``folder`` (which must be absent or empty); when the block ends
    without an error, it becomes ``folder``, in one rename. On an error it is removed."""
    folder = Path(folder)
    if folder.is_symlink() or folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"will not overwrite {folder}: it exists and is not an empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".{folder.name}.partial-{secrets.token_hex(4)}"
    temporary.mkdir()  # the user's usual permissions (a mkdtemp folder would be private)
    try:
        yield temporary
        if folder.exists():
            folder.rmdir()  # empty, checked above
        temporary.rename(folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
