"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd on this machine.

Installs Debian's ``slurm-wlm`` and ``munge`` when they are missing (as root, through apt), writes a
``slurm.conf`` sized to this machine, starts the daemons on private ports with state in a temporary
directory, and waits until the node is idle. Every wait is bounded; on a failure the daemons' logs are
part of the error. The node advertises ``gpu`` GRES without devices, so scripts that request GPUs
(``--gpus-per-task``) are scheduled unchanged and run on the CPU.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
FAKE_GPUS = 2


class SlurmError(RuntimeError):
    pass


def _run(cmd: list[str], env: dict | None = None, timeout: float = 60, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return proc.stdout


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmError("slurm-wlm and munge are not installed and this user cannot apt-get them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env, timeout=600)
        _run(install, env=env, timeout=900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    env: dict = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    # --- lifecycle ------------------------------------------------------------------------------
    def write_config(self) -> None:
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
        ctl_port, d_port = _free_port(), _free_port()
        self.conf.write_text("\n".join([
            "ClusterName=videoar-test", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.root}/munge/munge.socket",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log", f"SlurmdLogFile={self.root}/log/slurmd.log",
            f"SlurmctldPort={ctl_port}", f"SlurmdPort={d_port}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "JobRequeue=1", "MpiDefault=none", "GresTypes=gpu", "KillWait=60",
            f"NodeName={self.host} CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{FAKE_GPUS} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            ""]))
        # GPU GRES backed by harmless device files: slurmd needs files to count GPUs.
        files = ",".join(["/dev/null", "/dev/zero", "/dev/full", "/dev/urandom"][:FAKE_GPUS])
        (self.root / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={files} Count={FAKE_GPUS}\n")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        self.write_config()
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run(["mungekey", "--create", "--force"], timeout=60)
        _run(["munged", "--force", f"--socket={self.root}/munge/munge.socket",
              f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/log/munged.log",
              f"--seed-file={self.root}/munge/seed"], timeout=30)
        _run(["slurmctld", "-f", str(self.conf)], env=self.env, timeout=30)
        _run(["slurmd", "-f", str(self.conf)], env=self.env, timeout=30)
        self.wait_for(lambda: "idle" in self.node_state(), timeout, "the node to become idle")
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = self.root / pidfile
            if path.is_file():
                try:
                    os.kill(int(path.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass
        time.sleep(1)

    # --- queries --------------------------------------------------------------------------------
    def node_state(self) -> str:
        return _run(["sinfo", "-h", "-o", "%T"], env=self.env, check=False).strip()

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            text = path.read_text(errors="replace")[-5000:] if path.is_file() else "(none)"
            parts.append(f"----- {name} -----\n{text}")
        return "\n".join(parts)

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        out = _run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, timeout=60)
        return out.strip().split(";")[0]

    def job_field(self, job_id: str, name: str) -> str:
        out = _run(["scontrol", "show", "job", job_id], env=self.env, check=False)
        for token in out.split():
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
        return ""

    def job_states(self, job_id: str) -> list[str]:
        """States of a job and its array tasks (sacct is unavailable without a database)."""
        out = _run(["scontrol", "-o", "show", "job", job_id], env=self.env, check=False)
        return [tok.split("=", 1)[1] for tok in out.split() if tok.startswith("JobState=")]

    def wait_done(self, job_id: str, timeout: float) -> list[str]:
        """Wait until every task of the job left the queue's active states; returns their states."""
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING"}

        def done():
            states = self.job_states(job_id)
            return states if states and not (set(states) & active) else None
        return self.wait_for(done, timeout, f"job {job_id} to finish", interval=2.0)
