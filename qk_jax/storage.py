"""Where runs write: a local folder or a bucket (``gs://``), one set of operations for both, through ``etils.epath``.

Everything the trainer writes outside Orbax (metrics, previews, config.json, the final model's config, reports)
goes through here, so ``--workdir gs://bucket/run`` works as a local folder does. A bucket differs in three ways
that callers must know about:

* no rename of a folder in one step: ``is_remote`` paths get their completeness marker written last instead (the
  model's ``config.json``; ``saved_model.save_model``);
* no append: a log that grows line by line (``metrics.jsonl``, TensorBoard's events) is written to a local mirror
  (``local_mirror``) and copied up whole now and then (``MetricsWriter``);
* objects appear whole: a single write is atomic, so ``write_whole`` needs no temporary name there;
* readers that need local files (safetensors' mmap, a tokenizer, stage 0's exports) get a copy (``fetch_tree``).

Which library speaks to the bucket: epath's fsspec backend (``gcsfs``, the ``[gcs]`` extra) or TensorFlow's gfile
when TensorFlow is installed; Orbax uses tensorstore's own GCS driver. Both honour the usual credentials (ADC);
the tests point them at a local emulator (``STORAGE_EMULATOR_HOST``, ``TENSORSTORE_GCS_HTTP_URL``).

Written by hand because epath has the operations but not the rules above (absolute local paths, URIs kept as
they are, a local mirror for appends).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

from etils import epath

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """``gs://bucket/run`` (any ``scheme://``): not a local folder."""
    return bool(_URI.match(os.fspath(path)))


def is_absolute(path: str | os.PathLike) -> bool:
    """A URI or an absolute local path: not to be joined under a workdir."""
    return is_remote(path) or os.path.isabs(os.fspath(path))


def resolve(path: str | os.PathLike) -> str:
    """The path as every process and library should see it: a local path made absolute (Orbax refuses relative
    ones), a URI as given (``os.path.abspath('gs://b/r')`` would make a local folder named ``gs:``)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def path(p: str | os.PathLike) -> epath.Path:
    """``resolve(p)`` as an ``epath.Path`` (``/`` joins, ``exists()``, ``read_text()``, ``rmtree()``, ...)."""
    return epath.Path(resolve(p))


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` as a string, for local paths and URIs alike."""
    return os.fspath(path(base).joinpath(*parts))


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def makedirs(p: str | os.PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def rmtree(p: str | os.PathLike) -> None:
    """Remove a folder and everything in it; nothing when it is absent."""
    folder = path(p)
    if folder.exists():
        folder.rmtree()


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def read_bytes(p: str | os.PathLike) -> bytes:
    return path(p).read_bytes()


def write_whole(p: str | os.PathLike, data: str | bytes, *, sync: bool = False) -> None:
    """``data`` written whole at ``p``: a reader or a crash never sees half a file. Locally written beside it
    (under a name of this process's, so that two processes writing one file do not mix), then renamed over it;
    ``sync``: on the disk before the rename, so that a power loss leaves the old file or the new one. In a bucket
    an object appears only once its upload is complete. The parent folder is made when missing."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)
        return
    partial = os.path.join(str(target.parent), f"{target.name}.tmp{os.getpid()}")
    with open(partial, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(partial, str(target))


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """One file from anywhere to anywhere (local to bucket, bucket to local, ...), parents made."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path(source).copy(target, overwrite=True)


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a file or folder; locally one step (``os.replace``), in a bucket a copy and a delete per object."""
    if is_remote(source) or is_remote(target):
        path(source).rename(path(target))
    else:
        os.replace(resolve(source), resolve(target))


def files_under(folder: str | os.PathLike) -> list[str]:
    """Every file below ``folder``, as paths relative to it, sorted (one listing per folder in a bucket)."""
    root = path(folder)
    found: list[str] = []

    def visit(directory: epath.Path, prefix: str) -> None:
        for child in directory.iterdir():
            if child.is_dir():
                visit(child, f"{prefix}{child.name}/")
            else:
                found.append(prefix + child.name)

    visit(root, "")
    return sorted(found)


def copy_tree(source: str | os.PathLike, target: str | os.PathLike, *, last: str | None = None) -> None:
    """Every file under ``source`` to the same place under ``target`` (host to bucket or back); ``last``, a file
    at the top of ``source``, goes after all the others: the marker a reader takes as "complete"."""
    names = files_under(source)
    for name in sorted(names, key=lambda n: n == last):
        copy_file(join(source, name), join(target, name))


def fetch_tree(p: str | os.PathLike) -> str:
    """A local folder with the files of ``p``: ``p`` itself when local, else a fresh copy in ``local_mirror(p)``
    (for readers that need local files: safetensors' mmap, the tokenizer)."""
    if not is_remote(p):
        return resolve(p)
    local = local_mirror(p)
    copy_tree(p, local)
    return local


def local_mirror(p: str | os.PathLike) -> str:
    """A local folder that stands in for a bucket folder ``p`` (for logs appended line by line); ``p`` itself
    when it is local. Under ``$QK_JAX_MIRROR`` or the system's temporary folder, named after ``p``."""
    if not is_remote(p):
        return resolve(p)
    uri = resolve(p)
    root = os.environ.get("QK_JAX_MIRROR") or os.path.join(tempfile.gettempdir(), "qk_jax_mirror")
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri)[-80:]
    folder = os.path.join(root, f"{readable}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}")
    os.makedirs(folder, exist_ok=True)
    return folder


def local_cache_dir(name: str) -> str:
    """``$XDG_CACHE_HOME/qk_jax/<name>`` (``~/.cache/qk_jax/<name>``): what a bucket workdir keeps on the host."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "qk_jax", name)
