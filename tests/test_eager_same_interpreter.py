"""The eager wrapper runs `python SCRIPT` / `python -m MODULE` in its own interpreter, after ray.init:
a program that initialises Ray as TokSearch does lands on the job's cluster (issue 9 item 7).

Unit tests: which commands qualify, and that a script run this way behaves as `python SCRIPT`
itself (same output, same exit status, same traceback). Integration: the real CLI on site=local
and on the SLURM test cluster, with real Ray daemons.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from toksearch_launch.cluster import procs
from toksearch_launch.cluster.eager import PythonTarget, python_target, same_interpreter

PY = sys.executable

# ------------------------------------------------------------------ which commands run here


def test_this_interpreter_and_its_aliases_are_the_same():
    assert same_interpreter(PY)
    for alias in ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        path = Path(PY).with_name(alias)
        if path.exists():
            assert same_interpreter(str(path)), path


def test_the_base_interpreter_behind_a_venv_is_another_python(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a venv")
    assert not same_interpreter(os.path.realpath(PY))  # same binary, other site-packages


def test_another_venv_on_the_same_binary_is_another_python(tmp_path):
    other = tmp_path / "venv" / "bin"
    other.mkdir(parents=True)
    (tmp_path / "venv" / "pyvenv.cfg").write_text(f"home = {Path(os.path.realpath(PY)).parent}\n")
    (other / "python").symlink_to(os.path.realpath(PY))
    assert not same_interpreter(str(other / "python"))


def test_a_program_not_on_path_is_not_this_python():
    assert not same_interpreter("no-such-python-anywhere")
    assert not same_interpreter("/bin/sh")


def test_python_target_plain_script_and_module(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("pass\n")
    assert python_target([PY, str(script), "a", "--b"]) == PythonTarget("script", str(script), ("a", "--b"))
    assert python_target([PY, "-m", "json.tool", "x.json"]) == PythonTarget("module", "json.tool", ("x.json",))


@pytest.mark.parametrize("tail", [
    ["-u", "SCRIPT"],            # an interpreter option: the child keeps it
    ["-c", "print(1)"],
    ["-m"],
    ["-m", "no_such_module_xyz"],  # python says "No module named ..." itself
    ["missing.py"],              # python says "can't open file" itself
    [],
])
def test_python_target_other_forms_keep_the_child(tmp_path, tail):
    script = tmp_path / "s.py"
    script.write_text("pass\n")
    command = [PY, *[str(script) if t == "SCRIPT" else t for t in tail]]
    assert python_target(command) is None


def test_python_target_needs_this_python(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("pass\n")
    assert python_target(["/bin/sh", str(script)]) is None


# ------------------------------------------------------------------ runs as python would

SHOW = r"""
import os, sys
print("NAME", __name__)
print("FILE", os.path.basename(__file__))
print("ARGV", sys.argv[1:])
print("PATH0", sys.path[0])
print("SPEC", __spec__ is None or __spec__.name)
import atexit
atexit.register(lambda: print("ATEXIT", flush=True))
what = sys.argv[1] if len(sys.argv) > 1 else ""
if what == "exit":
    sys.exit(int(sys.argv[2]))
if what == "message":
    sys.exit("bad input: no shot column")
if what == "raise":
    def inner():
        raise ValueError("boom")
    inner()
"""

HERE = ("import sys; from toksearch_launch.cluster.eager import run_python, PythonTarget; "
        "sys.exit(run_python(PythonTarget(sys.argv[1], sys.argv[2], tuple(sys.argv[3:]))))")


def _both(kind: str, name: str, args: list[str], cwd: Path) -> tuple:
    """(python itself, run_python in another interpreter) on the same script/module and arguments."""
    direct = [PY, name, *args] if kind == "script" else [PY, "-m", name, *args]
    env = {**os.environ, "PYTHONPATH": ""}
    a = subprocess.run(direct, cwd=cwd, capture_output=True, text=True, env=env, timeout=60)
    b = subprocess.run([PY, "-c", HERE, kind, name, *args], cwd=cwd, capture_output=True, text=True, env=env,
                       timeout=60)
    return a, b


@pytest.mark.parametrize("args", [[], ["exit", "9"], ["exit", "0"], ["message"], ["raise"]],
                         ids=["plain", "exit9", "exit0", "message", "raise"])
def test_a_script_run_here_behaves_as_python_runs_it(tmp_path, args):
    (tmp_path / "sub").mkdir()
    script = tmp_path / "sub" / "show.py"
    script.write_text(SHOW)
    direct, here = _both("script", str(script), args, tmp_path)
    assert here.returncode == direct.returncode, (direct, here)
    assert here.stdout == direct.stdout
    assert here.stderr == direct.stderr  # the traceback starts in the script, as Python's
    assert f"PATH0 {script.parent}" in here.stdout and "NAME __main__" in here.stdout
    assert "ATEXIT" in here.stdout


def test_a_module_run_here_behaves_as_python_m(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "show.py").write_text(SHOW)
    direct, here = _both("module", "pkg.show", ["exit", "4"], tmp_path)
    assert (here.returncode, here.stdout, here.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    assert here.returncode == 4 and "SPEC pkg.show" in here.stdout and f"PATH0 {tmp_path}" in here.stdout


# ------------------------------------------------------------------ the job's Ray cluster, for real

TOKSEARCH_STYLE = r"""
import json, logging, os, sys, tempfile
import ray
from toksearch_launch.cluster import procs

before = ray.is_initialized()
if not ray.is_initialized():  # exactly what TokSearch's compute_ray does
    ray.init(_temp_dir=tempfile.mkdtemp(), logging_level=logging.ERROR)
alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
root = os.path.dirname(os.environ["RAY_AUTH_TOKEN_PATH"])
print("SEEN " + json.dumps({"before": before, "alive": alive, "argv": sys.argv[1:], "root": root,
                            "pid": os.getpid(), "daemons": procs.members(set(), [root])}), flush=True)
sys.exit(int(sys.argv[1]))
"""


def _seen(stdout: str) -> dict:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("SEEN ")), None)
    assert line, stdout
    return json.loads(line[5:])


def _assert_nothing_left(seen: dict) -> None:
    assert seen["daemons"], seen  # the script saw the cluster's processes while it ran
    assert not [p for p in [seen["pid"], *seen["daemons"]] if _alive(p)]
    assert procs.members(set(seen["daemons"]), [seen["root"]]) == []
    assert not os.path.exists(seen["root"])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.cluster
def test_toksearch_style_ray_init_lands_on_the_local_job_cluster(tmp_path):
    script = tmp_path / "toksearch_style.py"
    script.write_text(TOKSEARCH_STYLE)
    result = run_cli(["site=local", "nodes=2", "backend=ray", "backend.start=eager", PY, str(script), "7"],
                     tmp_path, timeout=300)
    assert result.returncode == 7, result.stdout + result.stderr
    seen = _seen(result.stdout)
    assert seen["before"] is True  # connected before the script ran: its own init was skipped
    assert seen["alive"] == ["127.0.0.2", "127.0.0.3"]
    assert seen["argv"] == ["7"]
    assert "No node info found" not in result.stderr
    _assert_nothing_left(seen)
    [log] = list(tmp_path.rglob("logs/ray-cluster.log"))
    assert "nothing left" in log.read_text()


@pytest.mark.slurm
def test_toksearch_style_ray_init_lands_on_the_slurm_job_cluster(tmp_path):
    from slurm_support import TEST_SITE

    script = tmp_path / "toksearch_style.py"
    script.write_text(TOKSEARCH_STYLE)
    result = run_cli([*TEST_SITE, "nodes=3", "backend=ray", "backend.start=eager", PY, str(script), "5"],
                     tmp_path, timeout=400)
    assert result.returncode == 5, result.stdout + result.stderr
    seen = _seen(result.stdout)
    assert seen["before"] is True
    assert seen["alive"] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert not os.path.exists(seen["root"])  # the head node's dir (the script's node shares /tmp)
    [log] = list(tmp_path.rglob("logs/ray-cluster.log"))
    assert re.search(r"stopped 3 daemons in [\d.]+ s; nothing left", log.read_text()), log.read_text()[-2000:]
