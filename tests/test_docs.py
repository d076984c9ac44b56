"""The table of built-in datasets in docs/datasets.md is generated from workloads/data.py's DATASETS
(the one place they are declared), so it cannot drift: `python -m tests.test_docs` prints it."""

import inspect
import json
import shlex

from orchestrator import sweep
from orchestrator.spec import load
from tests.conftest import ROOT
from workloads.data import DATASETS

BEGIN, END = "<!-- datasets table: python -m tests.test_docs -->", "<!-- end of datasets table -->"


def datasets_table() -> str:
    """One row per built-in dataset: its `dataset_args` with defaults, and its docstring's first line."""
    rows = ["| `dataset` | `dataset_args` (default) | what it is |", "|---|---|---|"]
    for name, fn in DATASETS.items():
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "root"]
        args = ", ".join(f"`{p.name}` ({json.dumps(p.default)})" if p.default is not p.empty else f"`{p.name}`"
                         for p in params) or "none"
        summary = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
        rows.append(f"| `{name}` | {args} | {summary.replace('|', '/')} |")
    return "\n".join([BEGIN, *rows, END])


def test_docs_datasets_table_is_the_code_s():
    assert datasets_table() in (ROOT / "docs/datasets.md").read_text()


def readme_commands() -> list[list[str]]:
    """The `tooling-noise <sweep file> …` commands of README.md's shell blocks, continuations joined."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("#")[0].split("||")[0])[1:] for line in text.splitlines()
            if line.startswith("tooling-noise ")]


def test_the_readme_s_sweep_commands_are_valid_sweeps():
    """Every sweep command the README shows (shipped files, `--set` overrides) passes the same check
    `tooling-noise` runs before anything starts; the laptop upgrade check runs on a CPU as promised."""
    checked = {}
    for argv in readme_commands():
        args = sweep.parse_args(argv)
        if (ROOT / args.config).exists():  # `my_check.yaml` is the reader's own copy
            checked[args.config] = load(ROOT / args.config, args.overrides)
    laptop = checked["sweeps/upgrade_check.yaml"]
    assert laptop.accelerators == ["any"] and laptop.resources.gpus == 0
    assert [w.dataset for w in laptop.workloads] == ["digits"] and {s.name for s in laptop.stacks} == {
        "launch", "torch-2.13"}
    assert len(checked) >= 3


if __name__ == "__main__":
    print(datasets_table())
