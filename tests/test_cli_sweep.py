"""The CLI's Hydra side (toksearch_launch.sweep): sweep expansion, --config-dir, --cfg, --info, run dirs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import run_cli
from toksearch_launch import sweep
from toksearch_launch.cli import UsageError, hydra_request, split_argv


def hydra_basic_sweeper_jobs(overrides):
    """Hydra's own basic sweeper on the same overrides: the reference for :func:`sweep.expand`."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    [batch] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    return batch


@pytest.mark.parametrize("overrides", [
    ["nodes=1,2,4"],
    ["site=default,saga", "nodes=1,2", "mode=batch"],
    ["nodes=range(1,4)", "~y", "+x=a,b"],
    ["nodes=1,2", "site=saga", "nodes=3,4"],  # a key given again: first place, last value
    ["ray.worker.start=['--num-cpus=4'],['--num-cpus=8']", "nodes=sort(3,1,2)"],
])
def test_expand_gives_the_jobs_hydras_basic_sweeper_gives(overrides):
    assert sweep.expand(overrides) == hydra_basic_sweeper_jobs(overrides)


def test_expand_gives_hydra_overrides_to_every_job_first():
    jobs = sweep.expand(["nodes=1,2", "hydra.sweep.dir=out", "site=saga"])
    assert jobs == [["hydra.sweep.dir=out", "nodes=1", "site=saga"], ["hydra.sweep.dir=out", "nodes=2", "site=saga"]]


@pytest.mark.parametrize("override, message", [
    ("hydra.run.dir=a,b", "Sweeping over Hydra's configuration is not supported: 'hydra.run.dir=a,b'"),
    ("nodes=interval(1,4)", "cannot sweep 'nodes=interval(1,4)'"),
])
def test_expand_refuses_what_it_cannot_sweep(override, message):
    with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.expand([override])


def test_expand_lists_a_group_with_glob():
    from hydra.core.global_hydra import GlobalHydra

    with sweep.session():
        jobs = sweep.expand(["site=glob(*)"], GlobalHydra.instance().config_loader())
    assert jobs == [["site=default"], ["site=local"], ["site=saga"]]


def test_config_dirs_come_before_the_profile_dir_and_survive_odd_names(tmp_path, monkeypatch):
    odd = tmp_path / "a b, it's [x]"
    odd.mkdir()
    monkeypatch.setenv("TOKSEARCH_USER_CONF", str(tmp_path / "profiles"))
    [searchpath] = sweep.with_config_dirs([], [str(odd)])
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override(searchpath).value() == [f"file://{odd}", f"file://{tmp_path}/profiles"]


def test_config_dirs_join_a_searchpath_given_on_the_command_line(tmp_path):
    overrides = sweep.with_config_dirs(["nodes=2", "hydra.searchpath=[pkg://x.conf]"], [str(tmp_path)])
    assert overrides == ["nodes=2", f"hydra.searchpath=['file://{tmp_path}','pkg://x.conf']"]


def test_a_missing_config_dir_is_refused():
    with pytest.raises(sweep.SweepError, match="Additional config directory '/no/such/dir' not found"):
        sweep.with_config_dirs([], ["/no/such/dir"])


def test_hydra_request_reads_the_flags_back():
    req = hydra_request(split_argv(["--info", "site=saga", "--config-dir", "/tmp", "nodes=2"]).hydra_args)
    assert (req.info, req.config_dirs, req.overrides) == ("all", ["/tmp"], ["site=saga", "nodes=2"])
    req = hydra_request(split_argv(["--cfg", "hydra", "--resolve", "-N", "3"]).hydra_args)
    assert (req.cfg, req.resolve, req.overrides, req.multirun) == ("hydra", True, ["nodes=3"], False)


@pytest.mark.parametrize("argv, message", [
    (["--cfg", "bogus"], "--cfg takes one of job, hydra, all (got 'bogus')"),
    (["--info=bogus"], "--info takes one of all, config, defaults, defaults-tree, plugins, searchpath (got 'bogus')"),
])
def test_split_refuses_unknown_cfg_and_info_values(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_argv(argv)


@pytest.mark.parametrize("args, message", [
    (["-m", "--cfg", "job"], "only one of -m, --cfg and --info can be given"),
    (["--resolve", "python", "x.py"], "--resolve goes with --cfg"),
    (["-m", "hydra.run.dir=a,b", "python", "x.py"], "Sweeping over Hydra's configuration is not supported"),
    (["nodes=1,2", "python", "x.py"], "Ambiguous value for argument 'nodes=1,2'"),
    (["--config-dir", "nope", "python", "x.py"], "Additional config directory"),
    (["--cfg", "bogus"], "--cfg takes one of job, hydra, all"),
])
def test_bad_hydra_flags_are_one_line_exit_2_and_leave_nothing(tmp_path, args, message):
    result = run_cli(args, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("toksearch_submit: error: ") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_info_searchpath_shows_the_config_dir_then_the_profiles(tmp_path):
    (tmp_path / "conf").mkdir()
    result = run_cli(["--info", "searchpath", "--config-dir", "conf"], tmp_path,
                     env={"TOKSEARCH_USER_CONF": str(tmp_path / "profiles")})
    assert result.returncode == 0, result.stderr
    rows = [ln for ln in result.stdout.splitlines() if "file://" in ln or "pkg://" in ln]
    assert [row.split("|")[2].strip() for row in rows] == [
        "pkg://hydra.conf", "pkg://toksearch_launch.conf", f"file://{tmp_path}/conf", f"file://{tmp_path}/profiles"]


def test_info_followed_by_an_override_composes_with_it(tmp_path):
    """`--info site=saga` used to hand `site=saga` to Hydra as the info topic."""
    result = run_cli(["--info", "site=saga"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| site/saga " in result.stdout  # the defaults list is the one with the override
    assert list(tmp_path.iterdir()) == []


def test_cfg_hydra_resolved_names_the_run_dir(tmp_path):
    result = run_cli(["--cfg", "hydra", "--resolve", "hydra.run.dir=out/here"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "    dir: out/here" in result.stdout and "${" not in result.stdout.split("searchpath")[0]
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_writes_only_its_jobs_run_dirs_with_each_jobs_hydra_values(tmp_path):
    """No multirun.yaml; one sweep dir for every job; ${hydra:job.num} and hydra.job.env_set reach each job."""
    code = ("import os; from toksearch_launch.config import load_job_config as l; c = l(); "
            "print('RAN', c.nodes, c.batch.job_name, os.environ.get('TS_FROM_HYDRA'), os.environ['TOKSEARCH_RUN_DIR'])")
    result = run_cli(["-m", "site=local", "nodes=1,2", "batch.job_name=job${hydra:job.num}",
                      "+hydra.job.env_set.TS_FROM_HYDRA=yes", sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    ran = [ln.split() for ln in result.stdout.splitlines() if ln.startswith("RAN")]
    assert [r[1:4] for r in ran] == [["1", "job0", "yes"], ["2", "job1", "yes"]]
    run_dirs = [Path(r[4]) for r in ran]
    assert [d.name for d in run_dirs] == ["0", "1"] and run_dirs[0].parent == run_dirs[1].parent
    assert sorted(p.relative_to(run_dirs[0].parent).as_posix() for p in run_dirs[0].parent.rglob("*")) == [
        "0", "0/command.json", "0/jobs.jsonl", "0/toksearch.yaml", "1", "1/command.json", "1/jobs.jsonl",
        "1/toksearch.yaml"]  # jobs.jsonl: each attempt's start and exit code (docs/durability.md)


def test_sweep_dir_from_the_command_line(tmp_path):
    result = run_cli(["-m", "site=local", "nodes=1,2", "hydra.sweep.dir=mine", sys.executable, "-c", "print('ok')"],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["0", "1"]


def test_a_config_dir_site_whose_list_is_replaced_is_named_in_the_note(tmp_path, standin_path):
    """The note composes the site again without the override: with the --config-dir search path too."""
    (tmp_path / "conf" / "site").mkdir(parents=True)
    (tmp_path / "conf" / "site" / "mine.yaml").write_text(
        "# @package _global_\nsite:\n  name: mine\ninteractive:\n  salloc: [--partition=mine]\n  srun: []\n")
    result = run_cli(["-d", "--config-dir", "conf", "site=mine", "site.slurm_version=22.05.8",
                      "interactive.salloc=[--time=1:00:00]", "python", "x.py"], tmp_path, env=standin_path)
    assert result.returncode == 0, result.stderr
    assert ("# note: interactive.salloc=[...] replaces the site=mine options and drops --partition=mine "
            "(to add options instead, use interactive.salloc_extra=[...])") in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]
