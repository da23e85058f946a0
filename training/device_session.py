"""Several resumable trainers at once on one GPU-machine call, and their run folders back in a few files.

Our models are small: one of them leaves most of an H100/H200 idle, while a session has only 30 minutes of device
time. A plan (`training/plans/*.json`) names the runs that share one call, what they need carried and extra
environment variables (e.g. `FACE_SUITE_CACHE` pointing at a carried folder of derived weights):

    {"description": "...", "minutes": 9, "reserve_s": 45,
     "carry": ["datasets/faces/faces128.npz"], "env": {"NAME": "value"},
     "jobs": [{"name": "sg2_faces128", "argv": ["-m", "training.train_stylegan2", "--data", "..."]}, ...]}

Each job runs as `python <argv> --run <runs>/<name> --minutes <minutes> --reserve-s <reserve_s>`, all at the same
time, with the CPU threads split between them. Trainers stop themselves at their deadline; one still running
`GRACE_S` later is stopped (SIGTERM, then SIGKILL) so the call always ends with its files written. The run folders
then go back as gzip tars, cut into 15 MiB parts when larger, beside `session.log` (per minute: each job's state and
the GPU's use and memory; at the end: each job's exit code and last log line) and each run's `samples.png`.

What comes back is capped (8 files of 16 MiB, 64 MiB together), and all of our run folders together are larger.
A warm machine keeps the ignored `runs/` between calls (it is given back 30 s after a call), so calls that follow
each other closely need not carry or return every run: `--return` names the runs to pack (the rest stay on the
machine, as the log says), `--resume-only` refuses to start when a run folder is missing there (a fresh machine:
carry the folders instead) and `fetch` packs runs without training.

    python -m training.device_session show training/plans/gan2d.json [--warm]   # sizes, and the exact device call
    python -m training.device_session run PLAN --out "$OUT" [--return NAME ...] [--resume-only]   # on the machine
    python -m training.device_session fetch PLAN --out "$OUT" [--return NAME ...]                  # on the machine
    python -m training.device_session unpack <files_at>                   # here: replace runs/<name> from the tars
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.resumable import STATE_FILE, last_log_record

CARRY_LIMIT_BYTES = 64 * 2**20  # working tree + carried paths, per call
CARRY_MAX_PATHS = 8
RETURN_MAX_FILES = 8
RETURN_MAX_BYTES = 64 * 2**20
PART_BYTES = 15 * 2**20
COMMAND_MAX_CHARS = 2000
GRACE_S = 30.0
STOP_WAIT_S = 10.0
MONITOR_INTERVAL_S = 60.0
SESSION_LOG = "session.log"
SAMPLES = "samples.png"


@dataclass
class Job:
    """One trainer of a plan: its run-folder name and the Python argv before the run/deadline options."""

    name: str
    argv: list[str]


@dataclass
class Plan:
    """Runs that share one device call."""

    jobs: list[Job]
    minutes: float = 9.0
    reserve_s: float = 45.0
    carry: list[str] = field(default_factory=list)
    description: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [job.name for job in self.jobs]

    def select(self, names: list[str]) -> list[str]:
        """`names` checked against the plan's jobs (their order kept)."""
        unknown = [name for name in names if name not in self.names]
        if unknown:
            raise ValueError(f"not runs of this plan: {', '.join(unknown)} (it has {', '.join(self.names)})")
        return list(names)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        data = json.loads(Path(path).read_text())
        jobs = [Job(str(job["name"]), [str(a) for a in job["argv"]]) for job in data["jobs"]]
        plan = cls(jobs, float(data.get("minutes", 9.0)), float(data.get("reserve_s", 45.0)),
                   [str(c) for c in data.get("carry", [])], str(data.get("description", "")),
                   {str(k): str(v) for k, v in data.get("env", {}).items()})
        plan.check()
        return plan

    def check(self) -> None:
        """Refuse plans whose outputs could not all come back."""
        names = [job.name for job in self.jobs]
        if not names or len(set(names)) != len(names):
            raise ValueError("a plan needs at least one job and unique job names")
        if any(not name.replace("_", "").replace("-", "").isalnum() for name in names):
            raise ValueError("job names may hold letters, digits, '_' and '-' only (they name returned files)")
        if len(names) > RETURN_MAX_FILES - 1:
            raise ValueError(f"at most {RETURN_MAX_FILES - 1} jobs: each returns at least one tar, plus {SESSION_LOG}")


def job_command(job: Job, runs: Path, plan: Plan) -> list[str]:
    return [sys.executable, *job.argv, "--run", str(runs / job.name), "--minutes", f"{plan.minutes:g}",
            "--reserve-s", f"{plan.reserve_s:g}"]


def gpu_usage() -> str:
    """'util %, used/total MiB' of the first GPU from nvidia-smi, or '' where there is none."""
    if shutil.which("nvidia-smi") is None:
        return ""
    query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"]
    try:
        line = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        util, used, total = (part.strip() for part in line.split(","))
        return f"gpu {util}%, {used}/{total} MiB"
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return ""


def last_log_line(run: Path) -> str:
    """The run's last log record as a JSON line ('' if none)."""
    record = last_log_record(run)
    return json.dumps(record) if record else ""


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the job's process group, then SIGKILL it if it has not ended within STOP_WAIT_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(STOP_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue


class RunsMissing(RuntimeError):
    """`--resume-only` found run folders without a checkpoint: the machine is a fresh one."""


def run_plan(plan: Plan, out: Path, runs: Path = Path("runs"), returned: list[str] | None = None,
             resume_only: bool = False, grace_s: float = GRACE_S,
             monitor_interval_s: float = MONITOR_INTERVAL_S) -> dict[str, int]:
    """Run every job of `plan` at once, then pack the `returned` run folders (all when None) into `out`; returns
    exit codes by job name. With `resume_only`, raise `RunsMissing` before starting when a run has no checkpoint."""
    returned = plan.names if returned is None else plan.select(returned)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    log = open(out / SESSION_LOG, "a", buffering=1)
    missing = [name for name in plan.names if not (runs / name / STATE_FILE).is_file()]
    if resume_only and missing:
        message = f"no checkpoint on this machine for {', '.join(missing)}: it is a fresh one, carry the run folders"
        log.write(message + "\n")
        log.close()
        raise RunsMissing(message)
    threads = max(1, (os.cpu_count() or 1) // len(plan.jobs))
    env = {**os.environ, **plan.env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    start = time.monotonic()
    processes: dict[str, subprocess.Popen] = {}
    for job in plan.jobs:
        (runs / job.name).mkdir(parents=True, exist_ok=True)
        console = open(runs / job.name / "console.log", "w")
        command = job_command(job, runs, plan)
        log.write(f"[0s] {'start' if job.name in missing else 'resume'} {job.name}: {' '.join(command)}\n")
        processes[job.name] = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
        console.close()
    hard_stop = plan.minutes * 60 + grace_s
    next_report = monitor_interval_s
    while any(p.poll() is None for p in processes.values()):
        elapsed = time.monotonic() - start
        if elapsed > hard_stop:
            for name, process in processes.items():
                if process.poll() is None:
                    log.write(f"[{elapsed:.0f}s] {name} still running past its deadline: stopping it\n")
                    _stop(process)
            break
        if elapsed >= next_report:
            states = ", ".join(f"{n} {'running' if p.poll() is None else f'rc {p.returncode}'}"
                               for n, p in processes.items())
            log.write(f"[{elapsed:.0f}s] {states}; {gpu_usage()}\n")
            next_report += monitor_interval_s
        time.sleep(min(1.0, monitor_interval_s))
    codes = {name: process.wait() for name, process in processes.items()}
    for name in plan.names:
        log.write(f"[{time.monotonic() - start:.0f}s] {name}: rc {codes[name]}; last log: "
                  f"{last_log_line(runs / name)}\n")
    pack_runs(plan, returned, runs, out, log)
    log.close()
    return codes


def pack_runs(plan: Plan, returned: list[str], runs: Path, out: Path, log) -> list[str]:
    """Pack the `returned` run folders into `out` in that order while they fit what comes back (RETURN_MAX_FILES
    files with `session.log`, RETURN_MAX_BYTES), then the samples of the runs kept here while files remain;
    log what stays on the machine and return the names packed."""
    files_left, bytes_left = RETURN_MAX_FILES - 1, RETURN_MAX_BYTES - 2**20  # room for session.log
    packed = []
    for name in returned:
        parts = pack_run(runs / name, out)
        size = sum(part.stat().st_size for part in parts)
        if len(parts) <= files_left and size <= bytes_left:
            files_left, bytes_left = files_left - len(parts), bytes_left - size
            packed.append(name)
            log.write(f"{name}: {size / 2**20:.1f} MiB in {len(parts)} file(s)\n")
        else:
            for part in parts:
                part.unlink()
            log.write(f"{name}: {size / 2**20:.1f} MiB does not fit what comes back: kept on this machine\n")
    kept = [name for name in plan.names if name not in packed]
    for name in kept:
        samples = runs / name / SAMPLES
        if files_left and samples.is_file() and samples.stat().st_size <= bytes_left:
            shutil.copyfile(samples, out / f"{name}.{SAMPLES}")
            files_left, bytes_left = files_left - 1, bytes_left - samples.stat().st_size
    if kept:
        log.write(f"on this machine only (until it is given back): {', '.join(kept)}\n")
    return packed


def fetch(plan: Plan, out: Path, runs: Path = Path("runs"), returned: list[str] | None = None) -> list[str]:
    """Pack run folders without training (the ones a warm machine kept); returns the names packed."""
    returned = plan.names if returned is None else plan.select(returned)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / SESSION_LOG, "a", buffering=1) as log:
        present = [name for name in returned if (runs / name).is_dir()]
        for name in sorted(set(returned) - set(present)):
            log.write(f"{name}: no run folder on this machine\n")
        return pack_runs(plan, present, runs, out, log)


def pack_run(run: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Tar and gzip `run` into `out` as `<name>.tar.gz`, or as `<name>.tar.gz.000`, `.001`, ... parts when it is
    larger than `part_bytes` (each returned file must stay under 16 MiB)."""
    tar_path = out / f"{run.name}.tar.gz"
    with tarfile.open(tar_path, "w:gz", compresslevel=1) as archive:
        archive.add(run, arcname=run.name)
    if tar_path.stat().st_size <= part_bytes:
        return [tar_path]
    parts = []
    with open(tar_path, "rb") as whole:
        for index, chunk in enumerate(iter(lambda: whole.read(part_bytes), b"")):
            part = out / f"{tar_path.name}.{index:03d}"
            part.write_bytes(chunk)
            parts.append(part)
    tar_path.unlink()
    return parts


def unpack(files_at: Path, runs: Path = Path("runs")) -> list[str]:
    """Replace `runs/<name>` by the run folder in each returned `<name>.tar.gz` (or its `.tar.gz.NNN` parts);
    returns the names restored."""
    files_at = Path(files_at)
    names = sorted({path.name.split(".tar.gz")[0] for path in files_at.glob("*.tar.gz*")})
    runs.mkdir(parents=True, exist_ok=True)
    for name in names:
        parts = sorted(files_at.glob(f"{name}.tar.gz.[0-9][0-9][0-9]")) or [files_at / f"{name}.tar.gz"]
        with tempfile.TemporaryDirectory(dir=runs) as staging:
            whole = Path(staging) / "whole.tar"
            with open(whole, "wb") as handle:
                for part in parts:
                    handle.write(part.read_bytes())
            with tarfile.open(whole) as archive:
                archive.extractall(staging, filter="data")
            extracted = Path(staging) / name
            if not extracted.is_dir():
                raise ValueError(f"{parts[0]} does not hold a folder named {name}")
            for path in [extracted, *extracted.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
            target = runs / name
            if target.exists():
                shutil.rmtree(target)
            extracted.rename(target)
    return names


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder (0 if absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def tree_bytes(repo: Path) -> int:
    """Bytes of what travels with every call: tracked files plus untracked files that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    return sum(path_bytes(repo / name) for name in set(listed.split("\0")) if name)


def device_call(plan_path: str, plan: Plan, runs: Path, warm: bool = False,
                returned: list[str] | None = None, carry: list[str] | None = None) -> dict:
    """The `run` tool arguments for this plan: command, carry and timeout. A fresh machine gets the plan's data and
    the run folders that exist here; a `warm` one keeps both from the last call, so nothing is carried and the
    command refuses to start runs from scratch. `carry` replaces what is carried (e.g. the runs a warm machine
    does not have yet)."""
    if carry is None:
        carry = [] if warm else [*plan.carry, *(str(runs / name) for name in plan.names if (runs / name).is_dir())]
    command = f'python3 -m training.device_session run {plan_path} --out "$OUT"'
    if warm:
        command += " --resume-only"
    if returned is not None:
        command += " --return" + "".join(f" {name}" for name in plan.select(returned))
    return {"command": command, "carry": carry, "timeout_s": 600}


def show(plan_path: str, plan: Plan, repo: Path = Path("."), runs: Path = Path("runs"), warm: bool = False,
         returned: list[str] | None = None, carry: list[str] | None = None) -> list[str]:
    """Print what the call carries and returns against the machine's limits; returns the problems found."""
    call = device_call(plan_path, plan, runs, warm, returned, carry)
    tree = tree_bytes(repo)
    carried = {path: path_bytes(repo / path) for path in call["carry"]}
    total = tree + sum(carried.values())
    print(plan.description)
    print(f"working tree {tree / 2**20:.1f} MiB")
    for path, size in carried.items():
        print(f"carry {path}: {size / 2**20:.1f} MiB" + ("" if size else " (absent here: not carried)"))
    if warm:
        print("warm machine: the data and run folders of the last calls stay there; only the above is carried")
    print(f"in: {total / 2**20:.1f} of {CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
    problems = []
    if total > CARRY_LIMIT_BYTES:
        problems.append(f"carried {total / 2**20:.1f} MiB is over the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB limit")
    if len(call["carry"]) > CARRY_MAX_PATHS:
        problems.append(f"{len(call['carry'])} carried paths; at most {CARRY_MAX_PATHS}")
    if len(call["command"]) > COMMAND_MAX_CHARS:
        problems.append("the command is too long")
    missing = [path for path in plan.carry if not (repo / path).exists()]
    if missing and not warm:
        problems.append(f"plan data missing here: {', '.join(missing)}")
    names = plan.names if returned is None else returned
    back = sum(path_bytes(runs / name) for name in names)
    files = sum(max(1, -(-path_bytes(runs / name) // PART_BYTES)) for name in names) + 1
    print(f"back: at most {back / 2**20:.1f} MiB before gzip, in {files} files (the limit: {RETURN_MAX_FILES} files, "
          f"{RETURN_MAX_BYTES / 2**20:.0f} MiB)")
    if files > RETURN_MAX_FILES or back > RETURN_MAX_BYTES:
        print("WARNING: the run folders may not all come back; those that do not fit stay on the machine (name the "
              "ones you need with --return, or fetch them in a short call that follows)")
    print("device call:", json.dumps(call))
    for problem in problems:
        print("PROBLEM:", problem)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    return_help = "run folders to pack, in this order (default: all; none when given alone)"
    run_parser = commands.add_parser("run", help="run a plan's jobs at once (on the GPU machine)")
    run_parser.add_argument("plan")
    run_parser.add_argument("--out", type=Path, required=True)
    run_parser.add_argument("--runs", type=Path, default=Path("runs"))
    run_parser.add_argument("--return", dest="returned", nargs="*", help=return_help)
    run_parser.add_argument("--resume-only", action="store_true",
                            help="refuse to start when a run folder has no checkpoint (the machine was fresh)")
    fetch_parser = commands.add_parser("fetch", help="pack run folders without training (on the GPU machine)")
    fetch_parser.add_argument("plan")
    fetch_parser.add_argument("--out", type=Path, required=True)
    fetch_parser.add_argument("--runs", type=Path, default=Path("runs"))
    fetch_parser.add_argument("--return", dest="returned", nargs="*", help=return_help)
    show_parser = commands.add_parser("show", help="sizes against the device limits, and the device call")
    show_parser.add_argument("plan")
    show_parser.add_argument("--runs", type=Path, default=Path("runs"))
    show_parser.add_argument("--warm", action="store_true", help="the call follows another on a warm machine")
    show_parser.add_argument("--return", dest="returned", nargs="*", help=return_help)
    show_parser.add_argument("--carry", nargs="+", help="carry exactly these paths (default: the plan's data and the "
                             "run folders here; nothing when --warm)")
    unpack_parser = commands.add_parser("unpack", help="restore run folders from the returned tars")
    unpack_parser.add_argument("files_at", type=Path)
    unpack_parser.add_argument("--runs", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    if args.command == "run":
        try:
            codes = run_plan(Plan.load(args.plan), args.out, args.runs, args.returned, args.resume_only)
        except RunsMissing as error:
            print(error)
            return 2
        print(json.dumps(codes))
        return 0 if all(code == 0 for code in codes.values()) else 1
    if args.command == "fetch":
        print("packed:", ", ".join(fetch(Plan.load(args.plan), args.out, args.runs, args.returned)) or "none")
        return 0
    if args.command == "show":
        plan = Plan.load(args.plan)
        return 1 if show(args.plan, plan, runs=args.runs, warm=args.warm, returned=args.returned,
                         carry=args.carry) else 0
    for name in unpack(args.files_at, args.runs):
        print(f"{args.runs / name}: {last_log_line(args.runs / name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
