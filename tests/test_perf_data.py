"""``qk_jax.perf.data``: the input benchmark's rows-mode case measures both ways of reading, one line each."""

import re

from qk_jax.perf import data


def test_the_rows_case_reports_whole_and_rows_rates():
    lines = list(data.run(cases=("jpeg-rows",), workers=(0,), batches=1, records=12))
    found = [re.search(r"process 0 of 2, (whole|rows) *, workers=0: +([0-9.]+) global samples/s", line)
             for line in lines[1:]]
    assert [m.group(1) for m in found if m] == ["whole", "rows"], lines
    assert all(float(m.group(2)) > 0 for m in found if m)
