#!/usr/bin/env python3
"""A real single-node SLURM cluster on this machine, from Debian's packages, for trying dwiflow's slurm worker.

    sudo python3 tools/local_slurm.py start DIR      # munged, MariaDB, slurmdbd, slurmctld, slurmd; prints SLURM_CONF
    SLURM_CONF=DIR/slurm.conf dwiflow BIDS OUT participant --worker slurm --work-dir DIR/work
    SLURM_CONF=DIR/slurm.conf sacct -X -o JobID,JobName%40,State,ExitCode
    sudo python3 tools/local_slurm.py stop DIR       # stops exactly the daemons it started (their process ids)

Needs root and ``apt-get install -y slurm-wlm slurmdbd munge mariadb-server`` (``--install`` does it). Everything
the cluster writes (configuration, state, spool, logs, the accounting database) lives under DIR; nothing in
/etc is changed. slurmdbd + MariaDB are there because Pydra's slurm worker reads each job's end state with
``sacct``, which needs the accounting database. The node is ``localhost`` with this machine's CPUs and memory;
jobs run as root, processes tracked by ``proctrack/linuxproc`` (no cgroups in a container).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
DB_PASSWORD = "dwiflow-local"


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def missing_requirements() -> list[str]:
    """What stops a cluster from starting here (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (the daemons and the munge key need it)")
    for tool in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db", "sbatch", "sacct"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            problems.append(f"{tool} not found (apt-get install -y {' '.join(PACKAGES)})")
    return problems


def install() -> None:
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


def _wait_for(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _spawn(name: str, argv: list[str], root: Path, env: dict[str, str]) -> int:
    log = root / "logs" / f"{name}.out"
    handle = open(log, "ab")
    process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pids = json.loads((root / "pids.json").read_text()) if (root / "pids.json").exists() else {}
    pids[name] = process.pid
    (root / "pids.json").write_text(json.dumps(pids, indent=2))
    return process.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a zombie (exited, not reaped) is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def write_configuration(root: Path, ports: dict[str, int]) -> Path:
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(f"""# single-node cluster written by dwiflow tools/local_slurm.py
ClusterName=dwiflowlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'logs' / 'slurmctld.log'}
SlurmdLogFile={root / 'logs' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports['slurmdbd']}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(_memory_mb() - 1024, 1024)} State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    dbd = root / "slurmdbd.conf"
    dbd.write_text(f"""AuthType=auth/munge
DbdHost=localhost
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={root / 'slurmdbd.pid'}
LogFile={root / 'logs' / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser=slurm
StoragePass={DB_PASSWORD}
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)
    return conf


def start(root: Path, timeout: float = 90.0) -> dict[str, object]:
    """Start the five daemons under ``root``; returns {"slurm_conf": ..., "pids": {...}}."""
    problems = missing_requirements()
    if problems:
        raise RuntimeError("cannot start a local SLURM cluster: " + "; ".join(problems))
    root = root.resolve()
    if (root / "pids.json").exists() and any(_alive(p) for p in json.loads((root / "pids.json").read_text()).values()):
        raise RuntimeError(f"a cluster started from {root} is still running; stop it first")
    for sub in ("state", "spool", "logs", "db", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "pids.json").unlink(missing_ok=True)
    ports = {"slurmctld": _free_port(6817), "slurmd": _free_port(6818), "slurmdbd": _free_port(6819),
             "mariadb": _free_port(3307)}
    conf = write_configuration(root, ports)
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        # munge: the key from the Debian package; its socket where the slurm tools look for it
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not _munge_answers():
            # a socket file left by a munged that died answers nothing: --force lets a new daemon replace it
            _spawn("munged", ["runuser", "-u", "munge", "--", _which("munged"), "--foreground", "--force"], root, env)
            _wait_for("munged", _munge_answers, timeout, root / "logs" / "munged.out")
        # MariaDB with its own data directory and port, then the accounting database and its user
        datadir, sock = root / "db" / "data", root / "run" / "mysqld.sock"
        if not (datadir / "mysql").exists():
            subprocess.run([_which("mariadb-install-db"), f"--datadir={datadir}", "--user=root", "--auth-root-authentication-method=socket",
                            "--skip-test-db"], check=True, capture_output=True)
        _spawn("mariadbd", [_which("mariadbd"), f"--datadir={datadir}", f"--socket={sock}", f"--port={ports['mariadb']}",
                            "--bind-address=127.0.0.1", "--user=root", f"--pid-file={root / 'run' / 'mariadb.pid'}",
                            "--innodb-buffer-pool-size=64M"], root, env)
        _wait_for("mariadbd", sock.exists, timeout, root / "logs" / "mariadbd.out")
        sql = (f"CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY "
               f"'{DB_PASSWORD}'; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{DB_PASSWORD}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; "
               "FLUSH PRIVILEGES;")
        subprocess.run(["mariadb", f"--socket={sock}", "-u", "root", "-e", sql], check=True, capture_output=True)
        _spawn("slurmdbd", [_which("slurmdbd"), "-D"], root, env)
        _wait_for("slurmdbd", lambda: _port_open(ports["slurmdbd"]), timeout, root / "logs" / "slurmdbd.log")
        _spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)], root, env)
        _wait_for("slurmctld", lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
                  .stdout.count("UP") > 0, timeout, root / "logs" / "slurmctld.log")
        _spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(conf)], root, env)

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            return "idle" in out or "mixed" in out

        _wait_for("slurmd (node idle)", node_idle, timeout, root / "logs" / "slurmd.log")
        # the cluster is in the accounting database once slurmctld has registered
        _wait_for("cluster registration in slurmdbd",
                  lambda: "dwiflowlocal" in subprocess.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"],
                                                           env=env, capture_output=True, text=True).stdout,
                  timeout, root / "logs" / "slurmctld.log")
    except Exception:
        stop(root)
        raise
    return {"slurm_conf": str(conf), "pids": json.loads((root / "pids.json").read_text())}


def _munge_answers() -> bool:
    """Whether a munged is listening on the default socket (a credential can be encoded)."""
    if not Path("/run/munge/munge.socket.2").exists():
        return False
    try:
        return subprocess.run([shutil.which("munge") or "/usr/bin/munge", "-n"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(root: Path, timeout: float = 30.0) -> list[str]:
    """Stop the daemons started from ``root`` (by their recorded process ids), last started first."""
    pids_file = root.resolve() / "pids.json"
    if not pids_file.exists():
        return []
    pids = json.loads(pids_file.read_text())
    stopped = []
    for name in reversed(list(pids)):
        pid = pids[name]
        if not _alive(pid):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        stopped.append(f"{name} ({pid})")
    pids_file.unlink()
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "check"))
    parser.add_argument("dir", type=Path, nargs="?", default=Path("local_slurm"))
    parser.add_argument("--install", action="store_true", help=f"apt-get install {' '.join(PACKAGES)} first")
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = missing_requirements()
        print("\n".join(problems) or "ready")
        return 1 if problems else 0
    if args.command == "stop":
        print("stopped: " + (", ".join(stop(args.dir)) or "nothing was running"))
        return 0
    if args.install:
        install()
    info = start(args.dir)
    print(f"local SLURM cluster up; daemons {info['pids']}")
    print(f"export SLURM_CONF={info['slurm_conf']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
