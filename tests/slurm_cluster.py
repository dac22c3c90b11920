"""A real single-node Slurm cluster for the tests: munge, slurmctld and slurmd (Debian's slurm-wlm) on
this machine, started as root in a temporary directory and shut down after the session. Where it
cannot be started (not root, the packages missing: `.ci/run` installs them), the fixture skips with
the reason."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
CONF = """ClusterName=sslimwa_test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: how long a job credential lives, and so how long Slurm holds a requeued job back before
# starting it again (while slurmd still refuses the revoked credential of its previous run). 120 s by
# default; the requeue tests would wait that long.
AuthInfo=socket={munge_socket},cred_expire=15
# Look for startable jobs every 2 s (60 s and 30 s by default), so a requeued job starts once it may.
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=30
FirstJobId={first_job_id}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does it as root)"
    return None


def _munge_works(socket_path: Path) -> bool:
    encoded = subprocess.run(["munge", "-n", "-S", str(socket_path)], capture_output=True, check=False)
    return encoded.returncode == 0 and subprocess.run(["unmunge", "-S", str(socket_path)], input=encoded.stdout,
                                                      capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def _private_munged() -> Iterator[Path]:
    """A munged of the cluster's own (its key, socket, pid and log files in one directory), run as root.

    Not the machine's munged: that one's state depends on how the package was installed (apt may have
    started it as root, leaving root-owned logs that the munge user's daemon then refuses), and sharing
    it would let a stale daemon decide whether the tests run. munged wants every directory above its
    socket searchable by all, hence a 0755 directory in /tmp rather than pytest's 0700 tree."""
    folder = Path(tempfile.mkdtemp(prefix="ssl-imwa-munge-", dir="/tmp"))
    folder.chmod(0o755)
    key, socket_path, log = folder / "munge.key", folder / "munge.socket", folder / "munged.log"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    try:
        started = subprocess.run(["munged", f"--key-file={key}", f"--socket={socket_path}",
                                  f"--pid-file={folder / 'munged.pid'}", f"--log-file={log}",
                                  f"--seed-file={folder / 'munged.seed'}"],
                                 capture_output=True, text=True, check=False)
        if started.returncode != 0:
            raise RuntimeError(f"munged did not start (exit {started.returncode}): {started.stderr.strip()}")
        deadline = time.monotonic() + 20
        while not _munge_works(socket_path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged started but munge -n | unmunge fails; {log} ends:\n"
                                   f"{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield socket_path
    finally:
        subprocess.run(["munged", "--stop", f"--socket={socket_path}"], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def _node_idle(env: dict[str, str]) -> bool:
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, check=False)
    return state.returncode == 0 and state.stdout.strip() == "idle"


def _cancel_every_job(env: dict[str, str], wait_s: float = 60) -> None:
    """Cancel the cluster's jobs and wait until none is left, so that no job step outlives the cluster."""
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, check=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, check=False)
        if queue.returncode != 0 or not queue.stdout.strip():
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment (SLURM_CONF) under which sbatch, squeue and submitit talk to the test cluster."""
    reason = _why_not()
    if reason:
        pytest.skip(f"no Slurm cluster: {reason}")
    with _private_munged() as munge_socket:
        yield from _running_cluster(tmp_path_factory.mktemp("slurm"), munge_socket)


def _running_cluster(root: Path, munge_socket: Path) -> Iterator[dict[str, str]]:
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    memory_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.8)
    # Job ids of its own: a slurmd refuses a job whose id a step daemon left by an earlier cluster still holds.
    first_job_id = int(time.time()) % 50_000_000 + 1000
    (root / "slurm.conf").write_text(CONF.format(host=socket.gethostname(), root=root, cpus=os.cpu_count(),
                                                 first_job_id=first_job_id, munge_socket=munge_socket,
                                                 memory_mb=memory_mb, ctld_port=_free_port(),
                                                 slurmd_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["slurmctld", "-i"], env=env, check=True)
    subprocess.run(["slurmd"], env=env, check=True)
    deadline = time.monotonic() + 60
    while not _node_idle(env):
        if time.monotonic() > deadline:
            log = (root / "slurmctld.log").read_text()[-2000:] if (root / "slurmctld.log").exists() else ""
            raise RuntimeError(f"the test cluster's node is not idle after 60 s; slurmctld.log ends:\n{log}")
        time.sleep(0.5)
    try:
        yield env
    finally:
        _cancel_every_job(env)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, check=False)
        for name in ("slurmd.pid", "slurmctld.pid"):
            pid_file = root / name
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass
