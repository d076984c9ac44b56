"""The table of built-in datasets in docs/datasets.md is generated from workloads/data.py's DATASETS
(the one place they are declared), so it cannot drift: `python -m tests.test_docs` prints it."""

import inspect
import json

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


if __name__ == "__main__":
    print(datasets_table())
