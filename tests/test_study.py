"""The study: its statistics against scipy, the tuning (validation argmax, the test split read
only after every choice), the regimes' data changes, the quick budget end to end, resuming,
and bad input."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from dsd import train as trainer
from dsd.cli import main
from dsd.config import RunConfig
from dsd.data import DataError, alter_training, load_task
from dsd.study import (
    BUDGETS,
    Cell,
    TaskStudy,
    benjamini_hochberg,
    cells_of,
    choose,
    holm,
    paired_test,
    plots,
    run_study,
    table,
)
from dsd.study import run as study_run
from dsd.train.recipe import Run

from _runs import metrics_rows

# ---- statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_paired_test_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    control = rng.uniform(0.6, 0.9, size=8)
    treated = control + rng.normal(0.01, 0.02, size=8)
    result = paired_test(treated, control)
    reference = stats.ttest_rel(treated, control)
    assert result["p_value"] == pytest.approx(reference.pvalue, rel=1e-10)
    low, high = reference.confidence_interval(0.95)
    assert result["ci95"] == pytest.approx([low, high], rel=1e-10)
    assert result["mean_diff"] == pytest.approx(np.mean(treated - control), rel=1e-12)
    assert result["outside_noise"] == (reference.pvalue < 0.05)


def test_paired_test_without_spread_has_no_p_value():
    # +1 of 450 test examples on every seed: equal differences, up to float rounding
    constant = paired_test([442 / 450, 439 / 450, 440 / 450], [441 / 450, 438 / 450, 439 / 450])
    assert constant["p_value"] is None and constant["outside_noise"] is None
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_test([0.5], [0.4])


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.005], [0.2, 0.2, 0.01, 0.9, 0.04, 0.04],
                               [1.0], list(np.random.default_rng(0).uniform(0, 0.2, 40))])
def test_benjamini_hochberg_matches_scipy(p):
    assert benjamini_hochberg(p) == pytest.approx(
        stats.false_discovery_control(p, method="bh").tolist(), rel=1e-12)


def test_holm_on_known_inputs():
    # Holm (1979): sorted p_(i) times (m - i + 1), made monotone, capped at 1.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.001, 0.3]) == pytest.approx([0.6, 0.003, 0.6])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_holm_equals_its_definition_on_random_inputs():
    p = np.random.default_rng(1).uniform(0, 0.1, 30)
    order = np.argsort(p)
    m = len(p)
    expected = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):  # step-down: never below the adjusted value before it
        running = max(running, min(1.0, (m - rank) * p[i]))
        expected[i] = running
    assert holm(p) == pytest.approx(expected.tolist(), rel=1e-12)
    assert all(h >= b for h, b in zip(holm(p), benjamini_hochberg(p)))  # Holm is stricter


# ---- tuning ------------------------------------------------------------------------------------

def _cell(higher_is_better=True, grid=(1e-3, 2e-3, 4e-3), regularisers=((0.0, 0.0),)):
    config = RunConfig.from_mapping({"task": "digits", "baseline": True})
    points = tuple((lr, *regulariser) for regulariser in regularisers for lr in grid)
    return Cell("digits", "sparsity", 0.5, config, points, 2e-3, higher_is_better,
                "acc" if higher_is_better else "bpc")


def _record(dsd, dense, metric="acc"):
    return {"diverged": None, "dsd": {f"val_{metric}": dsd}, "dense": {f"val_{metric}": dense}}


def _by_lr(records):  # records at rates only, unregularised
    return {(lr, 0.0, 0.0): runs for lr, runs in records.items()}


def test_chosen_lr_is_the_argmax_of_the_mean_validation_score():
    records = {1e-3: [_record(0.90, 0.80), _record(0.70, 0.82)],  # means 0.80, 0.81
               2e-3: [_record(0.85, 0.95), _record(0.85, 0.93)],  # means 0.85, 0.94
               4e-3: [_record(0.99, 0.90), _record(0.60, 0.90)]}  # means 0.795, 0.90
    chosen = choose(_cell(), _by_lr(records))
    assert chosen["dsd"]["lr"] == 2e-3 and chosen["dense"]["lr"] == 2e-3
    assert chosen["dsd"]["val_mean"] == pytest.approx(0.85)
    assert not chosen["dsd"]["at_grid_edge"]
    # the best single seed (0.99 at 4e-3) does not win: the mean over seeds does
    records[4e-3][1] = _record(0.80, 0.99)
    chosen = choose(_cell(), _by_lr(records))
    assert chosen["dsd"]["lr"] == 4e-3 and chosen["dense"]["lr"] == 4e-3
    assert chosen["dense"]["at_grid_edge"]


def test_the_joint_choice_is_the_argmax_over_the_whole_grid_of_rates_and_regularisers():
    regularisers = ((0.0, 0.0), (0.1, 0.0), (0.0, 0.01), (0.3, 0.1))
    cell = _cell(regularisers=regularisers)
    rng = np.random.default_rng(0)
    records = {point: [_record(*rng.uniform(0.5, 0.9, 2)) for _ in range(3)]
               for point in cell.grid}
    # each arm's best mean sits at a different interior point, neither the best rate of the
    # unregularised runs nor the best regulariser at the reference rate
    records[(2e-3, 0.3, 0.1)] = [_record(0.95, 0.6), _record(0.93, 0.6), _record(0.94, 0.6)]
    records[(4e-3, 0.1, 0.0)] = [_record(0.6, 0.97), _record(0.6, 0.91), _record(0.6, 0.94)]
    chosen = choose(cell, records)
    for arm in ("dsd", "dense"):
        means = {point: np.mean([r[arm]["val_acc"] for r in runs])
                 for point, runs in records.items()}
        best = max(cell.grid, key=lambda point: means[point])
        assert (chosen[arm]["lr"], chosen[arm]["dropout"], chosen[arm]["weight_decay"]) == best
        assert chosen[arm]["val_mean"] == pytest.approx(means[best])
        assert [tuple(v[:3]) for v in chosen[arm]["val_means"]] == list(cell.grid)
    assert (chosen["dsd"]["lr"], chosen["dsd"]["dropout"]) == (2e-3, 0.3)
    assert (chosen["dense"]["lr"], chosen["dense"]["dropout"]) == (4e-3, 0.1)
    assert not chosen["dsd"]["at_grid_edge"] and chosen["dense"]["at_grid_edge"]


def test_a_rate_at_the_edge_widens_the_rates_of_the_chosen_regulariser_only():
    cell = _cell(grid=(1e-3, 4e-3), regularisers=((0.0, 0.0), (0.2, 0.1)))
    choice = {"dsd": {"lr": 4e-3, "dropout": 0.2, "weight_decay": 0.1},
              "dense": {"lr": 4e-3, "dropout": 0.2, "weight_decay": 0.1}}
    done = {}
    assert study_run._widen(cell, choice, done, most=1)
    assert cell.grid == ((1e-3, 0.0, 0.0), (4e-3, 0.0, 0.0),
                         (1e-3, 0.2, 0.1), (4e-3, 0.2, 0.1), (8e-3, 0.2, 0.1))
    assert done == {(0.2, 0.1): {"up": 1, "down": 0}}
    choice["dsd"].update(lr=8e-3)  # still at the edge, but that side is used up
    # 4e-3 is below the rates tried with (0.2, 0.1), yet the top of those tried unregularised
    choice["dense"].update(lr=4e-3, dropout=0.0, weight_decay=0.0)
    assert study_run._widen(cell, choice, done, most=1)
    assert cell.grid[2] == (8e-3, 0.0, 0.0) and len(cell.grid) == 6
    assert done[(0.0, 0.0)] == {"up": 1, "down": 0}
    assert not study_run._widen(cell, {**choice, "dense": choice["dsd"]}, done, most=1)


def test_bits_per_character_are_minimised_and_a_diverged_rate_never_wins():
    records = {1e-3: [_record(2.5, 2.4, "bpc")] * 2, 2e-3: [_record(2.3, 2.6, "bpc")] * 2,
               4e-3: [{"diverged": "training diverged", "dsd": None, "dense": None},
                      _record(1.0, 1.0, "bpc")]}
    chosen = choose(_cell(higher_is_better=False), _by_lr(records))
    assert chosen["dsd"]["lr"] == 2e-3 and chosen["dense"]["lr"] == 1e-3
    assert chosen["dsd"]["val_mean"] == pytest.approx(2.3)
    assert chosen["dsd"]["val_means"][2] == [4e-3, 0.0, 0.0, math.inf]


def test_a_tie_takes_the_first_point_of_the_grid():
    cell = _cell(regularisers=((0.0, 0.0), (0.2, 0.1)))
    records = {point: [_record(0.9, 0.9)] * 2 for point in cell.grid}
    assert choose(cell, records)["dsd"] | {"val_means": None} == {
        "lr": 1e-3, "dropout": 0.0, "weight_decay": 0.0, "val_mean": 0.9, "val_means": None,
        "at_grid_edge": True}


# ---- the regimes' data -------------------------------------------------------------------------

def test_label_noise_moves_exactly_that_share_to_another_class_per_seed():
    data = load_task("digits")
    noisy = alter_training(data, label_noise=0.3, seed=0)
    for split in ("y_train", "y_val"):
        changed = getattr(noisy, split) != getattr(data, split)
        assert changed.sum().item() == round(0.3 * len(getattr(data, split)))
    assert torch.equal(noisy.y_test, data.y_test) and torch.equal(noisy.x_train, data.x_train)
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < 10
    again = alter_training(data, label_noise=0.3, seed=0)
    other = alter_training(data, label_noise=0.3, seed=1)
    assert torch.equal(again.y_train, noisy.y_train)
    assert not torch.equal(other.y_train, noisy.y_train)


def test_train_examples_keeps_a_seeded_subset_of_the_training_split():
    data = load_task("digits")
    small = alter_training(data, examples=100, seed=3)
    assert len(small.y_train) == len(small.x_train) == 100
    rows = {tuple(x.flatten().tolist()) for x in data.x_train}
    assert all(tuple(x.flatten().tolist()) in rows for x in small.x_train)
    assert torch.equal(small.x_val, data.x_val) and torch.equal(small.x_test, data.x_test)
    assert alter_training(data) is data
    with pytest.raises(DataError, match=f"train_examples 5000 exceeds the {len(data.y_train):,} "
                                        "training examples of task digits"):
        alter_training(data, examples=5000)
    with pytest.raises(DataError, match="for classification tasks; task text predicts"):
        alter_training(load_task("text", seq_len=16), label_noise=0.1)


def test_a_run_without_the_test_split_never_evaluates_it(tmp_path, monkeypatch):
    splits = []
    evaluate = Run._evaluate
    monkeypatch.setattr(Run, "_evaluate",
                        lambda self, model, split: splits.append(split) or evaluate(
                            self, model, split))
    config = RunConfig.from_mapping({"task": "digits", "phases": [1, 1, 1], "mlp_hidden": [8],
                                     "baseline": True, "evaluate_test": False,
                                     "backend": "torch"})
    summary = trainer.train(config, tmp_path / "run", quiet=True)
    assert set(splits) == {"val"}
    assert "test_acc" not in summary["arms"]["dsd"]["final"]
    assert "test_acc_difference" not in summary
    rows = metrics_rows(tmp_path / "run")
    assert rows and not any(key.startswith("test_") for row in rows for key in row)
    tested = trainer.evaluate_saved(tmp_path / "run", "test", "baseline")
    assert 0 < tested["test_acc"] <= 1


# ---- the study end to end ----------------------------------------------------------------------

def test_study_command_with_a_stand_in_trainer(tmp_path, monkeypatch, capsys):
    """The orchestration and the command's outputs, fast: runs "train" in no time, with
    validation scores that favour the highest rate and dropout (so the rates tried with the
    regulariser (0.2, 0.1) widen) and seed-dependent test scores."""
    events = []

    def train(config, run_dir, quiet):
        events.append(("train", config.lr, config.dropout, config.weight_decay))
        run_dir.mkdir(parents=True)
        final = {"val_acc": 0.5 + 10 * config.lr + config.dropout, "val_loss": 1.0}
        return {"train_seconds": 0.5, "arms": {"dsd": {"final": final},
                                               "baseline": {"final": final}}}

    def evaluate_saved(run_dir, split, arm):
        events.append(("test", split))
        seed = int(run_dir.name.split("-s")[1].split("-")[0])
        return {"test_acc": 0.8 + 0.01 * seed * (arm == "dsd") + 0.001 * (arm == "baseline")}

    monkeypatch.setattr(study_run, "train", train)
    monkeypatch.setattr(study_run, "evaluate_saved", evaluate_saved)
    out = tmp_path / "out"
    argv = ["study", "--budget", "quick", "--regimes", "sparsity", "--work",
            str(tmp_path / "runs"), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    # 2 cells x 2 rates x 2 regularisers x 2 seeds; then (4e-3, 0.2, 0.1) chosen: 8e-3 added
    # with that regulariser, once
    assert "16 runs: 0 done, 16 to train" in printed.err
    assert "20 runs: 16 done, 4 to train" in printed.err
    assert {e[1:] for e in events if e[0] == "train"} == {
        (lr, *regulariser) for lr in (1e-3, 4e-3) for regulariser in ((0, 0), (0.2, 0.1))} | {
        (8e-3, 0.2, 0.1)}
    last_train = max(i for i, e in enumerate(events) if e[0] == "train")
    assert all(e == ("test", "test") for e in events[last_train + 1:])
    assert min(i for i, e in enumerate(events) if e[0] == "test") > last_train
    result = json.loads((out / "study_quick.json").read_text())
    assert [c["grid"] for c in result["cells"]] == [[[1e-3, 0, 0], [4e-3, 0, 0], [1e-3, 0.2, 0.1],
                                                     [4e-3, 0.2, 0.1], [8e-3, 0.2, 0.1]]] * 2
    assert all(c["choice"]["dsd"]["lr"] == 8e-3 and c["choice"]["dsd"]["at_grid_edge"]
               and c["choice"]["dense"]["dropout"] == 0.2 for c in result["cells"])
    tuned = result["cells"][0]["tuned"]
    assert tuned["at"]["dense"] == {"lr": 8e-3, "dropout": 0.2, "weight_decay": 0.1}
    assert result["cells"][0]["same_lr"]["at"]["dsd"] == {"lr": 4e-3, "dropout": 0,
                                                          "weight_decay": 0}
    assert tuned["dsd_test"] == pytest.approx([0.8, 0.81])
    assert tuned["paired"]["mean_diff"] == pytest.approx(0.004)
    assert result["train_seconds_total"] == 20 * 0.5 and result["runs"] == 20
    assert printed.out == (out / "study_quick.md").read_text()
    assert "| sparsity | 90% | 0.008 / 0.2 / 0.1* | 0.008 / 0.2 / 0.1* |" in printed.out
    assert (out / "study_quick_sparsity.png").read_bytes()[:4] == b"\x89PNG"

    events.clear()
    assert main(argv) == 0  # every run recorded: nothing trained again, the same numbers
    assert "20 runs: 20 done, 0 to train" in capsys.readouterr().err
    assert not any(e[0] == "train" for e in events)
    assert json.loads((out / "study_quick.json").read_text())["cells"] == result["cells"]


def _table_rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("holds_on_fresh_seeds", [True, False])
def test_cells_found_are_trained_again_on_fresh_seeds_at_their_chosen_points(
        tmp_path, monkeypatch, holds_on_fresh_seeds):
    """A stand-in trainer: DSD prefers dropout and the dense arm none (so the arms choose
    different points), and at 90% sparsity DSD tests 10 points ahead on the exploratory seeds
    (and on the fresh ones, or not)."""
    events, choose_on_validation = [], study_run.choose

    def train(config, run_dir, quiet):
        events.append(("train", config.lr, config.dropout, config.weight_decay, config.seed))
        run_dir.mkdir(parents=True)
        (run_dir / "fake.json").write_text(json.dumps([config.sparsity, config.seed]))
        return {"train_seconds": 0.5, "arms": {
            "dsd": {"final": {"val_acc": 0.5 + 10 * config.lr + config.dropout}},
            "baseline": {"final": {"val_acc": 0.5 + 10 * config.lr - config.dropout}}}}

    def evaluate_saved(run_dir, split, arm):
        events.append(("test", split))
        sparsity, seed = json.loads((run_dir / "fake.json").read_text())
        ahead = sparsity == 0.9 and (seed < 2 or holds_on_fresh_seeds)
        return {"test_acc": 0.8 + 0.1 * ahead + 0.001 * (seed % 3) ** 2 if arm == "dsd"
                else 0.8 + 0.0005 * seed}

    monkeypatch.setattr(study_run, "train", train)
    monkeypatch.setattr(study_run, "evaluate_saved", evaluate_saved)
    monkeypatch.setattr(study_run, "choose", lambda cell, records: events.append(
        ("choice",)) or choose_on_validation(cell, records))
    result = run_study("quick", regimes=["sparsity"], work=tmp_path / "runs", say=str)
    found, other = result["cells"][1], result["cells"][0]
    assert found["tuned"]["p_holm"] < 0.05 <= other["tuned"]["p_holm"]
    assert other["confirmation"] is None
    again = found["confirmation"]
    assert result["confirmation_seeds"] == [2, 4] and again["seeds"] == [2, 3]
    # the fresh runs: only the two chosen points, on seeds the exploration never used
    chosen = {arm: (found["choice"][arm]["lr"], found["choice"][arm]["dropout"],
                    found["choice"][arm]["weight_decay"]) for arm in ("dsd", "dense")}
    assert chosen["dsd"] != chosen["dense"] and again["at"] == found["tuned"]["at"]
    first_test = events.index(("test", "test"))
    fresh = [e[1:] for e in events[first_test:] if e[0] == "train"]
    assert sorted(fresh) == sorted((*point, seed) for point in chosen.values() for seed in (2, 3))
    assert {run["seed"] for run in found["runs"]} == {0, 1}
    assert ("choice",) not in events[first_test:]  # no choice once the test split is read
    assert result["confirmation_runs"] == 4 and again["family_size"] == 1
    assert again["dsd_test"] == pytest.approx([0.8 + 0.1 * holds_on_fresh_seeds + 0.004,
                                               0.8 + 0.1 * holds_on_fresh_seeds])
    assert again["confirmed"] == holds_on_fresh_seeds
    rows = _table_rows(table(result))
    assert rows[0][9:12] == ["fresh seeds: DSD − tuned dense (95% CI)", "p (Holm)", "confirmed"]
    assert all(len(row) == len(rows[0]) for row in rows)
    assert rows[2][11] == ("confirmed" if holds_on_fresh_seeds else "not confirmed")
    assert rows[1][9:12] == ["", "", ""]  # sparsity 50%: not found, not trained again
    assert "Fresh seeds 2 to 3 for each of the 1 distinct cells" in table(result)


def test_a_result_from_before_regularisers_were_tuned_still_renders():
    old = json.loads((Path(__file__).parents[1] / "bench/results/study_full.json").read_text())
    rows = _table_rows(table(old))
    assert all(len(row) == len(rows[0]) for row in rows)
    assert "| sparsity | 90% | 0.008 / 0 / 0 | 0.008 / 0 / 0 | 70.04 | 67.19 |" in table(old)
    assert "Fresh seeds" not in table(old) and set(plots(old)) == set(old["regimes"])


@pytest.mark.slow
def test_quick_study_end_to_end_reads_the_test_split_only_after_every_choice(
        tmp_path, monkeypatch, capsys):
    events = []
    run_evaluate, saved_evaluate, choose_on_validation = (
        Run._evaluate, study_run.evaluate_saved, study_run.choose)
    monkeypatch.setattr(Run, "_evaluate", lambda self, model, split: events.append(
        ("train-eval", split)) or run_evaluate(self, model, split))
    monkeypatch.setattr(study_run, "evaluate_saved", lambda run_dir, split, arm: events.append(
        ("saved-eval", split)) or saved_evaluate(run_dir, split, arm))
    monkeypatch.setattr(study_run, "choose", lambda cell, records: events.append(
        ("choice", cell.key())) or choose_on_validation(cell, records))

    out = tmp_path / "out"
    argv = ["study", "--budget", "quick", "--work", str(tmp_path / "runs"), "--out", str(out),
            "--set", 'backend="torch"']
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "32 runs: 0 done, 32 to train" in printed.err
    assert ("train-eval", "test") not in events
    last_choice = max(i for i, e in enumerate(events) if e[0] == "choice")
    first_test = min(i for i, e in enumerate(events) if e[1] == "test")
    assert first_test > last_choice
    assert all(e[1] == "test" for e in events if e[0] == "saved-eval")

    result = json.loads((out / "study_quick.json").read_text())
    spec = BUDGETS["quick"]["tasks"]["digits"]
    assert [(c["regime"], c["value"]) for c in result["cells"]] == [
        (r, v) for r, values in spec.regimes.items() for v in values]
    distinct = {c["key"]: c for c in result["cells"]}  # noise 0, unstructured: sparsity 0.5
    assert len(distinct) == 4
    assert result["runs"] == sum(2 * len(c["grid"]) for c in distinct.values())
    tuned_keys = ("lr", "dropout", "weight_decay")
    for cell in result["cells"]:
        assert len(cell["runs"]) == 2 * len(cell["grid"]) and cell["tuned"]["family_size"] == 4
        # each regulariser's rates (1e-3, 4e-3) widened by x2 beyond an edge an arm chose with
        # that regulariser, at most once a side
        for regulariser in ([0, 0], [0.2, 0.1]):
            grown = next((g for g in cell["grid_extensions"]
                          if [g["dropout"], g["weight_decay"]] == regulariser),
                         {"up": 0, "down": 0})
            assert [p[0] for p in cell["grid"] if p[1:] == regulariser] == (
                [1e-3 / 2] * grown["down"] + [1e-3, 4e-3] + [8e-3] * grown["up"])
            chosen = {cell["choice"][arm]["lr"] for arm in ("dsd", "dense")
                      if [cell["choice"][arm][k] for k in tuned_keys[1:]] == regulariser}
            assert grown["up"] == any(lr >= 4e-3 for lr in chosen)
            assert grown["down"] == any(lr <= 1e-3 for lr in chosen)
        for arm in ("dsd", "dense"):  # the choice is the validation argmax of the recorded runs
            means = {tuple(p): np.mean([r[arm]["val_acc"] for r in cell["runs"]
                                        if [r[k] for k in tuned_keys] == p])
                     for p in cell["grid"]}
            best = max(means, key=lambda p: means[p])
            assert tuple(cell["choice"][arm][k] for k in tuned_keys) == best
        tuned = cell["tuned"]
        assert tuned["lr"] == {"dsd": cell["choice"]["dsd"]["lr"],
                               "dense": cell["choice"]["dense"]["lr"]}
        assert tuned["at"] == {arm: {k: cell["choice"][arm][k] for k in tuned_keys}
                               for arm in ("dsd", "dense")}
        assert tuned["paired"]["mean_diff"] == pytest.approx(
            np.mean(tuned["dsd_test"]) - np.mean(tuned["dense_test"]))
        assert cell["same_lr"]["lr"] == {"dsd": 4e-3, "dense": 4e-3}
        assert tuned["verdict"] in ("tie", "DSD better", "DSD worse")
        assert (cell["confirmation"] is not None) == (tuned["p_holm"] < 0.05)
    noisy = next(c for c in result["cells"] if c["value"] == 0.3)
    assert noisy["config"]["label_noise"] == 0.3
    structured = next(c for c in result["cells"] if c["value"] == "2:4")
    assert structured["config"]["pattern"] == "2:4" and structured["config"]["sparsity"] == 0.5
    assert printed.out == (out / "study_quick.md").read_text()
    assert "| sparsity | 90% |" in printed.out and "| label_noise | 30% |" in printed.out
    assert "| pattern | unstructured |" in printed.out and "| pattern | 2:4 |" in printed.out
    for regime in ("sparsity", "label_noise", "pattern"):
        assert (out / f"study_quick_{regime}.png").read_bytes()[:4] == b"\x89PNG"

    # A second call trains nothing and gives the same numbers.
    events.clear()
    assert main(argv) == 0
    assert f"{result['runs']} runs: {result['runs']} done, 0 to train" in \
        capsys.readouterr().err
    assert not any(e[0] == "train-eval" for e in events)
    assert json.loads((out / "study_quick.json").read_text())["cells"] == result["cells"]


def test_a_diverged_run_is_recorded_and_not_trained_again(tmp_path, monkeypatch):
    calls = []

    def diverge(config, run_dir, quiet):
        calls.append(config.lr)
        raise trainer.DivergedError("training diverged in epoch 1 of the dsd arm")

    monkeypatch.setattr(study_run, "train", diverge)
    config = RunConfig.from_mapping({"task": "digits", "baseline": True})
    (tmp_path / "run").mkdir()
    for _ in range(2):
        record = study_run.train_one(config, tmp_path / "run")
        assert record["diverged"].startswith("training diverged")
    assert calls == [config.lr]


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": "huge"}, "unknown budget 'huge'; choose one of quick, full, pattern, "
                         "regularised"),
    ({"tasks": ["cifar10"]}, "--tasks: budget quick has no task 'cifar10'; it runs digits"),
    ({"regimes": ["width"]}, "--regimes: 'width' is not a regime of budget quick on digits; "
                             "choose from label_noise, pattern, sparsity"),
    ({"seeds": 1}, "--seeds must be at least 2 for a paired test"),
    ({"jobs": 0}, "--jobs must be at least 1, got 0"),
    ({"settings": {"lr": 0.1}}, "--set lr: the study sets lr itself (every arm picks its own"),
    ({"settings": {"seed": 3}}, "--set seed: the study sets seed itself (give --seeds"),
    ({"settings": {"dropout": 0.5}}, "--set dropout: the study sets dropout itself (every arm "
                                     "picks its own from the budget's regulariser grid"),
    ({"settings": {"sparsity": 2}}, "--set sparsity must be a number in [0, 1), got 2"),
    ({"budget": "full", "tasks": ["digits"], "regimes": ["width"], "settings": {"model": "cnn"}},
     "regime width is for model mlp, not 'cnn'; leave it out with --regimes"),
])
def test_bad_study_input_is_one_line_and_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        run_study(**{"budget": "quick", "work": tmp_path / "runs", **kwargs})
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_study_command_reports_bad_input_on_one_line(tmp_path, capsys):
    assert main(["study", "--budget", "quick", "--set", "baseline=false", "--out",
                 str(tmp_path / "out"), "--work", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsd: error: --set baseline: the study sets baseline itself (")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_full_budget_cells_are_valid_and_share_the_default_runs():
    cells = cells_of("full")
    keys = {}
    for cell in cells:
        keys.setdefault((cell.task, cell.key()), []).append((cell.regime, cell.value))
    # the task's default config is one cell, reached from every regime that includes it
    defaults = [v for v in keys.values() if len(v) > 1]
    assert len(defaults) == 3 - 1  # mnist1d and digits (text has a single regime)
    assert {r for r, _ in defaults[0]} == {"label_noise", "width", "first_phase", "sparsity",
                                            "iterations", "optimizer", "train_examples"}
    dsdsd = next(c for c in cells if c.regime == "iterations" and c.value == 2)
    assert dsdsd.config.phases == [12] * 5
    sgd = next(c for c in cells if c.value == "sgd")
    assert sgd.grid == tuple((lr, 0.0, 0.0) for lr in (0.0125, 0.025, 0.05, 0.1))
    assert sgd.reference_lr == 0.05
    assert all(not c.config.evaluate_test and c.config.baseline for c in cells)
    # unregularised, a run is the run a rate-only study named: its recorded runs are reused
    assert {study_run._run_dir(Path("w"), c.run_config((lr, 0.0, 0.0), 3)) for c in cells
            for lr, *_ in c.grid} == {study_run._run_dir(Path("w"), RunConfig.from_mapping(
                {"lr": lr, "seed": 3}, base=c.config)) for c in cells for lr, *_ in c.grid}


def test_regularised_budget_cells_tune_the_same_joint_grid_for_both_arms():
    cells = cells_of("regularised")
    assert {(c.task, c.regime, c.value) for c in cells} >= {
        ("mnist1d", "sparsity", 0.9), ("mnist1d", "label_noise", 0.4),
        ("mnist1d", "pattern", "2:4"), ("mnist1d", "model", "cnn"), ("text", "sparsity", 0.5)}
    for cell in cells:
        assert cell.config.optimizer == "adamw"  # weight decay decoupled
        assert (cell.reference_lr, 0.0, 0.0) in cell.grid
        configs = [cell.run_config(point, 0) for point in cell.grid]
        assert len({(c.lr, c.dropout, c.weight_decay) for c in configs}) == len(cell.grid)
    mlp = next(c for c in cells if c.task == "mnist1d" and c.regime == "sparsity")
    assert {p[1:] for p in mlp.grid} == {(d, wd) for d in (0.0, 0.1, 0.2, 0.3)
                                         for wd in (0.0, 0.01, 0.1)}
    assert next(c for c in cells if c.value == "cnn").config.model == "cnn"
    assert next(c for c in cells if c.value == "2:4").config.sparsity == 0.5
    with pytest.raises(ValueError, match=r"must include \(0.0, 0.0\)"):
        TaskStudy({}, {}, regularisers=((0.1, 0.0),))
    with pytest.raises(ValueError, match="reference rate 0.5 of adamw is not in its grid"):
        TaskStudy({}, {}, {"adamw": ((1e-3,), 0.5)})
