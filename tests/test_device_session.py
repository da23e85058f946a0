"""training.device_session: concurrent jobs, deadline stop, tars (and parts) back, unpack into runs/, plan checks."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from training import device_session
from training.device_session import (
    SESSION_LOG,
    Job,
    Plan,
    RunsMissing,
    device_call,
    fetch,
    main,
    pack_run,
    run_plan,
    show,
    unpack,
)

FAKE_TRAINER = textwrap.dedent("""
    import argparse, json, os, time
    from pathlib import Path
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--run", required=True)
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--reserve-s", type=float)
    args = parser.parse_args()
    run = Path(args.run)
    (run / "started").write_text(str(time.time()))
    (run / "state.json").write_text("{}")
    (run / "samples.png").write_bytes(b"png")
    steps = len((run / "log.jsonl").read_text().splitlines()) if (run / "log.jsonl").exists() else 0
    time.sleep(1.0)
    if args.mode == "hang":
        time.sleep(600)
    with open(run / "log.jsonl", "a") as log:
        log.write(json.dumps({"step": steps + 1, "threads": os.environ["OMP_NUM_THREADS"],
                              "flag": os.environ.get("PLAN_FLAG"),
                              "minutes": args.minutes, "reserve_s": args.reserve_s}) + "\\n")
    (run / "finished").write_text(str(time.time()))
    raise SystemExit(3 if args.mode == "fail" else 0)
""")


@pytest.fixture
def trainer(tmp_path) -> str:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return str(path)


def test_jobs_run_at_once_and_come_back_as_tars(tmp_path, trainer):
    runs, out, back = tmp_path / "runs", tmp_path / "out", tmp_path / "back"
    plan = Plan([Job("alpha", [trainer]), Job("beta", [trainer, "--mode", "fail"])], minutes=1, reserve_s=5,
                env={"PLAN_FLAG": "on"})
    codes = run_plan(plan, out, runs, monitor_interval_s=0.2)
    assert codes == {"alpha": 0, "beta": 3}
    started = [float((runs / name / "started").read_text()) for name in ("alpha", "beta")]
    finished = [float((runs / name / "finished").read_text()) for name in ("alpha", "beta")]
    assert max(started) < min(finished)  # both ran at the same time
    record = json.loads((runs / "alpha" / "log.jsonl").read_text())
    assert record["minutes"] == 1 and record["reserve_s"] == 5 and int(record["threads"]) >= 1
    assert record["flag"] == "on"
    assert sorted(p.name for p in out.iterdir()) == ["alpha.tar.gz", "beta.tar.gz", SESSION_LOG]
    log = (out / SESSION_LOG).read_text()
    assert "alpha: rc 0" in log and "beta: rc 3" in log and '"step": 1' in log

    # Here: the returned tars replace the local run folders; a second call resumes from them.
    (back / "runs").mkdir(parents=True)
    (back / "runs" / "alpha").mkdir()
    (back / "runs" / "alpha" / "stale").write_text("old")
    assert unpack(out, back / "runs") == ["alpha", "beta"]
    assert not (back / "runs" / "alpha" / "stale").exists()
    assert (back / "runs" / "alpha" / "log.jsonl").read_text() == (runs / "alpha" / "log.jsonl").read_text()
    run_plan(Plan([Job("alpha", [trainer])], minutes=1), tmp_path / "out2", back / "runs", monitor_interval_s=0.2)
    assert len((back / "runs" / "alpha" / "log.jsonl").read_text().splitlines()) == 2


def test_a_job_past_its_deadline_is_stopped_and_still_returned(tmp_path, trainer):
    runs, out = tmp_path / "runs", tmp_path / "out"
    plan = Plan([Job("stuck", [trainer, "--mode", "hang"]), Job("fine", [trainer])], minutes=0.05, reserve_s=1)
    codes = run_plan(plan, out, runs, grace_s=1.0, monitor_interval_s=0.5)
    assert codes["fine"] == 0 and codes["stuck"] != 0
    assert "stuck still running past its deadline" in (out / SESSION_LOG).read_text()
    assert (out / "stuck.tar.gz").is_file() and not (runs / "stuck" / "finished").exists()


def test_large_runs_come_back_in_parts(tmp_path):
    run = tmp_path / "runs" / "big"
    run.mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(100_000)  # incompressible, like float16 mantissas
    (run / "tensors.safetensors").write_bytes(payload)
    out = tmp_path / "out"
    out.mkdir()
    parts = pack_run(run, out, part_bytes=40_000)
    assert len(parts) >= 3 and all(p.stat().st_size <= 40_000 for p in parts)
    assert not (out / "big.tar.gz").exists()
    assert unpack(out, tmp_path / "restored") == ["big"]
    assert (tmp_path / "restored" / "big" / "tensors.safetensors").read_bytes() == payload


def test_plans_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        Plan([Job("a", ["x"]), Job("a", ["y"])]).check()
    with pytest.raises(ValueError, match="letters"):
        Plan([Job("a/b", ["x"])]).check()
    with pytest.raises(ValueError, match="at most 7 jobs"):
        Plan([Job(f"j{i}", ["x"]) for i in range(8)]).check()


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("plan_path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "training/plans").glob("*.json")))
def test_bundled_plans_name_real_trainers_and_fit(plan_path, tmp_path, capsys):
    """Every plan loads, its trainers accept the options the launcher adds, and the device call is well formed."""
    import importlib

    plan = Plan.load(REPO / plan_path)
    for job in plan.jobs:
        assert job.argv[0] == "-m"
        module = importlib.import_module(job.argv[1])
        with pytest.raises(SystemExit) as exit_info:  # --help parses the whole option table; unknown options fail
            module.main([*job.argv[2:], "--run", str(tmp_path / job.name), "--minutes", "1", "--reserve-s", "5",
                         "--help"])
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        for option in (a for a in job.argv[2:] if a.startswith("--")):
            assert option in help_text, f"{job.name}: {option} is not an option of {job.argv[1]}"
    call = device_call(plan_path, plan, tmp_path / "no-runs")
    assert call["command"].startswith("python3 -m training.device_session run") and len(call["command"]) <= 2000
    assert call["carry"] == plan.carry  # no run folder exists yet, so none is carried


def test_show_reports_problems(tmp_path, capsys, trainer):
    plan = Plan([Job("alpha", [trainer])], carry=["datasets/does-not-exist.npz"])
    problems = show("plan.json", plan, repo=REPO, runs=tmp_path)
    assert any("missing" in p for p in problems)
    assert "device call:" in capsys.readouterr().out


def test_warm_calls_resume_return_what_is_asked_and_fetch_the_rest(tmp_path, trainer, monkeypatch):
    runs = tmp_path / "runs"
    plan = Plan([Job("alpha", [trainer]), Job("beta", [trainer])], minutes=1, reserve_s=5)
    with pytest.raises(RunsMissing, match="alpha, beta"):  # a fresh machine: nothing starts from scratch
        run_plan(plan, tmp_path / "refused", runs, resume_only=True, monitor_interval_s=0.2)
    assert not (runs / "alpha" / "started").exists()
    assert main(["run", str(_plan_file(tmp_path, plan)), "--out", str(tmp_path / "refused2"), "--runs", str(runs),
                 "--resume-only"]) == 2

    run_plan(plan, tmp_path / "first", runs, returned=[], monitor_interval_s=0.2)
    first = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert first == ["alpha.samples.png", "beta.samples.png", SESSION_LOG]  # progress only: the runs stay here
    assert "on this machine only (until it is given back): alpha, beta" in (tmp_path / "first" / SESSION_LOG).read_text()

    codes = run_plan(plan, tmp_path / "second", runs, returned=["beta"], resume_only=True, monitor_interval_s=0.2)
    assert codes == {"alpha": 0, "beta": 0}
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == ["alpha.samples.png", "beta.tar.gz", SESSION_LOG]
    assert "resume alpha" in (tmp_path / "second" / SESSION_LOG).read_text()

    assert fetch(plan, tmp_path / "fetched", runs, ["alpha"]) == ["alpha"]
    assert unpack(tmp_path / "fetched", tmp_path / "here") == ["alpha"]
    assert len((tmp_path / "here" / "alpha" / "log.jsonl").read_text().splitlines()) == 2  # both calls trained it
    with pytest.raises(ValueError, match="not runs of this plan: gamma"):
        fetch(plan, tmp_path / "bad", runs, ["gamma"])


def test_runs_that_do_not_fit_what_comes_back_stay_on_the_machine(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for name, size in (("small", 1000), ("large", 60_000), ("medium", 20_000)):
        (runs / name).mkdir(parents=True)
        (runs / name / "tensors.safetensors").write_bytes(np.random.default_rng(0).bytes(size))
    monkeypatch.setattr(device_session, "RETURN_MAX_BYTES", 2**20 + 40_000)  # 40 kB left beside session.log
    plan = Plan([Job(name, ["x"]) for name in ("small", "large", "medium")])
    assert fetch(plan, out, runs) == ["small", "medium"]
    assert sorted(p.name for p in out.iterdir()) == ["medium.tar.gz", SESSION_LOG, "small.tar.gz"]
    assert "large: 0.1 MiB does not fit what comes back: kept on this machine" in (out / SESSION_LOG).read_text()


def test_warm_device_call_carries_nothing_and_refuses_fresh_starts(tmp_path):
    plan = Plan([Job("alpha", ["x"]), Job("beta", ["x"])], carry=["datasets/faces/faces128.npz"])
    (tmp_path / "alpha").mkdir()
    cold = device_call("plan.json", plan, tmp_path)
    assert cold["carry"] == ["datasets/faces/faces128.npz", str(tmp_path / "alpha")]
    assert "--resume-only" not in cold["command"] and "--return" not in cold["command"]
    warm = device_call("plan.json", plan, tmp_path, warm=True, returned=["beta"])
    assert warm["carry"] == [] and warm["command"].endswith("--resume-only --return beta")
    assert device_call("plan.json", plan, tmp_path, returned=[])["command"].endswith("--return")
    partly = device_call("plan.json", plan, tmp_path, warm=True, carry=[str(tmp_path / "beta")])
    assert partly["carry"] == [str(tmp_path / "beta")] and "--resume-only" in partly["command"]


def _plan_file(tmp_path, plan: Plan) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"minutes": plan.minutes, "reserve_s": plan.reserve_s,
                                "jobs": [{"name": job.name, "argv": job.argv} for job in plan.jobs]}))
    return path
