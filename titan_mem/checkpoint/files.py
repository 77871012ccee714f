"""Writing checkpoint outputs atomically: `<out>.partial` / `<out>.tmp`, renamed into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

from titan_mem.checkpoint.dcp_index import single_process
from titan_mem.errors import ConvertError, check_writable, write_errors


def check_new_output(out: Path, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    check_writable(out)
    for src in inputs:
        if out.resolve() == src.resolve():
            raise ConvertError(out, "is also an input; write to a new path")
    if out.exists() and not overwrite:
        raise ConvertError(out, "already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def new_parents(out: Path) -> Iterator[None]:
    """Create the folders `out` needs; if the block fails, remove the ones created here (so a failed
    command leaves no empty folder behind), innermost first, stopping at one that is not empty."""
    created, folder = [], out.parent
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield `<out>.partial` to write into; it becomes `out` only if the block finishes (else neither it nor
    a folder made for it stays)."""
    check_new_output(out, overwrite, inputs)
    partial = out.with_name(out.name + ".partial")
    with new_parents(out):
        try:
            with write_errors(out, "writing"):
                remove_path(partial)  # a stale one from a killed run
                yield partial
            if out.exists():
                old = out.with_name(out.name + ".old")
                remove_path(old)
                os.replace(out, old)
                os.replace(partial, out)
                remove_path(old)
            else:
                os.replace(partial, out)
        except BaseException:
            remove_path(partial)
            raise


@contextlib.contextmanager
def atomic_file(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield `<out>.tmp` to write; it replaces `out` (atomically) only if the block finishes (else neither
    it nor a folder made for it stays)."""
    check_new_output(out, overwrite, inputs)
    if out.is_dir():
        raise ConvertError(out, "is a folder; expected a file path")
    tmp = out.with_name(out.name + ".tmp")
    with new_parents(out):
        try:
            with write_errors(out, "writing"):
                yield tmp
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, out)
        except BaseException:
            remove_path(tmp)
            raise


def remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def save_dcp(
    state: dict[str, Any],
    out: Path,
    overwrite: bool = False,
    inputs: tuple[Path, ...] = (),
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write `state` as a DCP folder in one process, atomically, with small text files beside it."""
    with atomic_dir(out, overwrite, inputs) as partial:
        with single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(partial)), no_dist=True)
        for name, text in (extra_files or {}).items():
            (partial / name).write_text(text)


def nbytes(tensors) -> int:
    """Bytes held by an iterable of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)
