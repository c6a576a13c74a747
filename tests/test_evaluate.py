"""Evaluation on several processes, and on the held-out rows training validates on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bltdist.data import build_datasets
from bltdist.evaluate import NOISE_KINDS, Evaluator, Share, held_out_rows, packed_rows
from bltdist.evaluate import main as evaluate_main
from bltdist.generate import load_for_generation
from test_generate import PATCHINGS, save_blt, save_entropy_model
from test_train import SMALL, read_metrics, run_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("bpb", "avg_patch_len", "flops_per_byte", *(f"bpb_{kind}" for kind in NOISE_KINDS))


def write_corpus(directory: Path, documents: int = 12) -> Path:
    """Documents of different lengths and kinds, so that rows start mid-document and cross documents."""
    directory.mkdir(parents=True)
    for i in range(documents):
        text = f"document {i}: the quick brown fox jumps over the lazy dog {i * i}\n" * (1 + i % 4)
        (directory / f"doc{i:02d}.txt").write_text(text + "caf\u00e9, na\u00efve \u2014 r\u00e9sum\u00e9\n" * (i % 3))
    return directory


def assert_same_figures(observed: dict, expected: dict) -> None:
    assert observed.keys() == expected.keys()
    for name in expected:
        assert observed[name]["tokens"] == expected[name]["tokens"], name
        for figure in FIGURES:  # equal up to the order of float summation
            assert observed[name][figure] == pytest.approx(expected[name][figure], rel=1e-6), (name, figure)


@pytest.mark.parametrize("split", ["all", "heldout"])
def test_rank_shares_add_up_to_the_whole(split, tmp_path):
    """Row i to rank i % N: the ranks' sums are the single process's, whatever the batch size."""
    entropy_dir = save_entropy_model(tmp_path / "entropy")
    model, patching, entropy_model = load_for_generation(save_blt(tmp_path / "model", PATCHINGS["entropy_global"],
                                                                  entropy_dir))  # fmt: skip
    evaluator = Evaluator(model, patching, entropy_model, 24, torch.device("cpu"))
    documents = [f"row {i}: {'abc ' * i}\n".encode() for i in range(9)]

    def sums(share: Share, batch_size: int) -> dict:
        if split == "heldout":  # 30 rows of 24: more than the documents hold, so the stream wraps round
            return evaluator.sums(held_out_rows(documents, 24, 30, entropy_model, share, batch_size, seed=0))
        return evaluator.sums(packed_rows(documents, 24, entropy_model, share, batch_size))

    whole = sums(Share(), batch_size=4)
    shares = [sums(Share(rank, 3), batch_size=batch) for rank, batch in ((0, 2), (1, 5), (2, 1))]
    assert sum(share["tokens"] for share in shares) == whole["tokens"] and all(share["tokens"] for share in shares)
    assert sum(share["patches"] for share in shares) == whole["patches"]
    assert sum(share["loss"] for share in shares) == pytest.approx(whole["loss"], rel=1e-6)
    if split == "heldout":
        assert whole["tokens"] == 30 * 24


def run_evaluate(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "bltdist.evaluate", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(tmp_path):
    entropy_dir = save_entropy_model(tmp_path / "entropy")
    model_dir = save_blt(tmp_path / "model", PATCHINGS["entropy_monotonic"], entropy_dir)
    prose = write_corpus(tmp_path / "prose")
    (tmp_path / "code.py").write_text("def f(x):\n    return x * 2  # twice\n" * 7)
    for split, rows in (("all", []), ("heldout", ["--val-batches", "5"])):
        common = [str(model_dir), "--data", str(prose), "--data", f"code={tmp_path / 'code.py'}", "--seq-len", "40",
                  "--batch-size", "3", "--split", split, *rows]  # fmt: skip
        single = run_evaluate([*common, "--out", str(tmp_path / f"single_{split}.json")], nproc=1)
        assert single.returncode == 0, single.stderr
        double = run_evaluate([*common, "--out", str(tmp_path / f"double_{split}.json")], nproc=2)
        assert double.returncode == 0, double.stderr
        assert double.stdout.count('{"model_dir"') == 1 and double.stdout.count("source ") == 1  # rank 0 alone
        expected = json.loads((tmp_path / f"single_{split}.json").read_text())
        observed = json.loads((tmp_path / f"double_{split}.json").read_text())
        assert json.loads(double.stdout.splitlines()[-1]) == observed
        assert_same_figures(observed["sources"], expected["sources"])
        assert {key: value for key, value in observed.items() if key != "sources"} == {
            key: value for key, value in expected.items() if key != "sources"
        }


def test_held_out_split_gives_the_trainers_val_bpb(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", documents=16)
    out = tmp_path / "run"
    # Six global batches of 4 x 64 bytes: more than the held-out documents, so the stream wraps round.
    args = [*SMALL, "--train.val_batches=6", "--patching.mode=space", "--data.val_fraction=0.25",
            f"--data.path={corpus}", f"--output_dir={out}"]  # fmt: skip
    result = run_trainer(args)
    assert result.returncode == 0, result.stderr
    final = [record for record in read_metrics(out) if "val_bpb" in record][-1]
    assert final["step"] == 3
    evaluate_main([str(out / "model"), "--data", str(corpus), "--split", "heldout", "--batch-size", "5"])
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    figures = summary["sources"]["corpus"]
    assert figures["tokens"] == 6 * 4 * 64 > build_datasets(str(corpus), "text", 0.25)[1].token_lengths.sum()
    assert figures["bpb"] == pytest.approx(final["val_bpb"], rel=1e-6)


def test_val_batches_without_the_held_out_split_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(tmp_path), "--data", str(tmp_path), "--val-batches", "2"])
    assert exit_info.value.code == 2 and "--split heldout" in capsys.readouterr().err
