r"""Write a training manifest and its images from a dataset in a public layout: an image folder, parquet / Arrow
(``datasets.save_to_disk``) tables or webdataset tar shards.

USAGE: python -m qk_jax.data.prepare --input PATH[,PATH...] --out DIR [--prompt-column text] [--target-column image]
         [--source-column COL] [--reference-columns COL[,COL...]] [--arrayrecord] [--workers N] [--limit N]

  python -m qk_jax.data.prepare --input data/pokemon --out data/pokemon_qk
  python -m qk_jax.data.prepare --input 'ip2p/data/*.parquet' --out data/ip2p_qk --source-column input_image \
      --prompt-column edit_prompt --target-column edited_image --arrayrecord

The formats, the output folder and the checks: ``qk_jax.data.ingest`` and docs/manifest.md.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Sequence

from absl import app, flags

from qk_jax import cli
from qk_jax.data import ingest, manifest
from qk_jax.data.ingest import ARRAYRECORD, FORMATS, IMAGES, MANIFEST, SUMMARY, Summary  # noqa: F401 -- the output's names

# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command's flags, on ``flag_values`` (``qk_jax.cli``)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_list("input", None, "The dataset: folders, files or globs, comma-separated, all of one format.", **fv)
    flags.DEFINE_enum("format", None, FORMATS, "The input's format (default: told from the paths).", **fv)
    flags.DEFINE_string("out", None, "The output folder (created): train.jsonl, images/, summary.json.", **fv)
    flags.DEFINE_string("prompt-column", "text", "The caption or instruction column (imagefolder: the"
                        " metadata.jsonl key; webdataset: the KEY.json field, when there is no KEY.txt).", **fv)
    flags.DEFINE_string("target-column", "image", "Parquet/Arrow: the column of the image to generate.", **fv)
    flags.DEFINE_string("source-column", None, "Parquet/Arrow: the source image column (editing).", **fv)
    flags.DEFINE_list("reference-columns", [], "Parquet/Arrow: reference image columns, comma-separated (a cell"
                      " may be a list of images): custom, multi, subject_edit with --source-column.", **fv)
    flags.DEFINE_string("image-root", None, "Where image paths in parquet/Arrow cells start (default: the table"
                        " file's folder); paths may not leave it.", **fv)
    flags.DEFINE_integer("max-references", None, "The most reference inputs a record may have"
                         " (config.max_references); default: any number.", lower_bound=0, **fv)
    flags.DEFINE_integer("max-image-pixels", None, "Refuse images over this many pixels, as too_large (the trainer's"
                         " config.data.max_image_pixels); default: Pillow's limit.", lower_bound=1, **fv)
    flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Threads checking images (0: none).",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("limit", None, "Read at most this many rows (to try a dataset out).", lower_bound=0, **fv)
    flags.DEFINE_integer("progress-every", 10_000, "A progress line every N rows (and every 10 s).", lower_bound=1,
                         **fv)
    flags.DEFINE_boolean("arrayrecord", False, "Also write ArrayRecord shards in OUT/arrayrecord.", **fv)
    flags.DEFINE_integer("records-per-shard", 10_000, "Records per shard, with --arrayrecord.", lower_bound=1, **fv)
    flags.DEFINE_boolean("overwrite", False, "Replace an OUT/train.jsonl already there (its images are reused).",
                         **fv)


def run_flags(fv: flags.FlagValues) -> Summary:
    """Prepares the dataset the flags name; prints and returns the summary."""
    if not fv.input or not fv.out:
        raise app.UsageError("give --input PATH (the dataset) and --out DIR (the manifest's folder)")
    columns = ingest.Columns(prompt=fv["prompt-column"].value, target=fv["target-column"].value,
                      source=fv["source-column"].value, references=tuple(fv["reference-columns"].value))
    try:
        return _run(fv, columns)
    except ingest.DatasetError as e:
        raise app.UsageError(str(e)) from None


def _run(fv: flags.FlagValues, columns: ingest.Columns) -> Summary:
    fmt, paths = ingest.resolve_inputs(fv.input, fv.format)
    if fmt in ("imagefolder", "webdataset"):
        given = [f"--{name}" for name in ("target-column", "source-column", "reference-columns", "image-root")
                 if fv[name].present]
        if given:
            raise app.UsageError(f"{', '.join(given)} go with parquet or Arrow tables; a {fmt} gives t2i records")
    out_dir = fv.out
    if os.path.exists(os.path.join(out_dir, MANIFEST)) and not fv.overwrite:
        raise app.UsageError(f"{out_dir} already holds {MANIFEST}; give --overwrite to replace it (its images are"
                             " reused) or another --out")
    rows = ingest.read_rows(fmt, paths, columns, fv["image-root"].value)
    first = next(rows, None)  # a missing column is a usage error before anything is written
    rows = itertools.chain([first] if first is not None else [], rows)
    max_references = fv["max-references"].value
    summary = ingest.write_manifest(rows, out_dir, max_pixels=fv["max-image-pixels"].value,
                                    max_references=max_references, workers=fv.workers,
                                    progress_every=fv["progress-every"].value, limit=fv.limit)
    lines = summary.lines()
    if fv.arrayrecord:
        shards, tmp = os.path.join(out_dir, ARRAYRECORD), os.path.join(out_dir, ARRAYRECORD + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        index = manifest.to_arrayrecord(summary.manifest, tmp, records_per_shard=fv["records-per-shard"].value,
                                        max_references=max_references)
        shutil.rmtree(shards, ignore_errors=True)
        os.replace(tmp, shards)  # complete or absent, as the manifest
        lines.append(f"{index['num_records']} records in {len(index['shards'])} ArrayRecord shards -> {shards}")
    print("\n".join(lines), flush=True)
    return summary


def main(argv: Sequence[str]) -> Summary:
    """``python -m qk_jax.data.prepare`` in-process: ``main(['--input', 'data/pokemon', '--out', 'data/qk'])``."""
    return cli.in_process("qk_jax.data.prepare", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
