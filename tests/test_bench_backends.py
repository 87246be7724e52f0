"""`vlmq bench backends --parity`: the GPU parity figures' code path, run dry on the CPU
(tiny model, fp32, eager steps at exact against padded shapes), so the device call that
records them does not find a bug in the bench itself; the dry run writes nothing."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from ops.cli import main


def test_parity_dry_run_reports_both_figures_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "backends.json"
    rc = main(
        ["bench", "backends", "--parity", "--parity-device", "cpu", "--parity-prompts", "3",
         "--max-tokens", "6", "--runs", "3", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert "graph_eager_identical_fraction_same_shape: 1.0 fraction" in printed
    diff = float(printed.split("bf16_topk_logprob_max_abs_diff: ")[1].split()[0])
    assert 0 <= diff < 1e-3  # fp32 on both sides: rounding only
    assert "nothing written" in printed and not out.exists()
