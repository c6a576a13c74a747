"""A real single-node Slurm for the tests: munged, slurmctld and slurmd started from a slurm.conf
written for this machine under a temporary directory, stopped by their process ids afterwards.

Needs Debian's `slurm-wlm` and `munge` (`apt-get install slurm-wlm munge`; `.ci/run` installs them
when it runs as root). The daemons run as the current user, and so do the jobs."""

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
# Debian installs the daemons in /usr/sbin, which is not on every user's PATH.
DAEMON_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# A requeued job waits this long before it may start again (AuthInfo cred_expire, Slurm's
# default 120 s); short, so that the requeue tests do not wait two minutes each.
REQUEUE_DELAY = 10
STARTUP_TIMEOUT = 120
STOP_TIMEOUT = 60


def missing_daemons() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name, path=DAEMON_PATH) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_line(node: str) -> str:
    """This machine as slurmd sees it (CPUs, sockets, cores, threads), with little memory so that
    no request is refused for memory: `slurmd -C` prints `NodeName=... CPUs=... RealMemory=...`."""
    slurmd = shutil.which("slurmd", path=DAEMON_PATH)
    hardware = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=60, check=True).stdout
    line = next(line for line in hardware.splitlines() if line.startswith("NodeName="))
    line = re.sub(r"NodeName=\S+", f"NodeName={node} NodeAddr=127.0.0.1", line)
    return re.sub(r"RealMemory=\d+", "RealMemory=500", line)


def slurm_conf(root: Path, node: str, user: str) -> str:
    return f"""\
ClusterName=bltdist-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={REQUEUE_DELAY}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked by parent pid (torchrun runs in a session of its own, which
# proctrack/pgid would lose), tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# The whole queue is looked at every 2 s (default 60): a requeued job's delay ends without an event
# that would start it, so it would wait for this loop.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` for 10 minutes: there is no accounting database.
MinJobAge=600
# Slurm's defaults, stated because the tests and the README rely on them: after scancel, a requeue
# or the time limit, processes get SIGTERM and KillWait seconds later SIGKILL.
KillWait=30
JobRequeue=1
{node_line(node)} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Starts the daemons in the foreground as children of this process; `stop` ends them by pid."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.job_ids: list[int] = []

    def client_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """env (default: this process's environment) for a Slurm client, and so for a submitted job:
        this cluster's conf, no SLURM_* of a Slurm job that pytest itself may run in."""
        base = {k: v for k, v in (os.environ if env is None else env).items() if not k.startswith("SLURM_")}
        return {**base, "SLURM_CONF": str(self.conf)}

    def client(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=check, env=self.client_env())

    def start(self) -> None:
        for name in ("munge", "state", "spool"):
            (self.root / name).mkdir()
        # munged refuses a socket directory that not everyone may enter (clients of any user connect).
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(slurm_conf(self.root, self.node, getpass.getuser()))
        munge = self.root / "munge"
        self._start("munged", ["--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                               f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                               f"--seed-file={munge}/munged.seed"])  # fmt: skip
        self._wait(lambda: (munge / "munge.socket").exists(), "munged's socket")
        self._start("slurmctld", ["-D", "-f", str(self.conf)])
        self._start("slurmd", ["-D", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self.node_state() == "idle", f"node {self.node} idle in sinfo")

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.root / f"{name}.stderr", "w") as log:
            self.daemons[name] = subprocess.Popen([shutil.which(name, path=DAEMON_PATH), *args], stdout=log,
                                                  stderr=subprocess.STDOUT, env=self.client_env())  # fmt: skip

    def _wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not condition():
            exited = [name for name, proc in self.daemons.items() if proc.poll() is not None]
            if exited or time.monotonic() > deadline:
                reason = f"{', '.join(exited)} exited" if exited else f"not within {STARTUP_TIMEOUT} s"
                raise RuntimeError(f"Slurm did not start ({what}: {reason}):\n{self.logs()}")
            time.sleep(0.5)

    def node_state(self) -> str:
        result = self.client("sinfo", "--noheader", "--format=%T", f"--nodes={self.node}", check=False)
        return result.stdout.strip()

    def logs(self) -> str:
        files = [*sorted(self.root.glob("*.log")), *sorted(self.root.glob("*.stderr")), self.root / "munge/munged.log"]
        return "\n".join(f"--- {f.name}:\n{f.read_text()[-3000:]}" for f in files if f.is_file())

    def submit(self, args: list[str], env: dict[str, str], cwd: Path) -> int:
        """sbatch ARGS from cwd (the job's SLURM_SUBMIT_DIR) with env, which the job gets; its id."""
        command = ["sbatch", "--parsable", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                                env=self.client_env(env), cwd=cwd)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        job_id = int(result.stdout.split(";")[0])
        self.job_ids.append(job_id)
        return job_id

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, ExitCode, Restarts, Reason, RunTime, ..."""
        result = self.client("scontrol", "--oneliner", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def cancel_all(self) -> None:
        """Cancels the jobs submitted here and waits until none of them has processes left."""
        for job_id in self.job_ids:
            self.client("scancel", str(job_id), check=False)
        deadline = time.monotonic() + STOP_TIMEOUT + 30  # KillWait, then SIGKILL
        while any(self.job(job_id)["JobState"] in ("RUNNING", "COMPLETING") for job_id in self.job_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs {self.job_ids} did not end after scancel:\n{self.logs()}")
            time.sleep(1)
        self.job_ids.clear()

    def stop(self) -> None:
        """Ends the daemons by their pids, slurmd first (munged last: the others talk through it)."""
        for name in reversed(DAEMONS):
            proc = self.daemons.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
