"""File plumbing shared by configs, checkpoints and tokenizers: atomic writes, Hub resolution and the
pages of memory-mapped checkpoints."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["MappedPages", "advise_pages", "atomic_path", "atomic_write_text", "resolve_file", "iter_jsonl"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash or an exception leaves the old file (if any) untouched and removes the temporary.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    *,
    required: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str | None:
    """Find ``filename`` in a local directory or a Hugging Face Hub repository.

    A local directory is searched first. Anything else is taken as a Hub id and resolved through
    ``huggingface_hub``, which uses its cache and honours ``HF_HUB_OFFLINE``.
    Returns ``None`` when the repository exists but lacks the file, unless ``required``.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder or "", filename)
        if os.path.isfile(candidate):
            return candidate
        if required:
            raise OSError(f"{path} has no {filename}: is it a T5-family checkpoint directory?")
        return None
    if os.path.exists(path):
        raise OSError(f"{path} is a file; pass the directory that holds {filename}")
    return _hub_file(
        path,
        filename,
        required=required,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )


def _hub_file(repo_id: str, filename: str, *, required: bool, **kwargs: Any) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(repo_id, filename, **{k: v for k, v in kwargs.items() if v is not None})
    except HFValidationError as e:
        raise OSError(
            f"{repo_id!r} is neither a local directory nor a valid Hugging Face Hub id ({e})"
        ) from None
    except RepositoryNotFoundError:
        raise OSError(
            f"{repo_id!r} is not a local directory and no Hub repository of that name was found; check the "
            "spelling, or pass token=... for a private repository"
        ) from None
    except RevisionNotFoundError:
        raise OSError(f"Revision {kwargs.get('revision')!r} does not exist for {repo_id!r}") from None
    except GatedRepoError:
        raise OSError(f"{repo_id!r} is gated: accept its licence on the Hub and pass token=...") from None
    except LocalEntryNotFoundError:
        # Offline (HF_HUB_OFFLINE=1, local_files_only=True, or no network) and not in the cache.
        # The repository may still simply lack an optional file: only a required one is an error.
        if not required and _cached_repo_present(repo_id, kwargs):
            return None
        raise OSError(
            f"Cannot find {filename} for {repo_id!r}: it is not in the local Hugging Face cache and the Hub "
            "cannot be reached (offline mode or no network). Download it where there is a network "
            f"(`hf download {repo_id}`) and copy the cache, or pass a local directory."
        ) from None
    except EntryNotFoundError:
        if required:
            raise OSError(f"The Hub repository {repo_id!r} has no file {filename}") from None
        return None


def _cached_repo_present(repo_id: str, kwargs: dict[str, Any]) -> bool:
    """Whether some snapshot of ``repo_id`` is in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, "config.json", cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
    )
    return isinstance(found, str)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line of a JSON Lines file.

    Raises ``ValueError`` naming the line when it is not valid JSON or not a JSON object.
    """
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {n} is not a JSON object")
            yield n, record


class MappedPages:
    """Hands the pages of converted weights back to the kernel while a model is converted.

    from_pretrained leaves the weights in the checkpoint file's memory map. Reading a weight to
    convert it (to another dtype, a packed layout, int8) makes its pages resident, and they would
    stay so until the whole file is unmapped, so converting would briefly hold the checkpoint twice.
    After each conversion the old weight's whole pages are advised MADV_PAGEOUT (Linux 5.4+):
    reclaim, not discard, so a page something still uses is read back from the file on access.
    Embeddings that stay mapped can be advised MADV_RANDOM. Only mappings of files that existed when
    this object was made are touched (tensors elsewhere are left alone); off Linux this does nothing.
    """

    MADV_RANDOM, MADV_PAGEOUT = 1, 21

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):  # a file-backed mapping
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                self.ranges.append((lo, hi))

    def release(self, *tensors: torch.Tensor) -> None:
        """Reclaim the pages of converted weights."""
        for t in tensors:
            self._advise(t, self.MADV_PAGEOUT)

    def read_randomly(self, *tensors: torch.Tensor) -> None:
        """Advise that only single rows will be read (an embedding table): a page fault then reads
        in its own page, not the kernel's readahead window around it (on our benchmark's random
        token ids, 51 of t5-small's 63 MB embedding became resident, 9 MB without readahead)."""
        for t in tensors:
            self._advise(t, self.MADV_RANDOM)

    def _advise(self, t: torch.Tensor, advice: int) -> None:
        if t.device.type != "cpu":
            return
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if any(a <= lo and hi <= b for a, b in self.ranges):
            advise_pages(lo, hi - lo, advice)


MADV_DONTNEED = 4


def advise_pages(address: int, nbytes: int, advice: int) -> None:
    """``madvise`` the whole pages inside [address, address + nbytes); the partial pages at either
    end, which may hold other data (an allocator's bookkeeping, a neighbouring tensor), are left
    alone. No-op where the C library has no ``madvise`` (off Linux)."""
    madvise, page = _madvise()
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if madvise is not None and end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


@lru_cache(maxsize=None)
def _madvise() -> tuple[Any, int]:
    """The C library's ``madvise`` (None where absent) and the page size."""
    try:
        return ctypes.CDLL(None, use_errno=True).madvise, os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, TypeError, ValueError):
        return None, 4096
