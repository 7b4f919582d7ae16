"""The HTML report: self-contained, with per-layer SQNR, accuracy vs bits and the recipe."""

from __future__ import annotations

import math
import re

import pytest

import postquant
from postquant.errors import OutputError
from postquant.io.report import layer_table, write_report

pytest.importorskip("matplotlib")

RESULTS = [
    {"method": m, "w_bits": b, "a_bits": a, "metric": "top1", "fp": 81.0, "quantized": 81.0 - 8 / b}
    for m, a in (("rtn", None), ("squant", 8))
    for b in (2, 3, 4, 8)
]


def test_report_embeds_plots_sqnr_and_recipe(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 4, "a_bits": 8}, calib=batches)
    path = write_report(tmp_path / "run", qmodel, small_net, RESULTS, batches[0])
    page = path.read_text()
    assert path.name == "report.html"
    assert page.count('<img src="data:image/png;base64,') == 2
    assert not re.search(r'src="(?!data:)', page)  # nothing to fetch
    assert "w_bits: 4" in page and "squant" in page
    rows = layer_table(qmodel, small_net, batches[0])
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "conv3", "fc"]
    assert all(15 < r["sqnr_db"] < 40 for r in rows)  # W4 on the folded weights: about 6 dB per bit


def test_sqnr_is_nan_without_the_float_model_and_results_alone_are_fine(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 8}, example_inputs=batches[0])
    assert all(math.isnan(r["sqnr_db"]) for r in layer_table(qmodel))
    assert "data:image/png;base64," in write_report(tmp_path / "only-results", results=RESULTS).read_text()


def test_unwritable_run_dir(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError):
        write_report(tmp_path / "file.txt" / "run", results=RESULTS)


def test_a_mixed_precision_result_is_plotted_at_its_average_bits(tmp_path):
    mixed = {**RESULTS[0], "w_bits": None, "avg_w_bits": 3.02}  # as `quantize --w-bits-budget` writes it
    unknown = {**RESULTS[0], "w_bits": None}  # no bits at all: left out of the plot, not a crash
    page = write_report(tmp_path / "mixed", results=[*RESULTS, mixed, unknown]).read_text()
    assert "data:image/png;base64," in page
