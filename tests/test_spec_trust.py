"""A sweep file is code run with the user's rights: reading it is bounded (aliases, nesting),
and environment variables that load code into workers are said at start and kept in each row."""

import json
import time

from conftest import cli, write_spec

from orchestrator import store, sweep
from orchestrator.spec import load


def bomb(levels: int) -> str:
    """An entrypoint's args that a YAML parser expands to 10**levels strings (a few hundred bytes)."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return ("name: b\nworkloads:\n- name: w\n  entrypoint: tests.user_functions:takes_any_args\n  dataset: digits\n"
            f"  args: {{big: [{', '.join(anchors)}]}}\n")


def test_an_alias_bomb_and_deep_nesting_are_one_line_and_exit_2(tmp_path):
    cases = {"bomb.yaml": (bomb(9), "expands to more than 100,000 values (YAML aliases, line 6)"),
             "deep.yaml": ("name: d\nworkloads: " + "[" * 500 + "]" * 500 + "\n", "nesting deeper than 64 levels")}
    for name, (text, says) in cases.items():
        (tmp_path / name).write_text(text)
        started = time.time()
        r = cli(str(tmp_path / name), "--out", str(tmp_path / "out"), timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr[-2000:]
        assert time.time() - started < 30 and not (tmp_path / "out").exists()


def test_aliases_within_bounds_still_load(tmp_path):
    """A few aliases (shared settings) are what YAML is for: only expansion past the bound is refused."""
    (tmp_path / "ok.yaml").write_text(bomb(3))  # 1,000 strings
    assert len(load(tmp_path / "ok.yaml").workloads[0].args["big"]) == 4


def test_code_loading_env_is_said_at_start_and_recorded_in_each_row(ray_local, tmp_path, capsys):
    path = write_spec(tmp_path / "s.yaml", name="env", replicas=1, stacks=[
        {"name": "launch"}, {"name": "startup", "env_vars": {"PYTHONSTARTUP": "/dev/null"}}],
        workloads=[{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}])
    out = tmp_path / "out"
    assert sweep.main([str(path), "--out", str(out)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "PYTHONSTARTUP" in line]
    assert notes == ["note: stack 'startup' sets PYTHONSTARTUP: what it names is loaded into every worker of the "
                     "stack (recorded in each row's env)"]
    envs = {r["stack"]: json.loads(r["env"]) for r in store.read_runs(str(out)).to_pylist()}
    assert envs["startup"]["PYTHONSTARTUP"] == "/dev/null" and "PYTHONSTARTUP" not in envs["launch"]
