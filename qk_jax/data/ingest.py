r"""Datasets in public layouts -> training manifests: the library of ``python -m qk_jax.data.prepare`` (and of
``manifest_tool --validate``'s image check, ``check_manifest``).

Inputs (``--format`` says which, default: told from the paths):

- ``imagefolder``: a folder with ``metadata.jsonl`` (the diffusers / Hugging Face convention), one JSON object a
  line with ``file_name`` (relative to the folder) and the caption in ``--prompt-column``: t2i records.
- ``parquet``: ``.parquet`` files, or folders holding them; ``arrow``: a ``datasets.save_to_disk`` folder
  (``data-*.arrow`` in Arrow's IPC stream format, ``state.json``) or ``.arrow`` files. Columns by flag: the
  prompt, the target image, optionally a source image and reference images. The task follows from the images a
  row has (``task_for``): none -> t2i, a source -> edit, one reference -> custom, several -> multi, a source and
  references -> subject_edit. An image cell is the ``datasets`` ``Image`` struct ``{"bytes", "path"}``, raw
  bytes, or a path relative to ``--image-root`` (default: the table's folder); a reference cell may be a list.
- ``webdataset``: ``.tar`` shards (or folders of them) of samples ``KEY.jpg|jpeg|png|webp`` with ``KEY.txt``, or
  ``KEY.json`` whose ``--prompt-column`` field is the caption: t2i records.

Output in ``--out``: ``train.jsonl`` (records of ``qk_jax.data.manifest``, paths relative to ``--out``; written to
a temporary file and renamed, so it exists only complete), ``images/ab/<hash>.<ext>`` (each distinct image once,
named by its content's hash; PNG, JPEG and WebP keep their original bytes, anything else is re-encoded to PNG as
the pipeline would decode it), ``summary.json`` (what the command prints) and, with ``--arrayrecord``, the shards
of ``manifest.to_arrayrecord`` in ``arrayrecord/``.

Every image is read and decoded once as the training pipeline does (``qk_jax.data.images``: Pillow's pixel limit
on, ``--max-image-pixels`` below it, ``manifest.MAX_IMAGE_BYTES``); a bad row is skipped and counted by its kind
(``manifest.BAD_KINDS``), its first message of each kind kept as the example.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
from PIL import Image

from qk_jax import storage
from qk_jax.data import images as images_lib
from qk_jax.data import manifest
from qk_jax.data.manifest import RecordError

class DatasetError(ValueError):
    """A dataset that cannot be read as asked (a missing column, an unknown layout): one line saying what to give."""


FORMATS = ("imagefolder", "parquet", "arrow", "webdataset")
MANIFEST = "train.jsonl"
SUMMARY = "summary.json"
IMAGES = "images"
ARRAYRECORD = "arrayrecord"
# The encodings kept byte for byte (Pillow's format name -> the file's extension); others are re-encoded to PNG.
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset: the key is the name up to the basename's dot


# ----------------------------------------------------------------------------------------------------------
# Rows: what each reader yields
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of an input dataset, not yet checked.

    ``prompt``: the caption or instruction cell (anything: checked when the row is prepared). ``images``:
    ``(role, field, cell)`` per image column, the target's role being ``"target"``; a cell is encoded bytes, a
    ``{"bytes", "path"}`` struct, a path relative to ``root``, or (a reference) a list of those. ``error``: a
    problem the reader found already (an unparsable line), reported as the row's kind.
    """

    id: str
    prompt: Any = None
    images: tuple[tuple[str, str, Any], ...] = ()
    root: str | None = None
    error: RecordError | None = None


@dataclasses.dataclass(frozen=True)
class Columns:
    """The table columns to read: the prompt, the target image, the optional source and reference images."""

    prompt: str = "text"
    target: str = "image"
    source: str | None = None
    references: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return [self.prompt, self.target] + [self.source] * bool(self.source) + list(self.references)

    def row(self, rid: str, cells: Mapping[str, Any], root: str) -> Row:
        images = [("target", self.target, cells[self.target])]
        if self.source:
            images.append(("source", self.source, cells[self.source]))
        images += [("reference", name, cells[name]) for name in self.references]
        return Row(rid, cells[self.prompt], tuple(images), root)


def _missing_columns(where: str, have: Sequence[str], want: Sequence[str]) -> None:
    missing = [name for name in want if name not in have]
    if missing:
        names = ", ".join(map(repr, missing))
        raise DatasetError(f"{where} has no column{'s' * (len(missing) > 1)} {names}; its columns are "
                             f"{', '.join(have)} (set --prompt-column, --target-column, --source-column, "
                             "--reference-columns)")


def read_imagefolder(folder: str, prompt_column: str = "text") -> Iterator[Row]:
    """The rows of ``folder/metadata.jsonl``: ``file_name`` relative to ``folder`` and the caption column.
    The first object decides: a column missing there is a usage error; missing further on, a bad row."""
    path = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(path):
        raise DatasetError(f"{folder} has no metadata.jsonl (an imagefolder's captions: one JSON object a line"
                             " with file_name and the caption)")
    checked = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in manifest._bounded_lines(f):  # each line bounded in length, as a manifest's are
            if not line.strip():
                continue
            rid = f"metadata.jsonl:{number + 1}"
            try:
                obj = manifest.parse_json(line, rid, "<line>")
                if not isinstance(obj, dict):
                    raise RecordError("unparsable", rid, "<line>", f"expected a JSON object, got {type(obj).__name__}")
            except RecordError as e:
                yield Row(rid, error=e)
                continue
            if not checked:
                _missing_columns(f"{path} (first row)", list(obj), ["file_name", prompt_column])
                checked = True
            yield Row(rid, obj.get(prompt_column), (("target", "file_name", obj.get("file_name")),), folder)


def _table_rows(name: str, batches: Iterable[Any], columns: Columns, root: str) -> Iterator[Row]:
    number = 0
    for batch in batches:
        cells = {c: batch.column(c).to_pylist() for c in columns.names()}
        for i in range(batch.num_rows):
            yield columns.row(f"{name}:{number}", {c: v[i] for c, v in cells.items()}, root)
            number += 1


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 -- submodules used by the readers
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DatasetError("reading parquet or Arrow needs pyarrow: pip install pyarrow "
                             "(or pip install qk_jax[data])") from None
    return pyarrow


def read_parquet(paths: Sequence[str], columns: Columns, image_root: str | None = None,
                 batch_rows: int = 64) -> Iterator[Row]:
    """The rows of parquet files, streamed ``batch_rows`` at a time. Relative image paths start at
    ``image_root`` (default: each file's folder). Row ids are ``<file name>:<row number from 0>``."""
    pa = _pyarrow()
    for path in paths:
        table = pa.parquet.ParquetFile(path)
        _missing_columns(path, table.schema_arrow.names, columns.names())
        root = image_root or os.path.dirname(os.path.abspath(path))
        yield from _table_rows(os.path.basename(path), table.iter_batches(batch_size=batch_rows,
                                                                          columns=columns.names()), columns, root)


def arrow_files(folder: str) -> list[str]:
    """The ``.arrow`` files of a ``datasets.save_to_disk`` folder, in ``state.json``'s order when it has one."""
    if os.path.exists(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        raise DatasetError(f"{folder} is a DatasetDict; give one split's folder ({', '.join(splits)})")
    state = os.path.join(folder, "state.json")
    if os.path.exists(state):
        with open(state, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
        if names:
            return [os.path.join(folder, name) for name in names]
    return sorted(glob.glob(os.path.join(folder, "*.arrow")))


def read_arrow(paths: Sequence[str], columns: Columns, image_root: str | None = None) -> Iterator[Row]:
    """The rows of Arrow IPC files: the stream format ``datasets.save_to_disk`` writes, or the file format.
    Relative image paths start at ``image_root`` (default: each file's folder)."""
    pa = _pyarrow()
    for path in paths:
        source = pa.memory_map(path)
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                file_reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise DatasetError(f"{path} is not an Arrow IPC stream or file: {e}") from None
            reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            _missing_columns(path, file_reader.schema.names, columns.names())
        else:
            _missing_columns(path, reader.schema.names, columns.names())
        root = image_root or os.path.dirname(os.path.abspath(path))
        yield from _table_rows(os.path.basename(path), reader, columns, root)


def read_webdataset(paths: Sequence[str], prompt_column: str = "text") -> Iterator[Row]:
    """The samples of webdataset tar shards, read as a stream (``tarfile``, nothing extracted): per key the first
    image member and the caption (``KEY.txt``, else ``KEY.json[prompt_column]``). A damaged shard ends with one
    ``unparsable`` row; the next shard is read."""
    for path in paths:
        shard = os.path.basename(path)
        key, members = None, {}
        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    match = _WDS_KEY.match(member.name.removeprefix("./"))
                    if not member.isfile() or not match:
                        continue
                    name, ext = match.group(1), match.group(2).lower()
                    if name != key:
                        if key is not None:
                            yield _wds_row(shard, key, members, prompt_column)
                        key, members = name, {}
                    members.setdefault(ext, _wds_member(tar, member, ext))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            key = None  # the samples before the damage are kept; the one it cut is not
            rid = f"{shard}:<tar>"
            yield Row(rid, error=RecordError("unparsable", rid, path, f"damaged tar: {e}"))
        if key is not None:
            yield _wds_row(shard, key, members, prompt_column)


def _wds_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str) -> bytes | tuple[str, str]:
    """A member's bytes, or ``(kind, why)`` for one over its limit (skipped unread: a stream skips it)."""
    if ext not in WDS_IMAGE_EXTS + ("txt", "json"):
        return b""  # other members (a .cls, a mask) are not read
    limit = manifest.MAX_IMAGE_BYTES if ext in WDS_IMAGE_EXTS else manifest.MAX_LINE_CHARS
    if member.size > limit:
        return ("too_large" if ext in WDS_IMAGE_EXTS else "unparsable",
                f"{member.size:,} bytes, over the {limit:,}-byte limit")
    return tar.extractfile(member).read()


def _wds_row(shard: str, key: str, members: Mapping[str, bytes | tuple[str, str]], prompt_column: str) -> Row:
    rid = f"{shard}:{key}"
    found = [ext for ext in members if ext in WDS_IMAGE_EXTS]
    for ext in found[:1] + ["txt", "json"]:
        if isinstance(members.get(ext), tuple):
            kind, why = members[ext]
            return Row(rid, error=RecordError(kind, rid, f"{key}.{ext}", why))
    if not found:
        return Row(rid, error=RecordError("missing_file", rid, "image", f"no {'/'.join(WDS_IMAGE_EXTS)} member "
                                          f"for key {key!r} (members: {', '.join(sorted(members)) or 'none'})"))
    if "txt" in members:
        prompt = members["txt"].decode("utf-8", errors="replace")
    elif "json" in members:
        try:
            obj = manifest.parse_json(members["json"].decode("utf-8", errors="replace"), rid, f"{key}.json")
        except RecordError as e:
            return Row(rid, error=e)
        prompt = obj.get(prompt_column) if isinstance(obj, dict) else None
    else:
        prompt = None
    return Row(rid, prompt, (("target", f"{key}.{found[0]}", members[found[0]]),))


# ----------------------------------------------------------------------------------------------------------
# Checking and storing images
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """A checked image as it is stored: its path in the output folder and the bytes to write there."""

    path: str
    data: bytes
    reencoded: bool


def load_cell(cell: Any, root: str | None, record_id: str, field: str) -> bytes:
    """The encoded bytes of one image cell: bytes, a ``{"bytes", "path"}`` struct or a path relative to ``root``
    (read with the manifest's checks: it may not leave ``root``; a missing file is ``missing_file``)."""
    if isinstance(cell, dict):
        cell = cell["bytes"] if cell.get("bytes") is not None else cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if cell is None or (isinstance(cell, str) and not cell):
        raise RecordError("invalid", record_id, field, "no image (an empty cell)")
    if not isinstance(cell, str):
        raise RecordError("invalid", record_id, field, f"expected image bytes, a {{'bytes', 'path'}} struct or a "
                          f"path, got {type(cell).__name__}")
    path = manifest.safe_relative_path(cell, record_id, field)
    if root is None:
        raise RecordError("invalid", record_id, field, f"a path ({cell!r}) but no folder to read it from")
    return manifest.Record(id=record_id, task="t2i", prompt="", target=path, root=root).read(path, field)


def store_image(data: bytes, record_id: str, field: str, max_pixels: int | None = None,
                kept: dict[str, str] | None = None) -> StoredImage:
    """Checks ``data`` (``images.check_image``) and says where and what to store: the original bytes when Pillow
    read them as PNG, JPEG or WebP, else the decoded pixels as PNG. ``kept`` (hash -> path) remembers the images kept
    as they are, so that bytes seen before are not decoded again."""
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if kept is not None and digest in kept:
        return StoredImage(kept[digest], data, False)
    image, pixels = images_lib.check_image(data, record_id, field, max_pixels)
    ext = KEPT_FORMATS.get(image.format or "")
    if ext is None:  # re-encoded upright and RGB: what the pipeline makes of it
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return StoredImage(f"{IMAGES}/{digest[:2]}/{digest}.png", buffer.getvalue(), True)
    path = f"{IMAGES}/{digest[:2]}/{digest}.{ext}"
    if kept is not None:
        kept[digest] = path
    return StoredImage(path, data, False)


def task_for(sources: int, references: int) -> str:
    """The task of a record with these input images (``qk_jax.data.tasks``)."""
    if sources:
        return "subject_edit" if references else "edit"
    return {0: "t2i", 1: "custom"}.get(references, "multi")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A row that passed every check: its manifest record and the images to store."""

    record: dict
    images: tuple[StoredImage, ...]


def prepare_row(row: Row, *, max_pixels: int | None = None, max_references: int | None = None,
                kept: dict[str, str] | None = None) -> Prepared:
    """Checks one row (prompt, every image, the record's schema) and builds its record; raises ``RecordError``."""
    if row.error is not None:
        raise row.error
    prompt = row.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("invalid", row.id, "prompt", f"expected a non-empty caption or instruction, got {prompt!r}")
    stored: dict[str, list[StoredImage]] = collections.defaultdict(list)
    for role, field, cell in row.images:
        cells = cell if role == "reference" and isinstance(cell, (list, tuple)) else [cell]
        if not cells:
            raise RecordError("invalid", row.id, field, "no reference image (an empty list)")
        for k, one in enumerate(cells):
            where = f"{field}[{k}]" if len(cells) > 1 else field
            data = load_cell(one, row.root, row.id, where)
            stored[role].append(store_image(data, row.id, where, max_pixels, kept))
    if not stored["target"]:
        raise RecordError("invalid", row.id, "target", "no target image")
    inputs = [(s, role) for role in ("source", "reference") for s in stored[role]]
    record = dict(id=row.id, task=task_for(len(stored["source"]), len(stored["reference"])), prompt=prompt.strip(),
                  target=stored["target"][0].path)
    if inputs:
        record["inputs"] = [dict(path=s.path, role=role) for s, role in inputs]
    manifest.parse_record(record, record_id=row.id, max_references=max_references)  # the schema, as training reads it
    return Prepared(record, (stored["target"][0], *(s for s, _ in inputs)))


# ----------------------------------------------------------------------------------------------------------
# The writer
# ----------------------------------------------------------------------------------------------------------


class Progress:
    """A log line (absl, to stderr) every ``every`` items or ``seconds`` seconds, whichever comes first."""

    def __init__(self, what: str, every: int = 10_000, seconds: float = 10.0, unit: str = "rows",
                 clock: Callable[[], float] = time.monotonic, log: Callable[[str], Any] = logging.info):
        self.what, self.every, self.seconds, self.unit = what, max(int(every), 1), seconds, unit
        self.clock, self.log = clock, log
        self.start = self.last = clock()

    def update(self, done: int, detail: str = "") -> str | None:
        now = self.clock()
        if done % self.every and now - self.last < self.seconds:
            return None
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"{self.what}: {done:,} {self.unit}{', ' + detail if detail else ''}, {rate:,.1f} {self.unit}/s"
        self.log(line)
        return line


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 0) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` in the items' order, ``fn`` on ``workers`` threads (0: here). An exception ``fn``
    raises is returned as the result. Pillow releases the GIL while it decodes, so threads can use the cores."""

    def call(item):
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001 -- handed back to the caller, which knows what is a bad row
            return e

    if workers <= 0:
        for item in items:
            yield item, call(item)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(call, item)))
            if len(pending) >= 4 * workers:  # bounded: a few rows per thread in memory
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


@dataclasses.dataclass
class Summary:
    """What ``write_manifest`` did: rows read, records written per task, rows skipped per kind (with the first
    message of each kind), images stored (new files), reused (the same bytes stored before, by an earlier row or
    run) and re-encoded."""

    rows: int = 0
    records: int = 0
    tasks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    images_stored: int = 0
    images_reused: int = 0
    images_reencoded: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0
    manifest: str = ""

    def skip(self, error: RecordError) -> None:
        self.skipped[error.kind] += 1
        if error.kind not in self.examples:
            self.examples[error.kind] = str(error)
            logging.warning("skipping bad row (first of kind %s): %s", error.kind, error)

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), tasks=dict(self.tasks), skipped=dict(sorted(self.skipped.items())))

    def lines(self) -> list[str]:
        out = [f"{self.records} records of {self.rows} rows -> {self.manifest}: {dict(self.tasks)}",
               f"images: {self.images_stored} stored ({self.bytes_stored:,} bytes, {self.images_reencoded} re-encoded"
               f" to PNG), {self.images_reused} reused; {self.seconds:.1f} s"]
        out += [f"skipped {n} x {kind}, e.g. {self.examples[kind]}" for kind, n in sorted(self.skipped.items())]
        return out


def write_manifest(rows: Iterable[Row], out_dir: str, *, max_pixels: int | None = None,
                   max_references: int | None = None, workers: int = 0, progress_every: int = 10_000,
                   limit: int | None = None) -> Summary:
    """Checks and stores the rows' images in ``out_dir`` and writes ``out_dir/train.jsonl`` and ``summary.json``.

    Rows are checked on ``workers`` threads (``prepare_row``) and written in their order, so the same input gives
    the same files. The manifest is written to a temporary file and renamed when complete; an image file is
    written the same way, so an image already in ``out_dir`` (same hash: same bytes) is complete and reused.
    ``limit``: the most rows to read.
    """
    os.makedirs(out_dir, exist_ok=True)
    summary = Summary(manifest=os.path.join(out_dir, MANIFEST))
    start = time.monotonic()
    progress = Progress("prepare", every=progress_every)
    kept: dict[str, str] = {}
    tmp = summary.manifest + ".tmp"
    if limit is not None:
        rows = (row for i, row in zip(range(limit), rows))
    prepare = functools.partial(prepare_row, max_pixels=max_pixels, max_references=max_references, kept=kept)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            _write_rows(f, ordered_map(prepare, rows, workers), out_dir, summary, progress)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # no half manifest left behind, not even under its temporary name
        raise
    os.replace(tmp, summary.manifest)
    summary.seconds = round(time.monotonic() - start, 3)
    storage.write_whole(os.path.join(out_dir, SUMMARY), json.dumps(summary.to_json(), indent=1), sync=True)
    return summary


def _write_rows(f, results: Iterable[tuple[Row, Any]], out_dir: str, summary: Summary, progress: Progress) -> None:
    for _, result in results:
        summary.rows += 1
        if isinstance(result, RecordError):
            summary.skip(result)
        elif isinstance(result, Exception):
            raise result
        else:
            for image in result.images:
                if os.path.exists(os.path.join(out_dir, image.path)):  # written whole (renamed), so complete
                    summary.images_reused += 1
                else:
                    storage.write_whole(os.path.join(out_dir, image.path), image.data)
                    summary.images_stored += 1
                    summary.images_reencoded += image.reencoded
                    summary.bytes_stored += len(image.data)
            f.write(json.dumps(result.record, ensure_ascii=False) + "\n")
            summary.records += 1
            summary.tasks[result.record["task"]] += 1
        progress.update(summary.rows, f"{summary.records:,} records, {sum(summary.skipped.values()):,} skipped")
    f.flush()
    os.fsync(f.fileno())


@dataclasses.dataclass
class Checked:
    """What ``check_manifest`` found: the good records per task, the bad ones per kind (the manifest's load-time
    problems plus those its images have), the first message of each kind."""

    tasks: collections.Counter
    problems: collections.Counter
    examples: dict


def check_manifest(m: manifest.Manifest, *, max_pixels: int | None = None, workers: int = 0,
                   progress_every: int = 10_000) -> Checked:
    """Reads every image of every good record of ``m`` and decodes it as the pipeline does (``images.check_image``): a
    record is good when all of them are (the first bad image gives its kind). An image path seen before is not
    decoded again."""
    decoded: set[str] = set()  # paths that decoded; a path is one file for the whole check

    def check(i: int) -> str:
        record = m[i]
        images = [("target", record.target)] + [(f"inputs[{k}].path", inp.image) for k, inp in enumerate(record.inputs)]
        for field, image in images:
            if isinstance(image, str) and image in decoded:
                continue
            images_lib.check_image(record.read(image, field), record.id, field, max_pixels)
            if isinstance(image, str):
                decoded.add(image)
        return record.task

    problems = collections.Counter(m.problems)
    examples = dict(m.examples)
    tasks: collections.Counter = collections.Counter()
    progress = Progress("validate", every=progress_every, unit="records")
    for done, (_, result) in enumerate(ordered_map(check, range(len(m)), workers), start=1):
        if isinstance(result, RecordError):
            problems[result.kind] += 1
            examples.setdefault(result.kind, str(result))
        elif isinstance(result, Exception):
            raise result
        else:
            tasks[result] += 1
        progress.update(done, f"{sum(tasks.values()):,} good")
    return Checked(tasks, problems, examples)


# ----------------------------------------------------------------------------------------------------------
# Inputs: which files, in which format
# ----------------------------------------------------------------------------------------------------------


def _expand(paths: Sequence[str]) -> list[str]:
    out = []
    for path in paths:
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches or not all(os.path.exists(p) for p in matches):
            raise DatasetError(f"--input {path}: no such file or folder")
        out += matches
    return out


def _format_of(path: str) -> str:
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if "metadata.jsonl" in names:
            return "imagefolder"
        if names & {"state.json", "dataset_info.json", "dataset_dict.json"} or any(n.endswith(".arrow") for n in names):
            return "arrow"
        if glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
            return "parquet"
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        raise DatasetError(f"--input {path}: no metadata.jsonl, .parquet, .arrow or .tar files in it; give --format")
    for fmt, ends in (("parquet", ".parquet"), ("arrow", ".arrow"), ("webdataset", ".tar")):
        if path.endswith(ends):
            return fmt
    if os.path.basename(path) == "metadata.jsonl":
        return "imagefolder"
    raise DatasetError(f"--input {path}: cannot tell its format from the name; give --format ({', '.join(FORMATS)})")


def resolve_inputs(paths: Sequence[str], fmt: str | None = None) -> tuple[str, list[str]]:
    """``(format, paths)`` for the reader: the format given or told from the paths (all one format), folders
    expanded into their files (an imagefolder stays its folder)."""
    paths = _expand(paths)
    formats = {fmt or _format_of(p) for p in paths}
    if len(formats) != 1:
        raise DatasetError(f"--input mixes formats {sorted(formats)}; prepare one format at a time")
    fmt = formats.pop()
    files = []
    for path in paths:
        if fmt == "imagefolder":
            files.append(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        elif not os.path.isdir(path):
            files.append(path)
        elif fmt == "arrow":
            files += arrow_files(path)
        elif fmt == "parquet":
            files += sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        else:
            files += sorted(glob.glob(os.path.join(path, "*.tar")))
    if not files:
        raise DatasetError(f"--input {', '.join(paths)}: no {fmt} files found")
    return fmt, files


def read_rows(fmt: str, paths: Sequence[str], columns: Columns, image_root: str | None = None) -> Iterator[Row]:
    """The rows of ``paths`` in format ``fmt`` (one of ``FORMATS``), by its reader."""
    if fmt == "imagefolder":
        return (row for folder in paths for row in read_imagefolder(folder, columns.prompt))
    if fmt == "webdataset":
        return read_webdataset(paths, columns.prompt)
    reader = read_parquet if fmt == "parquet" else read_arrow
    return reader(paths, columns, image_root)
