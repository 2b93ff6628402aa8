"""The toksearch_submit command line, run as a user runs it (no SLURM: stand-ins record argv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, TESTS, read_record, run_cli
from toksearch_launch.cli import UsageError, split_argv
from toksearch_launch.plan import checked_command

HOSTILE = [
    "with space", "it's", 'say "hi"', "$(touch /tmp/pwned_ts)", "`id`", "a;b", "line1\nline2",
    "ünïcødé ✓", "--", "a=b", "--flag=x", "*", "", "$HOME", "\\back\\slash", "tab\there",
]


def test_split_flags_overrides_and_command():
    inv = split_argv(["-N", "3", "site=saga", "python", "train.py", "lr=0.1", "--", "ray"])
    assert inv.hydra_args == ["nodes=3", "site=saga"]
    assert inv.command == ["python", "train.py", "lr=0.1", "ray"]


def test_split_only_first_dash_dash_after_command_is_dropped():
    inv = split_argv(["python", "x.py", "--", "a", "--", "b"])
    assert inv.command == ["python", "x.py", "a", "--", "b"]


def test_dash_dash_before_command_ends_flags():
    inv = split_argv(["-b", "--", "FOO=bar", "-N", "2"])
    assert inv.hydra_args == ["mode=batch"]
    assert inv.command == ["FOO=bar", "-N", "2"]


def test_flag_forms():
    inv = split_argv(["--nodes=2", "-b", "-d", "-m", "-w", "-k", "--config-dir", "/tmp", "+x=1", "~y", "cmd"])
    assert inv.hydra_args == ["--multirun", "nodes=2", "mode=batch", "--config-dir", "/tmp", "+x=1", "~y"]
    assert (inv.dry_run, inv.multirun, inv.wait, inv.keep_going) == (True, True, True, True)
    assert inv.command == ["cmd"]


@pytest.mark.parametrize("override, expected", [
    ("ray.worker.start=[--num-cpus=8]", ["--num-cpus=8"]),
    ("ray.worker.start=[--num-cpus=8, --memory=10]", ["--num-cpus=8", "--memory=10"]),
    ("ray.worker.start=[--num-cpus=8,'a b',10]", ["--num-cpus=8", "a b", "10"]),
    ("ray.worker.start=[]", []),
])
def test_list_items_with_equals_reach_the_config(override, expected):
    """TokSearch's documented `'ray.worker.start=[--num-cpus=8]'` must work despite Hydra's grammar."""
    from conftest import compose

    inv = split_argv([override, "cmd"])
    assert list(compose(inv.hydra_args).ray.worker.start) == expected


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "python"], "unknown flag '--bogus'"),
    (["-N"], "-N needs a value"),
])
def test_split_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        split_argv(argv)


BAD_INPUTS = [
    (["nodes=0", "python", "x.py"], "nodes=0: need a whole number of nodes, 1 or more"),
    (["nodes=abc", "python", "x.py"], "Error merging override nodes=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["-N", "abc", "python", "x.py"], "Error merging override nodes=abc"),
    (["nodez=3", "python", "x.py"], "Could not override 'nodez'."),
    (["ray.worker.strat=[]", "python", "x.py"], "Could not override 'ray.worker.strat'."),
    (["site=nope", "python", "x.py"], "Could not find 'site/nope' (available: default, local, saga)"),
    (["mode=sometimes", "python", "x.py"], "Could not find 'mode/sometimes'"),
    (["nodes=3"], "no command given"),
    (["-N", "3", "--", ], "no command given"),
    (["--bogus", "python", "x.py"], "unknown flag '--bogus'"),
    (["nodes=[1", "python", "x.py"], "cannot parse override 'nodes=[1': no viable alternative at input '[1'"),
    (["site.slurm_version=abc", "python", "x.py"], "site.slurm_version='abc' is not a version"),
    (["site=local", "no-such-program-xyz"], "no-such-program-xyz: command not found"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = run_cli(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("toksearch_submit: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "toksearch_runs").exists()  # no run dir, no toksearch.yaml, no job.sbatch


def test_not_a_slurm_host_names_program_and_suggests_local(tmp_path):
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin/nonexistent"}
    result = run_cli(["site.slurm_version=22.05.8", "python", "x.py"], tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "toksearch_submit: error: salloc not found on PATH: this does not look like a SLURM login node "
        "(use site=local to run on this machine)"
    )


def test_help_and_no_arguments(tmp_path):
    assert "usage: toksearch_submit" in run_cli(["--help"], tmp_path).stdout
    result = run_cli([], tmp_path)
    assert result.returncode == 2 and "usage:" in result.stdout


def test_dry_run_prints_everything_and_leaves_nothing(tmp_path, standin_path):
    result = run_cli(["-d", "-b", "nodes=2", "python", "x.py", "--", "ray"], tmp_path,
                     env={**standin_path, "DISPLAY": ""})
    assert result.returncode == 0, result.stderr
    assert "#SBATCH -N 2" in result.stdout
    assert "# run: sbatch --parsable" in result.stdout
    assert read_record(standin_path) == []
    assert list(tmp_path.iterdir()) == []


def test_multirun_dry_run_plans_each_job_and_leaves_nothing(tmp_path, standin_path):
    result = run_cli(["-d", "-m", "nodes=1,2,4", "python", "x.py"], tmp_path, env=standin_path)
    assert result.returncode == 0, result.stderr
    runs = [ln for ln in result.stdout.splitlines() if ln.startswith("# run: salloc")]
    assert [r.split()[4] for r in runs] == ["1", "2", "4"]
    assert list(tmp_path.iterdir()) == []


def test_cfg_prints_composed_tree(tmp_path):
    result = run_cli(["--cfg", "job", "site=saga", "nodes=3"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gpu:volta:1" in result.stdout and "nodes: 3" in result.stdout


def test_config_dir_adds_a_site(tmp_path, standin_path):
    (tmp_path / "conf" / "site").mkdir(parents=True)
    (tmp_path / "conf" / "site" / "mine.yaml").write_text(
        "# @package _global_\nsite:\n  name: mine\ninteractive:\n  salloc: [--partition=mine]\n  srun: []\n")
    result = run_cli(["-d", "--config-dir", "conf", "site=mine", "python", "x.py"], tmp_path, env=standin_path)
    assert result.returncode == 0, result.stderr
    assert "# run: salloc -N 1 --exclusive --partition=mine srun" in result.stdout


def test_user_config_dir_adds_a_site(tmp_path, standin_path):
    user = tmp_path / "userconf"
    (user / "site").mkdir(parents=True)
    (user / "site" / "lab.yaml").write_text("# @package _global_\nsite:\n  name: lab\nbatch:\n  sbatch: [--qos=lab]\n")
    result = run_cli(["-d", "-b", "site=lab", "python", "x.py"], tmp_path,
                     env={**standin_path, "TOKSEARCH_USER_CONF": str(user)})
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --qos=lab" in result.stdout


def test_hostile_arguments_survive_interactive_argv(tmp_path, standin_path):
    """salloc (stand-in) receives COMMAND byte for byte, and the command then sees it too."""
    command = [sys.executable, str(TESTS / "echo_argv.py"), *HOSTILE]
    env = {**standin_path, "DISPLAY": ":0", "STANDIN_SRUN_OPTS": "5", "STANDIN_SLURM_VERSION": "22.05.8"}  # -u -N 1 --propagate --overlap (then the run-dir check)
    result = run_cli(["nodes=2", *command], tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    [salloc] = read_record(standin_path)
    expected = command[:2] + HOSTILE[:8] + HOSTILE[9:]  # the first `--` after COMMAND is dropped
    config = next(tmp_path.rglob("toksearch.yaml"))
    assert salloc[-len(expected) - 6:] == ["--overlap", *checked_command(config, expected)]
    echoed = json.loads(result.stdout.split("ARGV=", 1)[1].splitlines()[0])
    assert echoed == HOSTILE[:8] + HOSTILE[9:]


def test_hostile_arguments_survive_batch_script(tmp_path, standin_path):
    """The generated job.sbatch, executed by bash, hands COMMAND over untouched."""
    odd_dir = tmp_path / "dir with space $x 'q'"
    odd_dir.mkdir()
    command = [sys.executable, str(TESTS / "echo_argv.py"), *HOSTILE]
    result = run_cli(["-b", "--wait", "site=local", *command], odd_dir)
    assert result.returncode == 0, result.stderr
    [out] = list(odd_dir.rglob("job-local.out"))
    echoed = json.loads(out.read_text().split("ARGV=", 1)[1].splitlines()[0])
    assert echoed == HOSTILE[:8] + HOSTILE[9:]
    assert not Path("/tmp/pwned_ts").exists()


def test_batch_submit_prints_job_id_and_runs_script(tmp_path, standin_path):
    result = run_cli(["-b", "nodes=2", sys.executable, str(TESTS / "echo_argv.py"), "x y"], tmp_path, env=standin_path)
    assert result.returncode == 0, result.stderr
    assert "submitted job 4242" in result.stdout
    [sbatch] = read_record(standin_path)
    assert sbatch[:2] == ["sbatch", "--parsable"]
    script = Path(sbatch[2])
    assert script.name == "job.sbatch" and script.parent.parent.parent.name == "toksearch_runs"
    assert 'ARGV=["x y"]' in (script.parent / "slurm-4242.out").read_text()
    assert (script.parent / "toksearch.yaml").exists()


def test_exit_code_of_interactive_job_comes_back(tmp_path):
    result = run_cli(["site=local", sys.executable, "-c", "import sys; sys.exit(7)"], tmp_path)
    assert result.returncode == 7


def test_exit_code_of_waited_batch_job_comes_back(tmp_path):
    result = run_cli(["site=local", "-b", "-w", sys.executable, "-c", "import sys; sys.exit(5)"], tmp_path)
    assert result.returncode == 5
    assert "exit code 5" in result.stdout


def test_job_reads_the_config_the_launcher_wrote(tmp_path):
    code = ("from toksearch_launch.config import load_job_config; c = load_job_config(); "
            "print('NODES', c.nodes, c.site.name, list(c.ray.worker.start))")
    result = run_cli(["site=local", "nodes=2", "ray.worker.start=[--num-cpus=1]", sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "NODES 2 local ['--num-cpus=1']" in result.stdout


def test_interactive_multirun_stops_at_first_failure_unless_keep_going(tmp_path):
    prog = [sys.executable, "-c", "import os, sys; from toksearch_launch.config import load_job_config as l; "
            "n = l().nodes; print('RAN', n); sys.exit(3 if n == 1 else 0)"]
    result = run_cli(["-m", "site=local", "nodes=1,2", *prog], tmp_path)
    assert result.returncode == 3
    assert "RAN 1" in result.stdout and "RAN 2" not in result.stdout and "skipped" in result.stdout
    result = run_cli(["-m", "-k", "site=local", "nodes=1,2", *prog], tmp_path)
    assert result.returncode == 3 and "RAN 2" in result.stdout


def test_cli_imports_neither_ray_nor_pyspark(tmp_path):
    code = (
        "import sys; from toksearch_launch.cli import main; "
        "rc = main(['-d', '-N', '3', 'python', 'x.py', '--', 'ray']); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyspark', 'numpy')); "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_wheel_ships_conf_and_runs_dry_run(tmp_path):
    """Build the wheel, install it into a fresh venv, run toksearch_submit --dry-run from it."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True)
    [wheel] = list(dist.glob("toksearch_launch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for conf in ("config.yaml", "site/default.yaml", "site/saga.yaml", "site/local.yaml", "mode/interactive.yaml",
                 "mode/batch.yaml", "backend/ray.yaml", "backend/spark.yaml"):
        assert f"toksearch_launch/conf/{conf}" in names
    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    site = next((fresh / "lib").glob("python3*/site-packages"))
    with zipfile.ZipFile(wheel) as zf:  # install = unpack the wheel (pure Python) + a console script
        zf.extractall(site)
    deps = Path(subprocess.check_output([sys.executable, "-c", "import hydra, os; print(os.path.dirname(os.path.dirname(hydra.__file__)))"], text=True).strip())
    (site / "zz_deps.pth").write_text(str(deps) + "\n")  # hydra & co. from our venv; our package from the wheel
    work = tmp_path / "work"
    work.mkdir()
    code = "import toksearch_launch, sys; from toksearch_launch.cli import main; print('FROM', toksearch_launch.__file__); sys.exit(main())"
    result = subprocess.run([str(fresh / "bin" / "python"), "-c", code, "--dry-run", "-N", "2", "python", "x.py"],
                            cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stderr
    assert f"FROM {site}" in result.stdout
    assert "# run: salloc -N 2 --exclusive" in result.stdout


def test_x11_failure_names_the_override_that_removes_it(tmp_path, standin_path):
    env = {**standin_path, "DISPLAY": ":99", "STANDIN_FAIL_X11": "1", "STANDIN_SRUN_OPTS": "5"}
    result = run_cli(["nodes=2", sys.executable, "-c", "print('never')"], tmp_path, env=env)
    assert result.returncode == 1
    assert "Cannot stat() local X11 socket" in result.stderr  # salloc's own words still reach the user
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("toksearch_submit: error: salloc could not set up X11 forwarding for DISPLAY=:99: "
                    "run without it by adding 'interactive.salloc=[--time=4:00:00]'")
    # and the suggested override really removes it
    result = run_cli(["nodes=2", "interactive.salloc=[--time=4:00:00]", sys.executable, "-c", "print('ran')"],
                     tmp_path, env=env)
    assert result.returncode == 0 and "ran" in result.stdout
