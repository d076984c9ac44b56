"""A sweep file is code run with the user's rights: reading it is bounded (aliases, nesting).
(Environment variables that load code into workers are said at start and kept in each row:
tests/test_stacks.py, whose sweep has a stack that sets one.)"""

import time

from conftest import cli

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
