"""metrics.jsonl on its own (qlora/training/metrics.py): what a row holds, and which files a resume refuses to append
to. The runs that write it and resume it are tests/test_resume.py's and tests/test_crash.py's."""

from __future__ import annotations

import json
import math

import pytest

from qlora.errors import ConfigError
from qlora.training.metrics import MetricsLog, check_kept


def strict(text: str) -> list[dict]:
    """The rows as a strict JSON reader (jq, JavaScript, Go) takes them: NaN and Infinity refused."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_every_non_finite_number_of_a_row_is_written_as_null(tmp_path):
    """An infinite loss or gradient norm, and one inside a list or a nested dict, as a NaN is."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1, "loss": math.inf, "grad_norm": -math.inf, "eval": {"ppl": math.nan},
               "lrs": [1e-3, math.inf], "pair": (math.nan, 2)})
    assert strict(path.read_text()) == [{"step": 1, "loss": None, "grad_norm": None, "eval": {"ppl": None},
                                         "lrs": [1e-3, None], "pair": [None, 2]}]


ROWS = b'{"step": 0, "eval_loss": 5.0}\n{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.9}\n'
SAVED = len(b'{"step": 0, "eval_loss": 5.0}\n{"step": 1, "loss": 4.0}\n')  # what checkpoint-1 recorded


@pytest.mark.parametrize("now", [ROWS[:ROWS.index(b"\n") + 1], b'{"step": 0, "eval_loss": 5.0, "note": "other"}\n' * 2],
                         ids=["cut short at the end of a line", "replaced by one with a line across the length"])
def test_a_metrics_file_cut_or_replaced_since_the_checkpoint_is_refused(tmp_path, now):
    """Either kept what it held, and the resumed rows were appended after it: the rows of step 1 lost without a word,
    or the checkpoint's length cut a line in two and the first row appended joined its half."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(now)
    with pytest.raises(ConfigError, match=f"the checkpoint recorded {SAVED} ending a line: it was cut short or "):
        check_kept(path, SAVED)
    assert path.read_bytes() == now



def test_a_checkpoint_before_a_resumes_first_row_counts_the_rows_without_the_line_it_drops(tmp_path):
    """Resumed past the end of a run of 2 steps, the training line of step 2 goes with the first row written. Saved
    before that row (no evaluation at step 2, step 3 not logged), checkpoint-3 recorded the line: resumed from it, a
    run kept a training row at step 2 that a run straight through has not; killed after the row, before checkpoint-4,
    its resume was refused (the file, the line dropped, held less than checkpoint-3 recorded)."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, ROWS, unlogged=2)
    assert log.size() == SAVED and path.read_bytes() == ROWS  # the line is there until a row takes its place
    log.write({"step": 4, "loss": 3.8})
    log.write({"step": 5, "loss": 3.7})
    assert path.read_bytes() == ROWS[:SAVED] + b'{"step": 4, "loss": 3.8}\n{"step": 5, "loss": 3.7}\n'
    assert log.size() == path.stat().st_size
