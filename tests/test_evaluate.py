"""Evaluation on several processes, on the held-out rows training validates on, per group of files, and
training's evaluation sets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bltdist.data import build_datasets
from bltdist.evaluate import NOISE_KINDS, Evaluator, Share, document_group, first_rows, packed_rows
from bltdist.evaluate import main as evaluate_main
from bltdist.generate import load_for_generation
from bltdist.patching.rules import FLEX_BUCKET_BITS, patch_count_bucket
from test_generate import PATCHINGS, save_blt, save_entropy_model
from test_train import SMALL, read_metrics, run_trainer
from processes import launcher, side_by_side

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
            return evaluator.sums(first_rows(documents, 24, 30, entropy_model, share, batch_size, seed=0))
        return evaluator.sums(packed_rows(documents, 24, entropy_model, share, batch_size))

    whole = sums(Share(), batch_size=4)
    shares = [sums(Share(rank, 3), batch_size=batch) for rank, batch in ((0, 2), (1, 5), (2, 1))]
    assert sum(share["tokens"] for share in shares) == whole["tokens"] and all(share["tokens"] for share in shares)
    assert sum(share["patches"] for share in shares) == whole["patches"]
    assert sum(share["loss"] for share in shares) == pytest.approx(whole["loss"], rel=1e-6)
    if split == "heldout":
        assert whole["tokens"] == 30 * 24


def test_flex_evaluation_buckets_patch_counts_and_keeps_the_figures(tmp_path):
    """Where the global attention is compiled FlexAttention (here: CPU without gradients), evaluation
    pads patch counts to FLEX_BUCKET_BITS buckets with inert patches: the figures stay SDPA's."""
    model, patching, _ = load_for_generation(save_blt(tmp_path / "model", PATCHINGS["static"]))
    documents = [f"row {i}: {'abc ' * i} x\n".encode() for i in range(40)]
    patch_counts = []
    model.register_forward_pre_hook(lambda _, args: patch_counts.append(args[1].shape[1]))
    sdpa = Evaluator(model, patching, None, 120, torch.device("cpu"))
    expected = sdpa.sums(packed_rows(documents, 120, None, Share(), 2))
    model.attention_backend = "flex"
    flex = Evaluator(model, patching, None, 120, torch.device("cpu"))
    sdpa_counts, patch_counts[:] = patch_counts[:], []
    observed = flex.sums(packed_rows(documents, 120, None, Share(), 2))
    assert (sdpa.bucket_bits, flex.bucket_bits) == (None, FLEX_BUCKET_BITS)
    assert patch_counts == [patch_count_bucket(count, 1, FLEX_BUCKET_BITS) for count in sdpa_counts] != sdpa_counts
    assert observed["tokens"] == expected["tokens"] and observed["patches"] == expected["patches"]
    assert observed["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def run_evaluate(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *launcher(nproc), "-m", "bltdist.evaluate", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(tmp_path):
    entropy_dir = save_entropy_model(tmp_path / "entropy")
    model_dir = save_blt(tmp_path / "model", PATCHINGS["entropy_monotonic"], entropy_dir)
    prose = write_corpus(tmp_path / "prose")
    (tmp_path / "code.py").write_text("def f(x):\n    return x * 2  # twice\n" * 7)
    splits = {"all": [], "heldout": ["--val-batches", "5"]}
    runs = [([str(model_dir), "--data", str(prose), "--data", f"code={tmp_path / 'code.py'}", "--seq-len", "40",
              "--batch-size", "3", "--split", split, *rows, "--out", str(tmp_path / f"{name}_{split}.json")], nproc)
            for split, rows in splits.items() for name, nproc in (("single", 1), ("double", 2))]  # fmt: skip
    results = side_by_side(run_evaluate, *runs)
    for split, single, double in zip(splits, results[0::2], results[1::2]):
        assert single.returncode == 0, single.stderr
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


# Two suffixes crossed with two directories: every group by suffix spans both directories and back.
GROUPED_FILES = {
    "lib/a.py": "def twice(x):\n    return x * 2  # doubled\n" * 3,
    "lib/b.txt": "notes on the library: caf\u00e9, na\u00efve\n" * 2,
    "web/c.txt": "the quick brown fox jumps over the lazy dog\n" * 4,
    "web/d.py": "import sys\nprint(sys.argv[1:])\n" * 2,
    "web/e.py": "for i in range(3):\n    print(i)\n",
}


def write_grouped_corpus(directory: Path, relpaths=GROUPED_FILES) -> Path:
    for relpath in relpaths:
        (directory / relpath).parent.mkdir(parents=True, exist_ok=True)
        (directory / relpath).write_text(GROUPED_FILES[relpath])
    return directory


def test_document_groups_come_from_keys():
    assert document_group("lib/a.py", "suffix") == ".py" and document_group("lib/a.py", "directory") == "lib"
    assert document_group("web/rows.jsonl.gz:12", "suffix") == ".jsonl"
    assert document_group("web/x/t.parquet:0", "directory") == "web"
    assert document_group("top.txt", "directory") == "." and document_group("README", "suffix") == "none"
    assert document_group("lib/time:12", "suffix") == "none"  # a colon in a plain file's name, not a line


def test_each_groups_figures_are_its_files_evaluated_alone(tmp_path):
    model_dir = save_blt(tmp_path / "model", PATCHINGS["space"])
    corpus = write_grouped_corpus(tmp_path / "corpus")
    common = ["--seq-len", "24", "--batch-size", "3"]
    by_suffix = {".py": ["lib/a.py", "web/d.py", "web/e.py"], ".txt": ["lib/b.txt", "web/c.txt"]}
    by_directory = {"lib": ["lib/a.py", "lib/b.txt"], "web": ["web/c.txt", "web/d.py", "web/e.py"]}
    for group_by, groups in (("suffix", by_suffix), ("directory", by_directory)):
        evaluate_main([str(model_dir), "--data", f"code={corpus}", "--group-by", group_by, *common,
                       "--out", str(tmp_path / f"{group_by}.json")])  # fmt: skip
        source = json.loads((tmp_path / f"{group_by}.json").read_text())["sources"]["code"]
        assert source["groups"].keys() == groups.keys()
        assert sum(group["bytes"] for group in source["groups"].values()) == source["bytes"]
        # Each group's files alone, under their own relative paths (so in the same order).
        alone = [f"{group}={write_grouped_corpus(tmp_path / group_by / group, relpaths)}"
                 for group, relpaths in groups.items()]  # fmt: skip
        evaluate_main([str(model_dir), *(arg for data in alone for arg in ("--data", data)), *common,
                       "--out", str(tmp_path / f"{group_by}_alone.json")])  # fmt: skip
        expected = json.loads((tmp_path / f"{group_by}_alone.json").read_text())["sources"]
        assert_same_figures(source["groups"], expected)
        assert all(source["groups"][group]["bytes"] == expected[group]["bytes"] for group in groups)


def test_group_by_with_the_held_out_split_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(tmp_path), "--data", str(tmp_path), "--split", "heldout", "--group-by", "suffix"])
    assert exit_info.value.code == 2 and "per source only" in capsys.readouterr().err


EVAL_KEYS = ("bpb", *(f"bpb_{kind}" for kind in NOISE_KINDS))


def eval_set_run(tmp_path: Path, name: str, nproc: int = 1, layout: tuple = ()) -> list[dict]:
    """A 4-step run validating at steps 0, 2 and 4 with eval set "code"; its eval metric lines."""
    code = tmp_path / "code"
    if not code.exists():
        write_grouped_corpus(code)
        write_corpus(tmp_path / "corpus")
    out = tmp_path / name
    args = [*SMALL, "--train.steps=4", "--train.val_interval=2", "--patching.mode=space",
            f"--data.path={tmp_path / 'corpus'}", f"--output_dir={out}", f"--eval.sets=[{{name: code, path: {code}}}]",
            "--eval.batches=2", *layout]  # fmt: skip
    result = run_trainer(args, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return [record for record in read_metrics(out) if "eval/code/bpb" in record]


def test_eval_sets_are_scored_at_every_validation_as_evaluate_scores_them(tmp_path, capsys):
    lines = eval_set_run(tmp_path, "run")
    assert [line["step"] for line in lines] == [0, 2, 4]
    assert set(lines[-1]) == {"step", *(f"eval/code/{key}" for key in EVAL_KEYS)}
    # Two global batches of 4 rows: the same rows through bltdist.evaluate on the final model.
    evaluate_main([str(tmp_path / "run" / "model"), "--data", f"code={tmp_path / 'code'}", "--rows", "8",
                   "--batch-size", "3"])  # fmt: skip
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])["sources"]["code"]
    assert figures["tokens"] == 8 * 64
    for key in EVAL_KEYS:
        assert lines[-1][f"eval/code/{key}"] == pytest.approx(figures[key], rel=1e-6), key


@pytest.mark.slow
def test_eval_sets_on_two_data_parallel_ranks_give_the_figures_of_one(tmp_path):
    single = eval_set_run(tmp_path, "single")
    double = eval_set_run(tmp_path, "double", nproc=2, layout=("--parallel.dp_shard=2",))
    assert [line["step"] for line in double] == [0, 2, 4]
    for one, two in zip(single, double):
        assert two == pytest.approx(one, rel=1e-5)


def test_a_missing_eval_set_path_exits_2_naming_the_key(tmp_path):
    args = [*SMALL, f"--output_dir={tmp_path / 'run'}", f"--eval.sets=[{{name: code, path: {tmp_path / 'none'}}}]"]
    result = run_trainer(args)
    assert result.returncode == 2 and "eval.sets[0].path" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
