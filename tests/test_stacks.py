"""Stacks: every run executes in a declared software environment (Ray runtime_env), each stack its
own group, paired across stacks in cross_stack; on a real local Ray cluster. The pip stacks build
real virtualenvs from PyPI (six, tiny and pure Python), as a user's would."""

import contextlib
import io
import json
import subprocess
import sys
from importlib.metadata import version

import pytest
import torch

from orchestrator import reduce, spec, stacks, store, sweep, worker
from orchestrator.axes import Stack
from tests.conftest import cli, write_spec

pytestmark = pytest.mark.integration
BROKEN = "tooling-noise-no-such-package==0.0.1"



@pytest.fixture(scope="module")
def stacks_out(ray_local, tmp_path_factory):
    """One sweep over five stacks, control x 2: the launch environment, an env-var stack that
    pins torch's CPU kernels to the baseline ISA (and sets PYTHONSTARTUP, a variable that loads
    code), a pip stack with another version of six than the launch environment's (1.17.0), a pip
    stack that cannot be built, and an interpreter that does not exist (Ray would retry its
    worker's start for ever). Returns the exit code, the rows, OUT and what the sweep printed."""
    tmp = tmp_path_factory.mktemp("stacks")
    path = write_spec(tmp / "s.yaml", name="stacks", replicas=2, fail_fast=1, stacks=[
        {"name": "launch"},
        {"name": "isa-default", "env_vars": {"ATEN_CPU_CAPABILITY": "default", "PYTHONSTARTUP": "/dev/null"}},
        {"name": "six-old", "pip": ["six==1.16.0"]},
        {"name": "broken", "pip": [BROKEN]},
        {"name": "no-python", "py_executable": "/nonexistent/bin/python"}],
        workloads=[{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}])
    out = tmp / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = sweep.main([str(path), "--out", str(out)])
    print(printed.getvalue())  # shown with a failure, as pytest shows set-up output
    return code, store.read_runs(str(out)).to_pandas(), out, printed.getvalue()


def test_each_stack_runs_in_its_own_environment(stacks_out):
    _, df, _, _ = stacks_out
    ok = df[df.status == "ok"]
    assert sorted(ok["stack"].unique()) == ["isa-default", "launch", "six-old"] and len(ok) == 6
    by = {name: g for name, g in ok.groupby("stack")}
    assert (by["isa-default"].cpu_capability == "DEFAULT").all()  # dispatched as the variable asked
    assert all(json.loads(e)["ATEN_CPU_CAPABILITY"] == "default" for e in by["isa-default"].env)
    assert (by["launch"].cpu_capability == torch.backends.cpu.get_cpu_capability()).all()
    assert all("ATEN_CPU_CAPABILITY" not in json.loads(e) for e in by["launch"].env)
    # the version imported inside the worker, not the launch environment's
    assert [json.loads(p)["six"] for p in by["six-old"].packages] == ["1.16.0"] * 2
    assert version("six") != "1.16.0" and all("six" not in json.loads(p) for p in by["launch"].packages)
    assert json.loads(by["six-old"].stack_spec.iloc[0]) == {"name": "six-old", "pip": ["six==1.16.0"]}
    for name, g in by.items():  # control replicas are bitwise identical within a stack
        assert g.weights_sha256.nunique() == 1, name
    assert by["six-old"].fingerprint_id.iloc[0] != by["launch"].fingerprint_id.iloc[0]  # six is in its hash
    assert by["isa-default"].fingerprint_id.iloc[0] != by["launch"].fingerprint_id.iloc[0]


def test_code_loading_env_is_said_at_start_and_recorded_in_each_row(stacks_out):
    """A sweep file is code run with the user's rights: a stack variable that loads code into its
    workers is said once at start and kept in each of the stack's rows."""
    _, df, _, printed = stacks_out
    notes = [line for line in printed.splitlines() if "PYTHONSTARTUP" in line]
    assert notes == ["note: stack 'isa-default' sets PYTHONSTARTUP: what it names is loaded into every worker "
                     "of the stack (recorded in each row's env)"]
    envs = {r.stack: json.loads(r.env) for r in df[df.status == "ok"].itertuples()}
    assert envs["isa-default"]["PYTHONSTARTUP"] == "/dev/null" and "PYTHONSTARTUP" not in envs["launch"]


def test_a_stack_that_cannot_be_built_fails_its_runs_alone(stacks_out):
    code, df, _, _ = stacks_out
    assert code == 1
    broken = df[df["stack"] == "broken"]
    assert sorted(broken.status) == ["failed", "skipped"]  # fail_fast: 1 skips the rest
    error = broken.error.iloc[0]
    assert error.startswith("stack broken: its environment could not be built: ") and "\n" not in error
    assert len(error) < 700
    gone = df[df["stack"] == "no-python"]
    assert sorted(gone.status) == ["failed", "skipped"]
    assert gone.error.iloc[0].startswith("stack no-python: its environment could not be built: py_executable "
                                         "'/nonexistent/bin/python' cannot start here: ")
    assert (df[~df["stack"].isin(["broken", "no-python"])].status == "ok").all()


def test_an_interpreter_without_ray_is_named_with_its_own_error(tmp_path):
    fake = tmp_path / "python"  # an interpreter that starts but cannot import ray
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'ray'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    assert worker.python_error(str(fake)) == (f"py_executable '{fake}' cannot import ray (exit 1): "
                                              "ModuleNotFoundError: No module named 'ray'")
    assert worker.python_error(sys.executable) is None


def test_variance_and_cross_stack_are_per_stack(stacks_out):
    _, _, out, _ = stacks_out
    tables = reduce.reduce(str(out))
    v = tables["variance"]
    assert set(v["stack"]) == {"launch", "isa-default", "six-old", "broken", "no-python"}
    assert (v[~v["stack"].isin(["broken", "no-python"])].identical_fraction == 1).all()
    cs = tables["cross_stack"]
    pairs = {tuple(sorted((r.stack_a, r.stack_b))): r.n_pairs for r in cs.itertuples()}
    assert pairs == {("isa-default", "launch"): 2, ("launch", "six-old"): 2, ("isa-default", "six-old"): 2}


def test_bad_stacks_are_spec_errors_all_at_once(tmp_path):
    path = write_spec(tmp_path / "s.yaml", stacks=[
        {"name": "a", "env_vars": {"OMP_NUM_THREADS": 4}},
        {"name": "b", "pip": ["torch==="]},
        {"name": "c", "pip": ["six"], "image_uri": "registry/x:1"},
        {"name": "d", "conda": "env.yaml"}])
    r = cli(str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any("stacks.0.env_vars.OMP_NUM_THREADS: Input should be a valid string" in s for s in lines)
    assert any("stacks.1.pip: 'torch===' is not a requirement" in s for s in lines)
    assert any("stacks.2: pip and image_uri: a stack takes one of" in s for s in lines)
    assert any("stacks.3.conda: unknown key" in s for s in lines)
    dupes = write_spec(tmp_path / "d.yaml", stacks=[{"name": "x"}, {"name": "x"}])
    with pytest.raises(spec.SpecError, match="stacks: stack names must be unique; 'x' appears more than once"):
        spec.load(dupes)


def test_a_pip_stack_holds_only_what_it_pins_and_is_kept_for_later_sweeps(stacks_out, stacks_home):
    """The six-old stack was built by uv into the tool's folder, layered on the launch environment
    (Ray, torch and this package imported from there, not copied). A second build finds the folder
    ready; `delete` removes only what the tool built."""
    built = stacks.listed()
    assert [e["requirements"] for e in built] == [["six==1.16.0"]]  # the broken stack left nothing behind
    folder = stacks_home / built[0]["key"]
    assert built[0]["bytes"] < 100 * 2**20 and not list(folder.rglob("torch/__init__.py"))
    python = stacks.build(Stack(name="six-old", pip=["six==1.16.0"]))
    assert python == str(folder / "bin" / "python")
    r = subprocess.run([python, "-c", "import six, ray, torch, orchestrator; print(six.__version__)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "1.16.0", r.stderr
    (stacks_home / "not-ours").mkdir()
    assert stacks.main(["delete", "--all"]) == 0
    assert stacks.listed() == [] and (stacks_home / "not-ours").is_dir()


def test_an_unresolvable_requirement_fails_at_once_with_the_installers_line(stacks_home):
    with pytest.raises(stacks.BuildError, match="tooling-noise-no-such-package was not found"):
        stacks.build(Stack(name="broken", pip=[BROKEN]))
    assert stacks.listed() == [] and not list(stacks_home.glob("*/bin"))  # no half-built folder left


def test_the_eta_counts_the_environment_builds_ahead(stacks_home, tmp_path):
    """The run rate cannot foresee a first build (minutes where a run took seconds): the progress
    line adds the builds still ahead, one per environment, none once it is ready on this node."""
    progress = sweep.make_progress(4, str(tmp_path), None, sweep.FailFast(0), {})
    pinned = [Stack(name="a", pip=["six==1.15.0"]), Stack(name="b", uv=["six==1.15.0", "idna==3.7"])]
    progress.ahead = [Stack(name="launch"), *pinned, Stack(name="a-again", pip=["six==1.15.0"])]
    assert progress.builds() == " + 2 environment builds"
    ready = stacks.home() / stacks.key(pinned[0]) / stacks.READY
    ready.parent.mkdir(parents=True)
    ready.write_text("{}")  # as a finished build leaves it
    try:
        assert progress.builds() == " + 1 environment build"
    finally:
        ready.unlink()
        ready.parent.rmdir()
