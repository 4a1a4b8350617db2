r"""The training record shared by every task, its JSONL manifests and ArrayRecord shards.

A record (one JSON object per line of a ``.jsonl`` manifest)::

  {"id": "shapes-train-0000012",                 # optional; default "<manifest file>:<line number>"
   "task": "subject_edit",                       # one of TASKS
   "prompt": "add the subject from <image 2> at the top right of <image 1>",
   "target": "images/0000012.png",               # the image to generate
   "inputs": [{"path": "images/0000012_in1.png", "role": "source"},
              {"path": "subjects/circle_stripes_red_blue.png", "role": "reference"}],
   "negative_prompt": "",                        # optional, for the sampler
   "meta": {...}}                                # optional, free-form (ShapesWorld: the scenes)

- ``role``: ``vlm`` (the VLM sees it, nothing else: reconstruction, transformation), ``source`` (editing:
  pixel fidelity, negative sRoPE quadrant; at most one) or ``reference`` (a subject's identity, shifted sRoPE;
  at most ``max_references``). The VLM sees every input; from stage 3 on the VAE also encodes sources and
  references (``qk_jax.data.pipeline`` routes them).
- Interleaved instructions: ``<image k>`` (1-based) in the prompt is where input k sits (Qwen2.5-VL's native
  image-text interleaving, "put <image 1> next to <image 2>"). Inputs the prompt does not place come first, in
  order; each input may be placed at most once.
- Paths are relative to the dataset root (default: the manifest's folder) and may not leave it: absolute paths
  and ``..`` that climbs out are refused when the manifest is read, and symlinks that point outside are refused
  when the file is opened.
- Which roles a task takes, and how many: ``qk_jax.data.tasks`` (the task vocabulary).

Bad rows never stop a run. ``JsonlManifest`` reads and validates every line once, keeps the good ones and
counts the bad ones per kind (``problems``; the first message of each kind in ``examples``, naming the record
and the field). Problems that only show when the images are read (``missing_file``, ``corrupt_image``,
``empty_image``, ``too_large``, ``unsafe_path``) are found by the pipeline, which counts them the same way.

Large runs: ArrayRecord shards hold each record with its encoded images, so a worker reads one record with one
random access and no file-system round trips::

  python -m qk_jax.data.manifest_tool --to-arrayrecord data/train.jsonl --out /data/train_ar [--records-per-shard 10000]
  python -m qk_jax.data.manifest_tool --validate data/train.jsonl   # counts per problem kind, first examples

The converter streams the records into ``records-00000.array_record``, ``records-00001...`` and writes
``index.json`` (shard names, the contiguous range of record numbers of each task, what was skipped). Records are
grouped by task so that a task's records are one range. One ArrayRecord record is
``MAGIC | uint32 header length (little endian) | header JSON | image bytes``: the header is the JSONL record with
each image path replaced by ``{"blob": i}`` plus ``"blobs": [length_0, length_1, ...]``, the images' bytes
following the header in that order. No pickle: a shard is data, not code. ``open_manifest(path)`` opens either kind.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import posixpath
import re
import stat
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from qk_jax.data import tasks as tasks_lib
from qk_jax.data.tasks import ROLES, TASKS

# Kinds of bad records, as counted by manifests and the pipeline.
BAD_KINDS = ("unparsable", "invalid", "unknown_task", "too_many_references", "unsafe_path", "missing_file",
             "empty_image", "corrupt_image", "too_large", "too_long")
_FIELDS = {"id", "task", "prompt", "target", "inputs", "negative_prompt", "meta"}
PLACEHOLDER = re.compile(r"<image (\d+)>")
MAGIC = b"QKREC1\n"
log = logging.getLogger("qk_jax.data")


class RecordError(ValueError):
    """A bad record: ``kind`` (one of ``BAD_KINDS``), the record's id and the field at fault."""

    def __init__(self, kind: str, record_id: str, field: str, message: str):
        self.kind, self.record_id, self.field = kind, record_id, field
        super().__init__(f"record {record_id!r}, field {field!r}: {message} [{kind}]")


# A record is one JSON line of at most MAX_LINE_CHARS characters, nested at most MAX_JSON_DEPTH deep (a record
# is a few levels deep; ShapesWorld's meta about six); longer or deeper lines are ``unparsable``, not a crash.
MAX_LINE_CHARS = 2**20
MAX_JSON_DEPTH = 32


def parse_json(text: str, record_id: str, field: str) -> Any:
    """One record's JSON, within ``MAX_LINE_CHARS`` and ``MAX_JSON_DEPTH``; anything else is ``RecordError``."""
    if len(text) > MAX_LINE_CHARS:
        raise RecordError("unparsable", record_id, field, f"{len(text):,} characters, over the {MAX_LINE_CHARS:,} "
                          "limit (qk_jax.data.manifest.MAX_LINE_CHARS)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError("unparsable", record_id, field, f"not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise RecordError("unparsable", record_id, field, f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RecordError("unparsable", record_id, field, f"nested deeper than {MAX_JSON_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return obj


def _bounded_lines(f) -> Any:
    """``(number, line)`` of a text file, each line cut to ``MAX_LINE_CHARS + 1`` characters (the rest of an
    overlong line is skipped unread into memory; ``parse_json`` then refuses it)."""
    number = 0
    while True:
        line = f.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
            while (rest := f.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
        yield number, line
        number += 1


# The largest encoded image a record may have: a file above it is ``too_large`` before a byte of it is read.
# 64 MiB holds a 4096^2 PNG of noise; raise it here for larger sources.
MAX_IMAGE_BYTES = 64 * 2**20


def read_file(path: str, record_id: str, field: str) -> bytes:
    """The bytes of the regular file at ``path``, at most ``MAX_IMAGE_BYTES`` of them; anything else (missing,
    a FIFO or device that would block or never end, a folder, a file over the limit) raises ``RecordError``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
    except OSError as e:
        raise RecordError("missing_file", record_id, field, f"cannot read {path}: {e.strerror or e}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise RecordError("missing_file", record_id, field, f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_IMAGE_BYTES:
            raise RecordError("too_large", record_id, field, f"{path} is {info.st_size:,} bytes, over the "
                              f"{MAX_IMAGE_BYTES}-byte limit (qk_jax.data.manifest.MAX_IMAGE_BYTES)")
        try:
            return f.read(MAX_IMAGE_BYTES + 1)[:MAX_IMAGE_BYTES]
        except OSError as e:
            raise RecordError("missing_file", record_id, field, f"cannot read {path}: {e.strerror or e}") from None


@dataclasses.dataclass(frozen=True)
class InputImage:
    """An input image: a path relative to the dataset root, or the encoded bytes (ArrayRecord)."""

    image: str | bytes
    role: str


@dataclasses.dataclass(frozen=True)
class Record:
    """One training sample; images are not decoded (``read`` gives their encoded bytes)."""

    id: str
    task: str
    prompt: str
    target: str | bytes
    inputs: tuple[InputImage, ...] = ()
    negative_prompt: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    index: int = -1  # the record's position in its manifest (JSONL: 0-based line number)
    root: str | None = None  # where relative paths start

    def read(self, image: str | bytes, field: str = "target") -> bytes:
        """The encoded bytes of ``image`` (``self.target`` or an input's ``image``); raises ``RecordError``."""
        if isinstance(image, bytes):
            return image
        if self.root is None:
            raise RecordError("invalid", self.id, field, "a path but no dataset root to read it from")
        root = os.path.realpath(self.root)
        path = os.path.realpath(os.path.join(root, image))
        if os.path.commonpath([root, path]) != root:
            raise RecordError("unsafe_path", self.id, field, f"{image!r} resolves outside the dataset root {root}")
        return read_file(path, self.id, field)

    def segments(self) -> list[str | int]:
        """The prompt as text pieces and 0-based input indices, unplaced inputs first.

        ``"put <image 2> left of <image 1>"`` with 2 inputs -> ``["put ", 1, " left of ", 0]``.
        """
        return prompt_segments(self.prompt, len(self.inputs))

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(inp.role for inp in self.inputs)


def prompt_segments(prompt: str, num_images: int) -> list[str | int]:
    """Splits a prompt at ``<image k>`` into text and 0-based image indices; unplaced images come first."""
    pieces: list[str | int] = []
    placed = set()
    pos = 0
    for match in PLACEHOLDER.finditer(prompt):
        k = int(match.group(1)) - 1
        if not 0 <= k < num_images or k in placed:
            raise ValueError(f"<image {k + 1}> in {prompt!r}: there are {num_images} inputs, each placed once")
        placed.add(k)
        if match.start() > pos:
            pieces.append(prompt[pos : match.start()])
        pieces.append(k)
        pos = match.end()
    if pos < len(prompt):
        pieces.append(prompt[pos:])
    return [k for k in range(num_images) if k not in placed] + pieces


def safe_relative_path(path: Any, record_id: str, field: str) -> str:
    """``path`` normalised, if it is a relative path that stays inside the root; else ``RecordError``."""
    if not isinstance(path, str) or not path:
        raise RecordError("invalid", record_id, field, f"expected a non-empty relative path, got {path!r}")
    if "\x00" in path:
        raise RecordError("unsafe_path", record_id, field, "path contains a NUL byte")
    posix = path.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise RecordError("unsafe_path", record_id, field, f"{path!r} is absolute; give it relative to the root")
    norm = posixpath.normpath(posix)
    if norm == ".." or norm.startswith("../"):
        raise RecordError("unsafe_path", record_id, field, f"{path!r} climbs out of the dataset root")
    return norm


def parse_record(obj: Any, *, record_id: str, index: int = -1, root: str | None = None,
                 max_references: int | None = None, blobs: Sequence[bytes] | None = None) -> Record:
    """Validates one decoded JSON record and builds a ``Record``; raises ``RecordError`` naming the field.

    Args:
      obj: the decoded JSON object.
      record_id: the id to use when ``obj`` has none (``"train.jsonl:12"``).
      index: the record's position in its manifest.
      root: the dataset root that relative paths start from.
      max_references: the most ``reference`` inputs allowed (``config.max_references``); None: any number.
      blobs: for ArrayRecord records, the embedded images that ``{"blob": i}`` refers to.
    """
    if not isinstance(obj, dict):
        raise RecordError("unparsable", record_id, "<record>", f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", record_id)
    if not isinstance(rid, str) or not rid:
        raise RecordError("invalid", record_id, "id", f"expected a non-empty string, got {rid!r}")
    unknown = set(obj) - _FIELDS
    if unknown:
        raise RecordError("invalid", rid, sorted(unknown)[0],
                          f"unknown field; a record has {', '.join(sorted(_FIELDS))}")
    task = obj.get("task")
    if task not in TASKS:
        raise RecordError("unknown_task", rid, "task", f"{task!r} is not one of {', '.join(TASKS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise RecordError("invalid", rid, "prompt", f"expected a string, got {prompt!r}")
    negative = obj.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise RecordError("invalid", rid, "negative_prompt", f"expected a string, got {negative!r}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise RecordError("invalid", rid, "meta", f"expected an object, got {type(meta).__name__}")

    def image(value: Any, field: str) -> str | bytes:
        if blobs is None:
            return safe_relative_path(value, rid, field)
        if not (isinstance(value, dict) and isinstance(value.get("blob"), int) and 0 <= value["blob"] < len(blobs)):
            raise RecordError("invalid", rid, field, f"expected {{'blob': i}} with i < {len(blobs)}, got {value!r}")
        return blobs[value["blob"]]

    if "target" not in obj:
        raise RecordError("invalid", rid, "target", "missing: every record needs the image to generate")
    target = image(obj["target"], "target")
    raw_inputs = obj.get("inputs", [])
    if not isinstance(raw_inputs, list):
        raise RecordError("invalid", rid, "inputs", f"expected a list, got {type(raw_inputs).__name__}")
    inputs = []
    for k, inp in enumerate(raw_inputs):
        field = f"inputs[{k}]"
        if not isinstance(inp, dict) or set(inp) != {"path", "role"}:
            raise RecordError("invalid", rid, field, f"expected {{'path': ..., 'role': ...}}, got {inp!r}")
        if inp["role"] not in ROLES:
            raise RecordError("invalid", rid, f"{field}.role", f"{inp['role']!r} is not one of {', '.join(ROLES)}")
        inputs.append(InputImage(image(inp["path"], f"{field}.path"), inp["role"]))
    counts = collections.Counter(inp.role for inp in inputs)
    if max_references is not None and counts["reference"] > max_references:
        raise RecordError("too_many_references", rid, "inputs",
                          f"{counts['reference']} references but max_references={max_references}; drop some or "
                          "raise config.max_references")
    try:
        tasks_lib.check_inputs(task, counts)
    except ValueError as e:
        raise RecordError("invalid", rid, "inputs", str(e)) from None
    try:
        prompt_segments(prompt, len(inputs))
    except ValueError as e:
        raise RecordError("invalid", rid, "prompt", str(e)) from None
    return Record(id=rid, task=task, prompt=prompt, target=target, inputs=tuple(inputs), negative_prompt=negative,
                  meta=meta, index=index, root=root)


class Manifest(Protocol):
    """What the pipeline reads: random access to good records, each one's task, and the load-time problems."""

    problems: collections.Counter
    examples: dict[str, str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Record: ...

    def tasks(self) -> list[str]:
        """The task of every record, in order."""
        ...


class JsonlManifest:
    """A JSONL manifest, read and validated once; bad rows are counted per kind and left out.

    Args:
      path: the ``.jsonl`` file.
      root: where relative paths start (default: the manifest's folder).
      max_references: the most ``reference`` inputs a record may have (``config.max_references``).
    """

    def __init__(self, path: str, *, root: str | None = None, max_references: int | None = None):
        self.path = path
        self.root = os.path.abspath(root if root is not None else os.path.dirname(os.path.abspath(path)))
        self.max_references = max_references
        self.problems: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}
        self._lines: list[str] = []
        self._line_numbers: list[int] = []
        self._tasks: list[str] = []
        name = os.path.basename(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in _bounded_lines(f):
                if not line.strip():
                    continue
                try:
                    record = self._parse(line, number, name)
                except RecordError as e:
                    self._count(e)
                    continue
                self._lines.append(line)
                self._line_numbers.append(number)
                self._tasks.append(record.task)

    def _parse(self, line: str, number: int, name: str) -> Record:
        default_id = f"{name}:{number + 1}"
        obj = parse_json(line, default_id, "<line>")
        return parse_record(obj, record_id=default_id, index=number, root=self.root,
                            max_references=self.max_references)

    def _count(self, error: RecordError) -> None:
        self.problems[error.kind] += 1
        if error.kind not in self.examples:
            self.examples[error.kind] = str(error)
            log.warning("skipping bad record (first of kind %s in %s): %s", error.kind, self.path, error)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> Record:
        return self._parse(self._lines[i], self._line_numbers[i], os.path.basename(self.path))

    def tasks(self) -> list[str]:
        return list(self._tasks)


# ----------------------------------------------------------------------------------------------------------
# ArrayRecord
# ----------------------------------------------------------------------------------------------------------


def encode_record(record: Record) -> bytes:
    """A record with its images embedded, in the ArrayRecord layout of the module docstring."""
    blobs: list[bytes] = []
    where: dict[str | bytes, int] = {}  # an image used twice (recon: input == target) is stored once

    def blob(image: str | bytes, field: str) -> dict:
        if image not in where:
            where[image] = len(blobs)
            blobs.append(record.read(image, field))
        return {"blob": where[image]}

    header = dict(id=record.id, task=record.task, prompt=record.prompt, target=blob(record.target, "target"),
                  inputs=[dict(path=blob(inp.image, f"inputs[{k}].path"), role=inp.role)
                          for k, inp in enumerate(record.inputs)],
                  negative_prompt=record.negative_prompt, meta=dict(record.meta))
    head = json.dumps(dict(header, blobs=[len(b) for b in blobs]), sort_keys=True).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *blobs])


def decode_record(data: bytes, *, index: int = -1, max_references: int | None = None) -> Record:
    """Inverse of ``encode_record``; a malformed record raises ``RecordError`` (kind ``unparsable``)."""
    rid = f"arrayrecord:{index}"
    start = len(MAGIC) + 4
    if len(data) < start or not data.startswith(MAGIC):
        raise RecordError("unparsable", rid, "<record>", "not a qk_jax ArrayRecord record (bad magic)")
    (head_len,) = struct.unpack("<I", data[len(MAGIC) : start])
    try:
        header = parse_json(data[start : start + head_len].decode("utf-8"), rid, "<header>")
        lengths = [int(n) for n in header.pop("blobs")]
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RecordError("unparsable", rid, "<header>", f"bad header: {e}") from None
    pos, blobs = start + head_len, []
    for n in lengths:
        blobs.append(bytes(data[pos : pos + n]))
        pos += n
    if pos != len(data):
        raise RecordError("unparsable", rid, "<record>", f"blob lengths add up to {pos} bytes, record has {len(data)}")
    return parse_record(header, record_id=rid, index=index, max_references=max_references, blobs=blobs)


class ArrayRecordManifest:
    """ArrayRecord shards written by ``to_arrayrecord``: records with their images, grouped by task."""

    def __init__(self, folder: str, *, max_references: int | None = None):
        index_path = os.path.join(folder, "index.json")
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{index_path} not found: write shards with "
                                    "`python -m qk_jax.data.manifest_tool --to-arrayrecord MANIFEST --out DIR`")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        self.folder = folder
        self.max_references = max_references
        self.problems = collections.Counter()  # the converter's skips are in index["skipped"]
        self.examples: dict[str, str] = {}
        self._source = None  # opened lazily: ArrayRecord readers are opened in the process that reads

    def _reader(self):
        if self._source is None:
            import grain

            paths = [os.path.join(self.folder, name) for name in self.index["shards"]]
            self._source = grain.sources.ArrayRecordDataSource(paths)
        return self._source

    def __getstate__(self):
        return dict(self.__dict__, _source=None)

    def __len__(self) -> int:
        return int(self.index["num_records"])

    def __getitem__(self, i: int) -> Record:
        return decode_record(self._reader()[i], index=i, max_references=self.max_references)

    def tasks(self) -> list[str]:
        out = [""] * len(self)
        for task, (start, stop) in self.index["tasks"].items():
            out[start:stop] = [task] * (stop - start)
        return out


def open_manifest(path: str, *, max_references: int | None = None) -> JsonlManifest | ArrayRecordManifest:
    """A ``.jsonl`` manifest or a folder of ArrayRecord shards with its ``index.json``."""
    if os.path.isdir(path):
        return ArrayRecordManifest(path, max_references=max_references)
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest {path} not found (expected a .jsonl file or an ArrayRecord folder)")
    return JsonlManifest(path, max_references=max_references)


def to_arrayrecord(manifest_path: str, out_dir: str, *, records_per_shard: int = 10_000,
                   max_references: int | None = None) -> dict:
    """Converts a JSONL manifest into ArrayRecord shards plus ``index.json``; returns the index.

    Bad rows are skipped and counted as the pipeline would (``index["skipped"]``); a record whose image file
    cannot be read is skipped too (``missing_file``/``unsafe_path``). Image bytes are copied, not decoded:
    a corrupt image is found, counted and skipped by the pipeline when it decodes it.
    """
    from array_record.python import array_record_module

    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    manifest = JsonlManifest(manifest_path, max_references=max_references)
    skipped = collections.Counter(manifest.problems)
    examples = dict(manifest.examples)
    by_task: dict[str, list[int]] = {task: [] for task in TASKS}
    for i, task in enumerate(manifest.tasks()):
        by_task[task].append(i)
    os.makedirs(out_dir, exist_ok=True)
    shards: list[str] = []
    writer, in_shard, ranges, written = None, 0, {}, 0
    for task in TASKS:  # streamed: one record in memory at a time
        start = written
        for i in by_task[task]:
            try:
                data = encode_record(manifest[i])
            except RecordError as e:
                skipped[e.kind] += 1
                examples.setdefault(e.kind, str(e))
                continue
            if writer is None or in_shard == records_per_shard:
                if writer is not None:
                    writer.close()
                shards.append(f"records-{len(shards):05d}.array_record")
                writer = array_record_module.ArrayRecordWriter(os.path.join(out_dir, shards[-1]), "group_size:1")
                in_shard = 0
            writer.write(data)
            in_shard += 1
            written += 1
        if written > start:
            ranges[task] = [start, written]
    if writer is not None:
        writer.close()
    index = dict(shards=shards, num_records=written, tasks=ranges, skipped=dict(skipped), examples=examples,
                 source=os.path.abspath(manifest_path))
    with open(os.path.join(out_dir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    return index

