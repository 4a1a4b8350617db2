r"""Check a manifest (counts per problem kind), or convert a JSONL manifest into ArrayRecord shards.

USAGE: python -m qk_jax.data.manifest_tool --validate FILE | --to-arrayrecord FILE --out DIR [--records-per-shard N]

  python -m qk_jax.data.manifest_tool --validate data/train.jsonl --max-image-pixels 16777216
  python -m qk_jax.data.manifest_tool --to-arrayrecord data/train.jsonl --out /data/train_ar --records-per-shard 10000

``--validate`` checks every record as the trainer reads it and every image of every good record: it must exist,
stay inside the dataset root and decode (``qk_jax.data.ingest.check_manifest``), else the record is counted under
its kind (``missing_file``, ``corrupt_image``, ...). The record, the checks and the shard layout:
``qk_jax.data.manifest``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from absl import app, flags

from qk_jax import cli
from qk_jax.data import ingest, manifest

CHOOSE = "give --validate MANIFEST, or --to-arrayrecord MANIFEST --out DIR"


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command's flags, on ``flag_values`` (``qk_jax.cli``)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("validate", None, "Read this manifest (a .jsonl file or an ArrayRecord folder) and print its"
                        " good records per task and its problems per kind.", **fv)
    flags.DEFINE_string("to-arrayrecord", None, "Convert this JSONL manifest into ArrayRecord shards plus index.json"
                        " in --out.", **fv)
    flags.DEFINE_string("out", None, "The shards' folder (created), with --to-arrayrecord.", **fv)
    flags.DEFINE_integer("records-per-shard", 10_000, "Records per shard, with --to-arrayrecord.", lower_bound=1,
                         **fv)
    flags.DEFINE_integer("max-references", None, "The most reference inputs a record may have"
                         " (config.max_references); default: any number.", lower_bound=0, **fv)
    flags.DEFINE_integer("max-image-pixels", None, "With --validate: images over this many pixels are too_large"
                         " (the trainer's config.data.max_image_pixels); default: Pillow's limit.", lower_bound=1, **fv)
    flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "With --validate: threads decoding images"
                         " (0: none).", lower_bound=0, **fv)


def _problems(summary: Mapping[str, int], examples: Mapping[str, str]) -> list[str]:
    return [f"skipped {count} x {kind}, e.g. {examples[kind]}" for kind, count in sorted(summary.items())]


def run_flags(fv: flags.FlagValues) -> list[str]:
    """Validates or converts, as the flags say; prints and returns the output lines."""
    source, convert = fv.validate, fv["to-arrayrecord"].value
    if (source is None) == (convert is None):
        given = "both --validate and --to-arrayrecord" if source else "neither --validate nor --to-arrayrecord"
        raise app.UsageError(f"{given} given; {CHOOSE}")
    out_dir, max_references = fv.out, fv["max-references"].value
    try:
        if convert is not None:
            if out_dir is None:
                raise app.UsageError("--to-arrayrecord needs --out DIR (the folder for the shards)")
            if fv["max-image-pixels"].present or fv["workers"].present:
                raise app.UsageError("--max-image-pixels and --workers go with --validate (--to-arrayrecord copies"
                                     " image bytes without decoding them)")
            index = manifest.to_arrayrecord(convert, out_dir, records_per_shard=fv["records-per-shard"].value,
                                            max_references=max_references)
            lines = [f"{index['num_records']} records in {len(index['shards'])} shards -> {out_dir}"]
            lines += _problems(index["skipped"], index["examples"])
        else:
            if out_dir is not None or fv["records-per-shard"].present:
                raise app.UsageError("--out and --records-per-shard go with --to-arrayrecord, not --validate")
            m = manifest.open_manifest(source, max_references=max_references)
            checked = ingest.check_manifest(m, max_pixels=fv["max-image-pixels"].value, workers=fv.workers)
            lines = [f"{sum(checked.tasks.values())} good records: {dict(checked.tasks)}"]
            lines += _problems(checked.problems, checked.examples)
    except FileNotFoundError as e:
        raise app.UsageError(f"{e}; check the path") from None
    print("\n".join(lines))
    return lines


def main(argv: Sequence[str]) -> list[str]:
    """``python -m qk_jax.data.manifest_tool`` in-process: ``main(['--validate', 'data/train.jsonl'])``."""
    return cli.in_process("qk_jax.data.manifest_tool", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
