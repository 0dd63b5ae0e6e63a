"""``rlhf-jax compare``: bad input is refused naming the flag before anything is written; the table's
statistics by hand; a tiny comparison runs end to end (SFT + reward model, an online algorithm vmapped
over seeds, an offline one per seed) and writes the leaderboard."""
from __future__ import annotations

import json

import pytest

from rlhf_jax import compare
from rlhf_jax.cli import main as cli_main


@pytest.mark.parametrize("args,flag", [
    (["--algos", "grpo,nope"], "--algos"),
    (["--algos", "grpo,grpo"], "--algos"),
    (["--budget", "huge"], "--budget"),
    (["--seeds", "0"], "--seeds"),
    (["--task", "chess"], "--task"),
    (["--from", "/nonexistent/run"], "--from"),
    (["--reward", "python"], "--reward"),
])
def test_bad_input_is_refused_naming_the_flag(tmp_path, capsys, args, flag):
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--task", "sort", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert flag in err, err
    assert not out.exists()


def test_non_empty_out_and_bad_from_records(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["compare", "--task", "sort", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]
    run = tmp_path / "pipe"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"task": "sort", "sft": {"export_dir": str(run)}}))
    assert cli_main(["compare", "--task", "sort", "--out", str(tmp_path / "x"), "--from", str(run)]) == 2
    assert "reward_model.export_dir" in capsys.readouterr().err
    (run / "summary.json").write_text(json.dumps({"task": "sentiment"}))
    assert cli_main(["compare", "--task", "sort", "--out", str(tmp_path / "x"), "--from", str(run)]) == 2
    assert "task 'sentiment'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_row_statistics_by_hand():
    evals = [{"gold_reward": 0.5, "kl": 2.0, "proxy_reward": 1.0}, {"gold_reward": 0.7, "kl": 4.0, "proxy_reward": 2.0}]
    row = compare._row("grpo", "online", evals, sft_gold=0.4, wall=3.0, compile_s=1.0, budget_text="x",
                       samples=10.0)
    assert row["gold_gain"] == pytest.approx(0.2) and row["gold_gain_se"] == pytest.approx(0.1)
    assert row["kl"] == pytest.approx(3.0) and row["gain_per_nat"] == pytest.approx(0.2 / 3.0)
    flat = compare._row("dpo", "offline", [{"gold_reward": 0.4, "kl": 0.0, "proxy_reward": 0.0}], sft_gold=0.4,
                        wall=1.0, compile_s=0.0, budget_text="x", samples=None)
    assert flat["gain_per_nat"] is None and flat["gold_gain_se"] == 0.0


def test_tiny_comparison_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--task", "sort", "--algos", "grpo,simpo", "--seeds", "2", "--budget", "tiny",
                     "--out", str(out)]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["task"] == "sort" and board["seeds"] == 2 and board["budget"] == "tiny"
    assert [r["algorithm"] for r in board["rows"]] == ["grpo", "simpo"]
    for r in board["rows"]:
        assert len(r["per_seed"]) == 2 and r["compile_seconds"] > 0 and r["wall_seconds"] > 0
        assert r["gold_gain"] == pytest.approx(r["gold"] - board["sft"]["gold_reward"], abs=1e-9)
        assert 0.0 <= r["gold"] <= 1.0
    # the two seeds of the vmapped online algorithm are different runs
    grpo = board["rows"][0]["per_seed"]
    assert grpo[0] != grpo[1]
    md = (out / "leaderboard.md").read_text()
    assert "| grpo | online |" in md and "| simpo | offline |" in md and board["command"] in md
    base = json.loads((out / "base.json").read_text())
    # a second comparison starts from the first one's SFT policy and reward model
    again = tmp_path / "again"
    assert cli_main(["compare", "--task", "sort", "--algos", "simpo,rloo,rsft", "--seeds", "1", "--budget", "tiny",
                     "--out", str(again), "--from", str(out), "--reward", "gold"]) == 0
    board2 = json.loads((again / "leaderboard.json").read_text())
    assert board2["sft_export"] == base["sft_export"] and board2["sft"] == board["sft"]
    assert board2["reward"] == "gold" and [r["algorithm"] for r in board2["rows"]] == ["simpo", "rloo", "rsft"]
    assert json.loads((again / "rloo" / "run.json").read_text())["config"]["reward"]["kind"] == "gold"
    assert not (again / "base").exists()
