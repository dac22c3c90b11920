"""`python -m ssl_imwa.evaluate`: re-evaluating a checkpoint reproduces the run and adds other heads."""
from __future__ import annotations

from pathlib import Path

import pytest

from ssl_imwa.algorithms.acr import BALANCED_HEAD
from ssl_imwa.evaluate import evaluate_checkpoint, format_table, main
from tests.utils import read_results, train_run

# ACR has two heads and evaluates the balanced one; K=2, E=2 so the checkpoint holds a merged model.
ACR_RUN = ["algorithm=acr", "experiment=quickstart", "train.iterations=24", "train.batch_size=8", "train.mu=2",
           "train.eval_every=12", "algorithm.epoch_length=6", "algorithm.estimate_start_epoch=1",
           "imwa.k=2", "imwa.episodes=2", "train.num_threads=1"]


@pytest.fixture(scope="module")
def acr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("evaluate"), ACR_RUN)


@pytest.mark.slow
def test_the_runs_own_head_reproduces_its_final_evaluation_exactly(acr_run: Path) -> None:
    final = read_results(acr_run)["final"]
    again = evaluate_checkpoint(acr_run)
    assert list(again) == [BALANCED_HEAD]
    for key in ("top1", "balanced_acc", "macro_f1", "head", "medium", "tail", "per_class"):
        assert again[BALANCED_HEAD][key] == final[key], key


@pytest.mark.slow
def test_all_heads_and_the_student(acr_run: Path) -> None:
    every = evaluate_checkpoint(acr_run, heads=["all"])
    assert list(every) == ["logits", BALANCED_HEAD]
    assert every[BALANCED_HEAD] == evaluate_checkpoint(acr_run)[BALANCED_HEAD]
    # each head's confusion matrix counts every test image once, and top-1 is its trace share
    test_images = sum(map(sum, every[BALANCED_HEAD]["confusion"]))
    for metrics in every.values():
        matrix = metrics["confusion"]
        assert sum(map(sum, matrix)) == test_images > 0
        assert metrics["top1"] == pytest.approx(sum(matrix[i][i] for i in range(len(matrix))) / test_images)
    # after the final merge both replicas hold the same merged model
    assert evaluate_checkpoint(acr_run, replica=1) == evaluate_checkpoint(acr_run, replica=0)
    student = evaluate_checkpoint(acr_run, heads=["logits"], model="student")["logits"]
    assert sum(map(sum, student["confusion"])) == test_images


def test_command_line_prints_the_table(acr_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(acr_run), "--head", "all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| model head | top1 |") and "| head classes |" in lines[1]
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| logits")}
    assert set(rows) == {"logits", BALANCED_HEAD}
    balanced = 100 * read_results(acr_run)["final"]["balanced_acc"]
    assert rows[BALANCED_HEAD].split("|")[3].strip() == f"{balanced:.2f}"


def test_table_columns_have_distinct_names() -> None:
    """The model-head column and the head-class accuracy column have names of their own."""
    metrics = {"top1": 0.5, "balanced_acc": 0.4, "macro_f1": 0.3, "head": 0.9, "medium": 0.2, "tail": 0.1}
    header, rule, row = format_table({"logits": metrics}).splitlines()
    names = [cell.strip() for cell in header.strip("|").split("|")]
    assert names == ["model head", "top1", "balanced_acc", "macro_f1", "head classes", "medium classes",
                     "tail classes"]
    assert rule.count("---") == len(names)
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["logits", "50.00", "40.00", "30.00", "90.00",
                                                                     "20.00", "10.00"]


def test_bad_requests_name_what_exists(acr_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has heads \['logits', 'logits_balanced'\]"):
        evaluate_checkpoint(acr_run, heads=["projection"])
    with pytest.raises(FileNotFoundError, match=r"best\.pt does not exist.*latest\.pt"):
        evaluate_checkpoint(acr_run, checkpoint="best")
    with pytest.raises(ValueError, match="holds 2 replica"):
        evaluate_checkpoint(acr_run, replica=2)
    with pytest.raises(ValueError, match="no validation split"):
        evaluate_checkpoint(acr_run, split="val")
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        evaluate_checkpoint(tmp_path)
