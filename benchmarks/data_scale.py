"""Data at scale: what a rank pays for a larger prepared corpus.

For each size (default 0.5 GB and 4 GB) it generates a JSON lines corpus from the embedded corpus
(the Python stdlib sources, each file one document, numbered so that no two documents are equal),
prepares it with ``python -m bltdist.data prepare``, trains 10 steps on it with 2 processes
(``torchrun``, configs/tiny_static.yaml) and serves batches from it with 2 loader processes. It
reports, per size:

- ``prepare_mb_per_s``: input megabytes per second of the prepare command (``--workers`` processes);
- ``train.seconds_to_first_step``: from launching torchrun to rank 0's first step line, the fastest
  of ``--train-repeats`` runs made in turn with the other sizes (the machine's load varies);
- ``train.peak_rss_gb_per_rank``: each training rank's peak resident memory (summary.json), and
  ``train.peak_rss_anon_gb_per_rank``: the largest anonymous part of it sampled every 0.1 s (resident
  memory also counts the pages of memory-mapped shards a rank has read: page cache, shared
  between the ranks of a node and given back under memory pressure);
- after reading every shard once (``loader.warm_up``: the loaders' own cost is timed, not the
  disk's; a corpus larger than memory is read at the storage's rate),
  ``loader.bytes_per_s_per_rank`` (wall time), ``loader.bytes_per_cpu_s_per_rank`` (the rate with a
  core to itself: on a shared machine the wall-time rate says more about the other jobs),
  ``loader.peak_rss_gb_per_rank`` and ``loader.rss_anon_gb_per_rank`` (at the end): two processes, as dp ranks 0 and 1, each serving its micro-batches from the
  training split for ``--loader-seconds``, at the tiny config's shapes (512 x 4) and at a
  long-sequence shape (4096 x 8).

and checks the issue's targets: peak memory per rank within 100 MB between the sizes, seconds to
the first step within 10%, loader at least 50 MB/s per rank.

    python benchmarks/data_scale.py [--sizes-gb 0.5 4] [--workers 2] [--work-dir /tmp/data_scale]

Corpora and prepared directories live under --work-dir (the generated files are deleted once
prepared, the prepared directories at the end; --keep keeps them). Writes benchmarks/results/data_scale-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from results import REPO, write_results

FILE_BYTES = 128 * 2**20  # bytes per generated JSON lines file
TRAIN_STEPS = 10
LOADER_SHAPES = ((512, 4), (4096, 8))  # (seq_len, micro_batch_size): configs/tiny_static.yaml's, and a long one
TARGETS = {"memory_difference_mb": 100, "startup_difference": 0.10, "loader_mb_per_s_per_rank": 50}


def generate_corpus(directory: Path, size_bytes: int) -> int:
    """JSON lines files of stdlib sources until ``size_bytes``; returns the bytes written."""
    from bltdist.data import load_documents

    escaped = [json.dumps(text.decode("utf-8", "replace"))[1:-1] for _, text in load_documents(None)]
    directory.mkdir(parents=True, exist_ok=True)
    written, copy, part = 0, 0, 0
    while written < size_bytes:
        lines, file_bytes = [], 0
        while file_bytes < FILE_BYTES and written + file_bytes < size_bytes:
            line = f'{{"text": "# copy {copy}\\n{escaped[copy % len(escaped)]}"}}\n'.encode()
            lines.append(line)
            file_bytes += len(line)
            copy += 1
        (directory / f"part-{part:05d}.jsonl").write_bytes(b"".join(lines))
        written, part = written + file_bytes, part + 1
    return written


def run_prepare(corpus: Path, out: Path, workers: int) -> dict:
    command = [sys.executable, "-m", "bltdist.data", "prepare", str(corpus), "--out", str(out),
               "--workers", str(workers)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    input_bytes = sum(f.stat().st_size for f in corpus.iterdir())
    return {"seconds": seconds, "input_bytes": input_bytes, "documents": manifest["documents"],
            "document_bytes": manifest["bytes"], "shards": len(manifest["shards"]),
            "prepare_mb_per_s": input_bytes / seconds / 1e6}  # fmt: skip


def memory_kb(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmHWM, RssAnon, ...); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class AnonymousMemorySampler:
    """The largest RssAnon of each child of ``parent`` (the ranks torchrun starts), sampled every 0.1 s."""

    def __init__(self, parent: int):
        self.parent, self.peaks, self._stop = parent, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                children = Path(f"/proc/{self.parent}/task/{self.parent}/children").read_text().split()
            except OSError:
                continue
            for child in children:
                self.peaks[int(child)] = max(self.peaks.get(int(child), 0), memory_kb(child, "RssAnon"))

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return [kb / 1e6 for _, kb in sorted(self.peaks.items())]  # GB, by pid: rank order as torchrun starts them


def run_training(prepared: Path, output_dir: Path) -> dict:
    """10 steps with 2 processes; the time to rank 0's first step line and each rank's peak RSS."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "bltdist.train", "configs/tiny_static.yaml", f"--data.path={prepared}", f"--output_dir={output_dir}",
               f"--train.steps={TRAIN_STEPS}", "--logging.interval=1", "--train.val_interval=0",
               "--train.val_batches=1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    first_step = None
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        sampler = AnonymousMemorySampler(run.pid)
        for line in run.stdout:
            if first_step is None and line.startswith("step ") and f"/{TRAIN_STEPS}" in line:
                first_step = time.perf_counter() - start
        stderr = run.stderr.read()
        anonymous = sampler.stop()
    if run.returncode != 0:
        raise RuntimeError(f"training on {prepared} failed:\n{stderr[-4000:]}")
    summary = json.loads((output_dir / "summary.json").read_text())
    return {"seconds_to_first_step": first_step, "seconds_total": time.perf_counter() - start,
            "peak_rss_gb_per_rank": summary["peak_memory_gb_per_rank"], "peak_rss_anon_gb_per_rank": anonymous,
            "step_time_breakdown": summary["step_time_breakdown"]}  # fmt: skip


def serve_batches(prepared: str, rank: int, seq_len: int, micro_batch_size: int, seconds: float) -> None:
    """Loader worker (one dp rank of 2): prints its bytes/s and peak RSS as JSON."""
    from bltdist.config import DataConfig
    from bltdist.data import PackedByteLoader, build_sources

    start = time.perf_counter()
    train, _ = build_sources(DataConfig(path=prepared))
    loader = PackedByteLoader(train, seq_len, micro_batch_size, dp_rank=rank, dp_size=2, seed=0)
    startup = time.perf_counter() - start
    loader.next_batch()
    batches, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        batches += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    served = batches * micro_batch_size * seq_len
    print(json.dumps({"bytes_per_s": served / elapsed, "bytes_per_cpu_s": served / cpu, "startup_s": startup,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "rss_anon_gb": memory_kb("self", "RssAnon") / 1e6}))  # fmt: skip


def read_shards(prepared: Path) -> dict:
    """Read every shard once, so that the loaders are timed on a corpus in the page cache (their own
    cost, not the disk's); returns the sequential read rate."""
    start, size = time.perf_counter(), 0
    for shard in sorted(prepared.glob("shard-*.bytes")):
        with open(shard, "rb") as handle:
            while chunk := handle.read(64 * 2**20):
                size += len(chunk)
    return {"bytes": size, "read_mb_per_s": size / (time.perf_counter() - start) / 1e6}


def run_loaders(prepared: Path, seconds: float) -> dict:
    figures = {"warm_up": read_shards(prepared)}
    for seq_len, micro_batch_size in LOADER_SHAPES:
        command = [sys.executable, __file__, "--serve", str(prepared), "--loader-seconds", str(seconds),
                   "--loader-shape", str(seq_len), str(micro_batch_size)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        ranks = [subprocess.Popen([*command, "--serve-rank", str(rank)], stdout=subprocess.PIPE, text=True, env=env)
                 for rank in range(2)]  # fmt: skip
        results = [json.loads(rank.communicate()[0].splitlines()[-1]) for rank in ranks]
        figures[f"{seq_len}x{micro_batch_size}"] = {
            "bytes_per_s_per_rank": [r["bytes_per_s"] for r in results],
            "bytes_per_cpu_s_per_rank": [r["bytes_per_cpu_s"] for r in results],
            "startup_s_per_rank": [r["startup_s"] for r in results],
            "peak_rss_gb_per_rank": [r["peak_rss_gb"] for r in results],
            "rss_anon_gb_per_rank": [r["rss_anon_gb"] for r in results],
        }
    return figures


def measure(sizes_gb: list[float], args: argparse.Namespace) -> list[dict]:
    """Prepare every size, then train on them in turn ``--train-repeats`` times (the machine's load
    changes: the fastest start of each size is kept), then serve batches from each."""
    works = [Path(args.work_dir) / f"{size:g}gb" for size in sizes_gb]
    points = [{"size_gb": size} for size in sizes_gb]
    try:
        for point, work in zip(points, works):
            shutil.rmtree(work, ignore_errors=True)
            generated = generate_corpus(work / "corpus", int(point["size_gb"] * 1e9))
            point["prepare"] = run_prepare(work / "corpus", work / "prepared", args.workers)
            shutil.rmtree(work / "corpus")  # the prepared copy is all that is read from here on
            print(f"data_scale: {generated / 1e9:.2f} GB generated and prepared: {point['prepare']}", flush=True)
        for repeat in range(args.train_repeats):
            for point, work in zip(points, works):
                run = run_training(work / "prepared", work / f"run{repeat}")
                print(f"data_scale: {point['size_gb']:g} GB trained: {run}", flush=True)
                point.setdefault("train_runs", []).append(run)
        for point, work in zip(points, works):
            runs = point["train_runs"]
            point["train"] = {
                "seconds_to_first_step": min(run["seconds_to_first_step"] for run in runs),
                **{key: [max(values) for values in zip(*(run[key] for run in runs))]
                   for key in ("peak_rss_gb_per_rank", "peak_rss_anon_gb_per_rank")},
            }  # fmt: skip
            point["loader"] = run_loaders(work / "prepared", args.loader_seconds)
            print(f"data_scale: {point['size_gb']:g} GB loader: {point['loader']}", flush=True)
        return points
    finally:
        if not args.keep:
            for work in works:
                shutil.rmtree(work, ignore_errors=True)


def targets(points: list[dict]) -> dict:
    """The issue's targets between the smallest and the largest size (the differences only with two sizes or more)."""
    result = {} if len(points) < 2 else differences(points[0], points[-1])
    for seq_len, micro_batch_size in LOADER_SHAPES:  # the slowest rank of any size, per shape
        shape = f"{seq_len}x{micro_batch_size}"
        for kind in ("bytes_per_s_per_rank", "bytes_per_cpu_s_per_rank"):
            slowest = min(rate for point in points for rate in point["loader"][shape][kind]) / 1e6
            result[f"loader_{kind.replace('bytes', 'mb')}_{shape}"] = {
                "measured": slowest, "target": TARGETS["loader_mb_per_s_per_rank"],
                "met": slowest >= TARGETS["loader_mb_per_s_per_rank"]}  # fmt: skip
    return result


def differences(small: dict, large: dict) -> dict:
    memory = max(abs(b - a) for a, b in zip(small["train"]["peak_rss_gb_per_rank"], large["train"]["peak_rss_gb_per_rank"]))
    anonymous = max(abs(b - a) for a, b in zip(small["train"]["peak_rss_anon_gb_per_rank"],
                                               large["train"]["peak_rss_anon_gb_per_rank"]))  # fmt: skip
    startup = abs(large["train"]["seconds_to_first_step"] / small["train"]["seconds_to_first_step"] - 1)
    return {
        "memory_difference_mb": {"measured": memory * 1e3, "target": TARGETS["memory_difference_mb"],
                                 "met": memory * 1e3 <= TARGETS["memory_difference_mb"]},
        "anonymous_memory_difference_mb": {"measured": anonymous * 1e3, "target": TARGETS["memory_difference_mb"],
                                           "met": anonymous * 1e3 <= TARGETS["memory_difference_mb"]},
        "startup_difference": {"measured": startup, "target": TARGETS["startup_difference"],
                               "met": startup <= TARGETS["startup_difference"]},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 4.0], help="corpus sizes, smallest first")
    parser.add_argument("--workers", type=int, default=2, help="prepare --workers")
    parser.add_argument("--work-dir", default="/tmp/data_scale", help="where corpora are generated and prepared")
    parser.add_argument("--loader-seconds", type=float, default=5.0, help="seconds each loader process serves")
    parser.add_argument("--train-repeats", type=int, default=2, help="training runs per size (the fastest start is kept)")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora and prepared directories")
    parser.add_argument("--results-dir", default=None, help="default benchmarks/results")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # loader worker mode
    parser.add_argument("--serve-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--loader-shape", type=int, nargs=2, default=LOADER_SHAPES[0], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_batches(args.serve, args.serve_rank, *args.loader_shape, args.loader_seconds)
        return
    points = measure(sorted(args.sizes_gb), args)
    config = {"sizes_gb": sorted(args.sizes_gb), "workers": args.workers, "train_config": "configs/tiny_static.yaml",
              "train_steps": TRAIN_STEPS, "train_repeats": args.train_repeats, "processes": 2,
              "loader_shapes": [list(s) for s in LOADER_SHAPES],
              "loader_seconds": args.loader_seconds, "cpus": os.cpu_count(),
              "note": "shared 2-core machine, other jobs running: rates are lower bounds"}  # fmt: skip
    path = write_results("data_scale", "cpu", config, {"points": points, "targets": targets(points)},
                         results_dir=args.results_dir)  # fmt: skip
    print(f"data_scale: results written to {path}")


if __name__ == "__main__":
    main()
