"""Plans are pure: composed config + facts -> exact argv and batch script (no SLURM needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from conftest import TESTS, compose
from toksearch_launch.config import ConfigError, validate
from toksearch_launch.plan import (
    Facts,
    checked_command,
    parse_slurm_version,
    plan_job,
    refuses_exclusive_with_overlap,
    version_text,
)

OLD_SLURM = (20, 11, 9)   # accepts --exclusive with --overlap (saga's, per TokSearch's sample output)
NEW_SLURM = (22, 5, 8)    # Debian 12's; refuses the pair
TTY_X = Facts(stdin_is_tty=True, display=":0", slurm_version=OLD_SLURM, cwd="/work/dir", python="/venv/bin/python")
COMMAND = ["python", "toksearch_example.py", "ray"]
RUN_DIR = Path("/runs/r1")
#: What the interactive step runs before COMMAND: the run-dir check (plan.checked_command).
CHECK = checked_command(RUN_DIR / "toksearch.yaml", [])


def plan(overrides, command=COMMAND, facts=TTY_X):
    cfg = compose(overrides)
    validate(cfg)
    return plan_job(cfg, command, RUN_DIR, facts)


def test_golden_default_interactive():
    p = plan(["nodes=3"])
    assert p.argv == (
        "salloc -N 3 --exclusive --time=4:00:00 --x11=all "
        "srun -u --pty -N 1 --exclusive --propagate --overlap"
    ).split() + CHECK + COMMAND
    assert p.notes == []


def test_golden_saga_interactive():
    p = plan(["site=saga", "nodes=3"])
    assert p.argv == (
        "salloc -N 3 --exclusive --gres=gpu:volta:1 --x11=all "
        "srun -u --pty -N 1 --exclusive --propagate --gres=gpu:volta:0 --overlap"
    ).split() + CHECK + COMMAND


def test_golden_batch_script():
    p = plan(["mode=batch", "nodes=3"])
    golden = (TESTS / "golden" / "default_batch_nodes3.sbatch").read_text()
    assert p.script == golden
    assert p.argv == ["sbatch", "--parsable", "/runs/r1/job.sbatch"]
    assert str(p.output) == "/runs/r1/slurm-%j.out"


def test_golden_saga_batch_script():
    p = plan(["site=saga", "mode=batch", "nodes=3"])
    golden = (TESTS / "golden" / "saga_batch_nodes3.sbatch").read_text()
    assert p.script == golden


def test_job_environment_points_at_run_dir_config():
    p = plan(["nodes=2"])
    assert p.env == {"TOKSEARCH_CONFIG": "/runs/r1/toksearch.yaml", "TOKSEARCH_RUN_DIR": "/runs/r1"}


def test_no_tty_drops_pty_with_one_note():
    p = plan(["nodes=2"], facts=Facts(stdin_is_tty=False, display=":0", slurm_version=OLD_SLURM))
    assert "--pty" not in p.argv
    assert p.notes == ["stdin is not a terminal: running the step without --pty"]


@pytest.mark.parametrize("site", ["default", "saga"])
def test_x11_dropped_without_display(site):
    p = plan([f"site={site}", "nodes=2"], facts=Facts(stdin_is_tty=True, display=None, slurm_version=OLD_SLURM))
    assert not any(a.startswith("--x11") for a in p.argv)
    assert p.notes == ["DISPLAY is not set: dropped --x11=all from interactive.salloc (no X11 forwarding)"]


def test_x11_kept_with_display():
    p = plan(["nodes=2"], facts=Facts(display="localhost:10.0", slurm_version=OLD_SLURM))
    assert "--x11=all" in p.argv


def test_any_x11_form_is_dropped_without_display():
    p = plan(["nodes=2", "interactive.salloc=[--x11,'--x11=batch','--time=1:00:00']"],
             facts=Facts(display=None, slurm_version=OLD_SLURM))
    assert p.argv[:5] == ["salloc", "-N", "2", "--exclusive", "--time=1:00:00"]


@pytest.mark.parametrize("version, refuses", [
    ((20, 11, 0), False), ((20, 11, 9), False), ((21, 8, 0), True), ((21, 8, 8), True),
    ((22, 5, 8), True), ((24, 11, 1), True), (None, False),
])
def test_version_rule_boundary(version, refuses):
    assert refuses_exclusive_with_overlap(version) is refuses


def test_new_slurm_drops_step_exclusive_and_says_so():
    p = plan(["nodes=3"], facts=Facts(display=":0", slurm_version=NEW_SLURM))
    assert p.argv == (
        "salloc -N 3 --exclusive --time=4:00:00 --x11=all "
        "srun -u --pty -N 1 --propagate --overlap"
    ).split() + CHECK + COMMAND
    assert p.notes == [
        "Slurm 22.05.8 refuses --exclusive with --overlap on one step: "
        "the interactive step keeps --overlap and drops --exclusive"
    ]


def test_new_slurm_keeps_exclusive_when_step_has_no_overlap():
    p = plan(["nodes=3", "interactive.srun=[]"], facts=Facts(display=":0", slurm_version=NEW_SLURM))
    assert p.argv[-len(CHECK) - 6:] == ["-N", "1", "--exclusive", "--propagate", *CHECK, *COMMAND][-len(CHECK) - 6:]
    assert "--exclusive" in p.argv[p.argv.index("srun"):]


def test_run_dir_check_fails_at_once_with_one_line(tmp_path):
    """The interactive step's check, run for real: a config the node cannot see stops the job (exit 1, one line)."""
    import subprocess

    missing = tmp_path / "not-shared" / "toksearch.yaml"
    ran = subprocess.run(checked_command(missing, ["echo", "COMMAND RAN"]), capture_output=True, text=True)
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr.splitlines() == [
        f"toksearch: {missing} is not visible on {__import__('socket').gethostname()}: the run directory must be on "
        "a filesystem the compute nodes share (choose one with hydra.run.dir=...)"]
    missing.parent.mkdir()
    missing.write_text("nodes: 1\n")
    ran = subprocess.run(checked_command(missing, ["echo", "it's", "$HOME"]), capture_output=True, text=True)
    assert (ran.returncode, ran.stdout) == (0, "it's $HOME\n")


def test_slurm_version_parsing():
    assert parse_slurm_version("slurm 22.05.8\n") == (22, 5, 8)
    assert parse_slurm_version("slurm-wlm 20.11.9") == (20, 11, 9)
    assert parse_slurm_version("no version") is None
    assert version_text((22, 5, 8)) == "22.05.8"


def test_option_numbers_become_strings_on_argv():
    p = plan(["nodes=2", "interactive.salloc=[--mem, 10]"])
    assert p.argv[4:6] == ["--mem", "10"]


def test_local_site_runs_command_directly():
    p = plan(["site=local", "nodes=2"])
    assert p.argv == COMMAND and p.scheduler == "local"


def test_eager_backend_wraps_command():
    p = plan(["site=local", "backend=spark", "backend.start=eager"])
    assert p.argv == ["/venv/bin/python", "-m", "toksearch_launch.cluster.eager", "--backend", "spark", "--", *COMMAND]


def test_shared_partition_site_drops_allocation_exclusive():
    p = plan(["nodes=2", "site.exclusive=false", "interactive.salloc=['--partition=shared']"])
    assert p.argv[:4] == ["salloc", "-N", "2", "--partition=shared"]


def test_missing_command_is_an_error():
    with pytest.raises(ValueError, match="no command given"):
        plan(["nodes=1"], command=[])


@pytest.mark.parametrize(
    "site, mode, backend",
    list(itertools.product(["default", "saga", "local"], ["interactive", "batch"], ["ray", "spark"])),
)
def test_every_group_combination_composes_validates_and_plans(site, mode, backend):
    cfg = compose([f"site={site}", f"mode={mode}", f"backend={backend}", "nodes=2"])
    validate(cfg)
    assert (cfg.site.name, cfg.mode, cfg.backend.name) == (site, mode, backend)
    p = plan_job(cfg, COMMAND, RUN_DIR, TTY_X)
    assert p.argv[-3:] == COMMAND if mode == "interactive" else p.script.rstrip().endswith("exec python toksearch_example.py ray")
    for group in (cfg.interactive.salloc, cfg.ray.worker.start, cfg.spark.worker.start):
        assert all(isinstance(o, str) for o in group)


@pytest.mark.parametrize("override, message", [
    ("nodes=0", "nodes=0"),
    ("site.address.method=carrier-pigeon", "site.address.method"),
    ("site.address.method=suffix", "needs site.address.suffix"),
    ("site.ports.policy=fixed", "site.ports.base"),
    ("backend.start=sometimes", "backend.start"),
    ("site.ready_timeout=0", "ready_timeout"),
])
def test_validation_errors(override, message):
    cfg = compose([override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
