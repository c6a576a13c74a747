"""launch/slurm.sbatch under a real Slurm (tests/slurm_cluster.py starts one node on this machine):
a job that trains and writes its summary, scancel, scontrol requeue with an exact resume, the
time-limit warning (#SBATCH --signal=B:USR1@N) with the job requeueing itself, and submissions the
script refuses. Every job is 2 gloo processes meeting at 127.0.0.1; the jobs run one at a time."""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, missing_daemons
from test_launch import free_port, run_processes, trainer_processes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"
# A model small enough for a step of about 0.1-0.2 s on a loaded 2-core machine.
MODEL = [
    "--model.blt.local_dim=32", "--model.blt.local_heads=2", "--model.blt.encoder_layers=1",
    "--model.blt.decoder_layers=1", "--model.blt.global_dim=64", "--model.blt.global_heads=2",
    "--model.blt.global_layers=2", "--model.blt.hash_vocab=64", "--model.blt.local_window=16",
    "--model.blt.hash_ngram_sizes=[3,4]", "--model.blt.encoder_ffn_dim=64", "--model.blt.decoder_ffn_dim=64",
    "--model.blt.global_ffn_dim=128", "--patching.patch_size=3", "--train.seq_len=64",
    "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.val_batches=1", "--train.val_interval=0",
    "--logging.interval=1", "--optim.warmup_steps=2",
]  # fmt: skip
STEPS = 40  # the run that scontrol requeue interrupts after a few steps
LONG = 100000  # a run that only a signal ends
# Read by the scripts: a job gets them from the test only, never from the environment pytest runs in.
SCRIPT_SETTINGS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID", "RDZV_TIMEOUT",
                   "BLTDIST_ROOT", "BLTDIST_SHUTDOWN_GRACE", "BLTDIST_REQUEUE_ON_SIGNAL")  # fmt: skip
# The machine is loaded: starting two trainer processes can take a minute; every wait is bounded.
START_TIMEOUT = 300
END_TIMEOUT = 300
FINAL_STATES = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = missing_daemons()
    if missing:
        pytest.skip(f"needs Slurm ({', '.join(missing)} not found): apt-get install slurm-wlm munge")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.cancel_all()
        finally:
            cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster, with every job a test submitted cancelled and gone after the test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


class Job:
    """A job of launch/slurm.sbatch (or a copy of it) training into tmp_path/run."""

    def __init__(self, slurm: SlurmCluster, tmp_path: Path, overrides: list[str], options: list[str] | None = None,
                 env: dict[str, str] | None = None, script: Path = SCRIPT):  # fmt: skip
        self.slurm, self.out, self.log = slurm, tmp_path / "run", tmp_path / "job.out"
        job_env = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
        job_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NPROC_PER_NODE="2",
                       PYTHON=sys.executable, OMP_NUM_THREADS="1", **(env or {}))  # fmt: skip
        # append: a requeued job's second run adds to the first one's output instead of replacing it.
        args = [f"--output={self.log}", "--open-mode=append", *(options or []), str(script), *overrides,
                f"--output_dir={self.out}"]  # fmt: skip
        self.id = slurm.submit(args, job_env, cwd=REPO)

    def state(self) -> dict[str, str]:
        return self.slurm.job(self.id)

    def output(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def losses(self) -> dict[int, float]:
        """Per-step loss; a step logged again after a resume keeps its last value."""
        return {r["step"]: r["loss"] for r in self.metrics() if "loss" in r}

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in lines if line.endswith("}")]  # the last line may be half-written

    def wait(self, condition, what: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if condition(state):
                return state
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.id}: no {what} within {timeout} s; {_brief(state)}\n{self.output()[-4000:]}")
            time.sleep(0.5)

    def wait_for_steps(self, steps: int) -> None:
        def trained() -> bool:
            return len(self.losses()) >= steps

        self.wait(lambda state: trained() or state["JobState"] in FINAL_STATES, f"{steps} steps", START_TIMEOUT)
        assert trained(), f"job {self.id} ended before step {steps}:\n{self.output()[-4000:]}"

    def wait_for_end(self) -> dict[str, str]:
        """The job's final state, once its processes are gone."""
        return self.wait(lambda state: state["JobState"] in FINAL_STATES, "end", END_TIMEOUT)

    def signal_checkpoint(self) -> int:
        """The step of the first checkpoint the output says a stop signal made; its metadata is checked."""
        found = re.search(r"stopping on a signal: checkpoint of step (\d+) written", self.output())
        assert found, self.output()[-4000:]
        step = int(found.group(1))
        metadata = json.loads((self.out / "checkpoints" / f"step_{step}" / "metadata.json").read_text())
        assert metadata["step"] == step
        return step


def _brief(state: dict[str, str]) -> str:
    return " ".join(f"{key}={state.get(key)}" for key in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime"))


def assert_nothing_left_running(job: Job) -> None:
    assert run_processes(str(job.out)) == {}, f"processes of job {job.id} are left running"


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory) -> Job:
    """An uninterrupted job of STEPS steps."""
    job = Job(slurm_cluster, tmp_path_factory.mktemp("reference"), ["configs/tiny_static.yaml", *MODEL,
                                                                     f"--train.steps={STEPS}"])  # fmt: skip
    job.wait_for_end()
    return job


@pytest.mark.slow
def test_a_submitted_job_trains_and_writes_its_summary(reference):
    state = reference.wait_for_end()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), reference.output()[-4000:]
    summary = json.loads((reference.out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert sorted(reference.losses()) == list(range(1, STEPS + 1))
    assert "rendezvous at 127.0.0.1:" in reference.output()
    assert_nothing_left_running(reference)


@pytest.mark.slow
def test_scancel_ends_the_job_with_a_checkpoint(slurm, tmp_path):
    """scancel: SIGTERM to every process of the job (batch shell, srun, torchrun, trainers), SIGKILL
    KillWait (30 s) later; the trainer processes save before that."""
    job = Job(slurm, tmp_path, ["configs/tiny_static.yaml", *MODEL, f"--train.steps={LONG}"])
    job.wait_for_steps(1)
    slurm.client("scancel", str(job.id))
    state = job.wait_for_end()
    assert state["JobState"] == "CANCELLED", _brief(state)
    step = job.signal_checkpoint()
    assert (job.out / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    assert_nothing_left_running(job)


@pytest.mark.slow
def test_the_warning_signal_to_the_batch_shell_saves_and_completes(slurm, tmp_path):
    """What #SBATCH --signal=B:USR1@N does, sent at once: SIGUSR1 to the batch shell alone, which
    passes it through srun. It comes as soon as the trainer processes exist, before they can handle
    it (Slurm may send its warning that early): each gets it once its handler is installed, they
    save after the step in progress, and the job ends COMPLETED with the checkpoint."""
    job = Job(slurm, tmp_path, ["configs/tiny_static.yaml", *MODEL, f"--train.steps={LONG}"])

    def trainers_started() -> bool:
        return len(trainer_processes(str(job.out))) == 2

    job.wait(lambda state: trainers_started() or state["JobState"] in FINAL_STATES, "trainer processes", START_TIMEOUT)
    slurm.client("scancel", "--batch", "--signal=USR1", str(job.id))
    state = job.wait_for_end()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), _brief(state)
    job.signal_checkpoint()
    assert "slurm.sbatch: got SIGUSR1: asking every node to checkpoint" in job.output()
    assert "multi_node.sh: got SIGUSR1: asking the trainer processes" in job.output()
    assert "requeueing" not in job.output()
    assert_nothing_left_running(job)


@pytest.mark.slow
def test_scontrol_requeue_resumes_bitwise(reference, slurm, tmp_path):
    """--requeue, scontrol requeue after a few steps, --checkpoint.resume auto: the job saves, comes
    back after the requeue delay, resumes and ends with every loss equal to the uninterrupted run's."""
    job = Job(slurm, tmp_path, ["configs/tiny_static.yaml", *MODEL, f"--train.steps={STEPS}",
                                "--checkpoint.resume=auto"], options=["--requeue"])  # fmt: skip
    job.wait_for_steps(3)
    slurm.client("scontrol", "requeue", str(job.id))
    state = job.wait(lambda s: s["JobState"] in FINAL_STATES and s["Restarts"] == "1", "end after a requeue",
                     START_TIMEOUT + END_TIMEOUT)  # fmt: skip
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), _brief(state)
    step = job.signal_checkpoint()
    assert 3 <= step < STEPS
    assert f"resumed from {job.out / 'checkpoints' / f'step_{step}'} after step {step}" in job.output()
    assert job.losses() == reference.losses()  # bitwise: floats compared with ==
    assert_nothing_left_running(job)


def time_limited_script(tmp_path: Path, warning: int) -> Path:
    """launch/slurm.sbatch with the README's time-limit lines: a 1-minute limit (Slurm's shortest),
    SIGUSR1 to the batch shell `warning` seconds before it, and requeueing allowed."""
    lines = SCRIPT.read_text().splitlines(keepends=True)
    extra = f"#SBATCH --time=1\n#SBATCH --signal=B:USR1@{warning}\n#SBATCH --requeue\n"
    script = tmp_path / "time_limited.sbatch"
    script.write_text(lines[0] + extra + "".join(lines[1:]))
    return script


@pytest.mark.slow
def test_the_time_limit_warning_saves_and_requeues_the_job(slurm, tmp_path):
    """#SBATCH --time=1 --signal=B:USR1@40 --requeue with BLTDIST_REQUEUE_ON_SIGNAL=1: the warning
    comes within Slurm's 30-second check interval (here often before the trainer processes are
    ready: they get it once they can save), the run saves, the job requeues itself and its next run
    resumes from that checkpoint."""
    overrides = ["configs/tiny_static.yaml", *MODEL, f"--train.steps={LONG}", "--checkpoint.resume=auto"]
    job = Job(slurm, tmp_path, overrides, env={"BLTDIST_REQUEUE_ON_SIGNAL": "1"},
              script=time_limited_script(tmp_path, 40))  # fmt: skip

    def resumed() -> bool:
        return any(r.get("event") == "resume" for r in job.metrics())

    # The warning by about 30 s, the save, the requeue delay (10 s here), a new start.
    job.wait(lambda state: resumed() or state["JobState"] in FINAL_STATES, "resume", 2 * START_TIMEOUT)
    state = job.state()
    assert resumed(), f"{_brief(state)}\n{job.output()[-4000:]}"
    assert int(state["Restarts"]) >= 1 and state["JobState"] not in FINAL_STATES, _brief(state)
    step = job.signal_checkpoint()
    first_resume = next(r for r in job.metrics() if r.get("event") == "resume")
    assert first_resume["step"] == step and first_resume["from"] == str(job.out / "checkpoints" / f"step_{step}")
    output = job.output()
    assert "slurm.sbatch: got SIGUSR1: asking every node to checkpoint" in output
    assert f"slurm.sbatch: requeueing job {job.id} (BLTDIST_REQUEUE_ON_SIGNAL=1)" in output
    assert "DUE TO TIME LIMIT" not in output


@pytest.mark.parametrize(
    "options, args, message",
    [
        (["--ntasks-per-node=2", "--overcommit"], ["configs/tiny_static.yaml"], "the allocation has 2 tasks on 1"),
        ([], [], "missing config"),
        ([], ["configs/nonexistent.yaml"], "config configs/nonexistent.yaml does not exist"),
    ],
    ids=["two-tasks-per-node", "no-config", "missing-config"],
)
def test_a_job_the_script_cannot_run_fails_with_exit_code_2(slurm, tmp_path, options, args, message):
    job = Job(slurm, tmp_path, args, options=options)
    state = job.wait_for_end()
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), _brief(state)
    assert f"slurm.sbatch: error: {message}" in job.output()
    assert not job.out.exists()
