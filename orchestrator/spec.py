"""The sweep spec: pydantic models that are the single source of truth for configuration.

`SweepSpec` is what a user writes (YAML); `expand()` turns it into one `RunSpec` per replica run.
A run's id hashes what makes it that run, so the same spec gives the same ids on any machine and
a re-run of a sweep can tell which runs are already done.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import itertools
import json
import math
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, Discriminator, Field, PositiveInt, Tag, ValidationError, ValidationInfo,
                      create_model, field_validator, model_validator)

from orchestrator.axes import AXES, Name, Stack, Strict
from orchestrator.noise import PRESETS, Seeds, seeds_for

# Validation context of a spec the driver has already expanded (see `expanded`): its names were
# checked there, and checking them again would import torch and the user's modules.
EXPANDED = {"expanded": True}


def _checking(info: ValidationInfo) -> bool:
    return not (info.context or {}).get("expanded")


class Workload(Strict):
    arch: str
    dataset: str
    dataset_root: str | None = None  # folder holding the dataset's files (text: the file); unused by generated data
    dataset_args: dict[str, int | float | str | bool | list[str]] = {}  # loader options
    arch_args: dict[str, int | float | str | bool] = {}  # builder options, e.g. {batch_norm: true}
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 128  # examples per step (token datasets: windows per step)
    lr: Annotated[float, Field(gt=0)] = 0.01  # peak learning rate of the schedule
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    weight_decay: Annotated[float, Field(ge=0)] = 0.0  # adamw: decoupled
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"  # stepped per optimiser step
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0  # linear warm-up (constant, cosine); fractions allowed
    grad_clip: Annotated[float, Field(gt=0)] | None = None  # max global L2 norm of the gradients; null: off
    augmentation: Literal["none", "crop", "flip", "crop+flip"] = "none"  # on-device, augment generator
    replicas: PositiveInt | None = None  # overrides the sweep's replicas for this workload

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str, info: ValidationInfo) -> str:
        if not _checking(info):
            return v
        from workloads.models import MODELS, UnknownModel, builder

        try:
            builder(v)
        except UnknownModel as e:  # torchvision:/timm: names: the message says how to list valid ones
            raise ValueError(str(e)) from None
        except (KeyError, ImportError, AttributeError, ValueError):
            raise ValueError(f"unknown arch {v!r}; choose one of {', '.join(sorted(MODELS))}, "
                             "torchvision:<name>, timm:<name>, or give package.module:function") from None
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str, info: ValidationInfo) -> str:
        if not _checking(info):
            return v
        from workloads.data import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of {', '.join(sorted(DATASETS))}")
        return v

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Workload:
        """Rules between the workload's own fields, every broken one reported."""
        if not _checking(info):
            return self
        from workloads.data import TOKEN_DATASETS
        from workloads.models import NAMED_MODELS, TOKEN_MODELS

        tokens = self.dataset in TOKEN_DATASETS
        problems = []
        if tokens and self.augmentation != "none":
            problems.append(f"augmentation: {self.augmentation} crops or flips images; dataset {self.dataset} is "
                            "tokens, so use none (dropout, arch_args.dropout, still draws from the augment source)")
        own = ":" in self.arch and self.arch.partition(":")[0] not in NAMED_MODELS  # package.module:function
        if not own and tokens != (self.arch in TOKEN_MODELS):
            problems.append(f"arch: {self.arch} takes {'token windows' if self.arch in TOKEN_MODELS else 'images'} "
                            f"but dataset {self.dataset} gives {'tokens' if tokens else 'images'}; "
                            f"use {'gpt' if tokens else 'an image model (e.g. vit)'} or another dataset")
        if self.schedule == "onecycle" and self.warmup_epochs:
            problems.append("warmup_epochs: onecycle warms up by itself (torch's OneCycleLR: the first 30% of "
                            "steps); set 0 or use schedule cosine")
        if self.warmup_epochs > self.epochs:
            problems.append(f"warmup_epochs: {self.warmup_epochs} is longer than the {self.epochs} epochs trained")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class EntrypointWorkload(Strict):
    """The user's own training function, called as `fn(ctx, **args)` (orchestrator/entrypoint.py)
    after the run's noise settings are applied. `name` fills the `arch` column."""

    entrypoint: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]  # package.module:function
    name: Name
    dataset: Name  # names the test set: runs of one dataset must return the same labels, in the same order
    # keyword arguments of the function (JSON-able values); checked against its signature even when left out
    args: dict[str, Any] = Field(default={}, validate_default=True)
    replicas: PositiveInt | None = None  # overrides the sweep's replicas for this workload

    @field_validator("entrypoint")
    @classmethod
    def _imports(cls, v: str, info: ValidationInfo) -> str:
        if not _checking(info):
            return v
        from workloads.models import builder

        try:
            fn = builder(v)
        except Exception as e:  # noqa: BLE001 - any import-time failure of user code is a spec error
            raise ValueError(f"cannot import {v!r} ({type(e).__name__}: {e}); check the module is on "
                             "PYTHONPATH and the function exists") from None
        if not callable(fn):
            raise ValueError(f"{v!r} is not a function; give package.module:function")
        return v

    @field_validator("args")
    @classmethod
    def _fits_signature(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The function is imported when the file is checked, so an `args` key it does not take (or a
        required argument left out) is found here, not after the sweep has started its runs."""
        if not _checking(info) or "entrypoint" not in info.data:
            return v
        from workloads.models import builder

        problem = signature_problem(info.data["entrypoint"], builder(info.data["entrypoint"]), v)
        if problem:
            raise ValueError(problem)
        return v

    @property
    def arch(self) -> str:
        return self.name

    @property
    def epochs(self) -> None:
        """Unknown until the function returns: the row then counts its `ctx.report` calls."""
        return None


def signature_problem(name: str, fn: Callable, args: dict[str, Any]) -> str | None:
    """What keeps `fn(ctx, **args)` from binding, in words with the fix; None when it binds."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]  # the first is ctx
    except (TypeError, ValueError):  # a builtin or C function without a signature: cannot tell
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        taken = None
    else:
        taken = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in args if taken is not None and k not in taken]
    if unknown:
        close = difflib.get_close_matches(unknown[0], taken, n=1)
        takes = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(taken) or 'no arguments'};"
        return f"{unknown[0]!r} is not an argument of {name}; {takes} fix or remove the key"
    missing = [p.name for p in params if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in args]
    if missing:
        return f"{name} requires {missing[0]!r}, which has no default; add it under args"
    return None


def _workload_kind(v: object) -> str:
    return "entrypoint" if isinstance(v, EntrypointWorkload) or (isinstance(v, dict) and "entrypoint" in v) \
        else "builtin"


# A workload with an `entrypoint` key is the user's own training; anything else the built-in loop.
AnyWorkload = Annotated[Annotated[Workload, Tag("builtin")] | Annotated[EntrypointWorkload, Tag("entrypoint")],
                        Discriminator(_workload_kind)]
WORKLOAD_TAGS = ("builtin", "entrypoint")


class NoiseSet(Strict):
    """An explicit set of varying sources, for combinations no preset names."""

    name: Name
    vary: list[Literal["init", "order", "augment", "impl", "bitflip"]]


def _known_preset(v: str) -> str:
    if v not in PRESETS:
        raise ValueError(f"unknown preset {v!r}; choose from {', '.join(PRESETS)} or give {{name, vary}}")
    return v


# A noise entry is a preset name or a {name, vary} set. Choosing the branch by the entry's type
# (instead of trying both) makes the error the one of that branch: `unknown preset 'algoo'`, not
# a union message about both shapes.
NOISE_TAGS = ("preset", "noise_set")
# pydantic puts a union's tag in error locations (workloads.0.builtin.epochs); _format drops it
UNION_TAGS = {"workloads": WORKLOAD_TAGS, "noise": NOISE_TAGS}
Preset = Annotated[str, AfterValidator(_known_preset)]


def _noise_tag(v: object) -> str | None:
    return "preset" if isinstance(v, str) else "noise_set" if isinstance(v, (dict, NoiseSet)) else None


NoiseEntry = Annotated[
    Union[Annotated[Preset, Tag("preset")], Annotated[NoiseSet, Tag("noise_set")]],
    Discriminator(_noise_tag,
                  custom_error_type="noise_entry", custom_error_message="expected a preset name or {name, vary}")]

# Both built from orchestrator/axes.py, where each tooling axis is declared once.
Tooling = create_model(
    "Tooling", __base__=Strict,
    __doc__="Settings that are not random but change bits: a list of values per axis, every combination its own group.",
    **{a.name: (Annotated[list[a.type], Field(min_length=1, description=a.doc)], [a.default])
       for a in AXES if a.listed_in is None})
ToolingValues = create_model(
    "ToolingValues", __base__=Strict, __doc__="The value of every tooling axis that one run or probe uses.",
    **{a.name: (a.type, a.default) for a in AXES})


class Overhead(Strict):
    """The determinism-cost probe: per (workload, accelerator), one trial on a whole device that
    rotates blocks of training steps in each mode (default kernels, deterministic kernels without
    and with the NaN fill) on the same data; see orchestrator/probe.py."""

    steps: PositiveInt = 50  # timed steps per block
    warmup: Annotated[int, Field(ge=0)] = 5  # untimed steps per block before the timed ones (autotuning, caches)
    # rounds of one block per mode; the intervals resample whole rounds. 6 = two rotations of three modes
    repeats: PositiveInt = 6
    # torch's deterministic mode also NaN-fills every new uninitialised tensor (a memset per
    # allocation, a real cost even where kernels are the same), timed as a mode of its own; false
    # leaves that mode out: kernels only, a third cheaper, no total
    fill_uninitialized_memory: bool = True


class Resources(Strict):
    cpus: Annotated[float, Field(gt=0)] = 1
    gpus: Annotated[float, Field(ge=0)] = 0  # fractional packs small replicas on one GPU


class SweepSpec(Strict):
    name: Name
    base_seed: int = 0
    out: str | None = None  # local path, s3://bucket/prefix or gs://bucket/prefix; default results/<name>
    replicas: PositiveInt = 5
    noise: list[NoiseEntry] = ["control", "algo", "impl", "algo+impl"]  # presets or {name, vary}
    accelerators: list[Name] = ["any"]  # V100, T4, A100, L4, H100, ... or any
    tooling: Tooling = Tooling()
    # software environments; every run executes in each (see axes.Stack); default: the launch environment
    stacks: Annotated[list[Stack], Field(min_length=1)] = [Stack(name="launch")]
    resources: Resources = Resources()
    max_retries: Annotated[int, Field(ge=0)] = 1  # retries after a worker process dies
    # a workload whose first fail_fast runs all fail with the same error is not run further (its
    # other runs are recorded `skipped`); 0 = off
    fail_fast: Annotated[int, Field(ge=0)] = 3
    overhead: Overhead | None = None  # determinism-cost probes, one per (workload, accelerator); absent = none
    workloads: Annotated[list[AnyWorkload], Field(min_length=1)]

    @field_validator("stacks")
    @classmethod
    def _unique_stacks(cls, v: list[Stack]) -> list[Stack]:
        names = [s.name for s in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"stack names must be unique; {', '.join(map(repr, dupes))} appears more than once")
        return v

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> SweepSpec:
        problems = [] if (info.context or {}).get("fields_only") else cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def out_uri(self) -> str:
        return self.out or f"results/{self.name}"


MAX_RUNS = 1_000_000  # a bigger grid is a typo (replicas: 100000000), not a study


def axis_values(spec: SweepSpec, axis) -> list:
    """The values a sweep lists for a tooling axis."""
    return getattr(spec, axis.listed_in) if axis.listed_in else getattr(spec.tooling, axis.name)


def tooling_grid(spec: SweepSpec) -> list[dict]:
    """Every combination of tooling values, {axis name: value}, in a stable order."""
    return [dict(zip((a.name for a in AXES), values))
            for values in itertools.product(*(axis_values(spec, a) for a in AXES))]


def n_runs(spec: SweepSpec) -> int:
    """What `expand` would return, counted without building it."""
    axes = [spec.noise, spec.accelerators, *(axis_values(spec, a) for a in AXES)]
    per_replica = math.prod(map(len, axes))
    return per_replica * sum(w.replicas or spec.replicas for w in spec.workloads)


def _pinned_runs_need_gpus(s: SweepSpec) -> str | None:
    if any(a != "any" for a in s.accelerators) and s.resources.gpus == 0:
        return "resources.gpus: runs pinned to an accelerator need gpus > 0 (e.g. 1 or 0.5)"


def _something_to_run(s: SweepSpec) -> str | None:
    if not s.noise and s.overhead is None:
        return ("noise: empty, so there are no replica runs; list presets, or add an overhead section "
                "for a sweep of probes only")


def _probes_need_data_in_memory(s: SweepSpec) -> str | None:
    if s.overhead is not None and any(isinstance(w, Workload) and w.dataset_args.get("stream") for w in s.workloads):
        return ("overhead: the probe replays batches held in memory, so it cannot time a "
                "workload with dataset_args.stream; remove the overhead section or stream")


def _bitflip_needs_builtin_model(s: SweepSpec) -> str | None:
    """The flip lands on a model the harness builds; a user's function builds its own, unseen."""
    if any("bitflip" in vary for _, vary in _noise_sets(s)) and any(
            isinstance(w, EntrypointWorkload) for w in s.workloads):
        return ("noise: bitflip flips a bit of the model the built-in loop builds; entrypoint workloads "
                "build their own, so drop bitflip or run it on built-in workloads in another sweep")


def _world_size_splits_the_batch(s: SweepSpec) -> str | None:
    """Data parallelism must change only the distribution: the global batch is split evenly."""
    for w in s.workloads:
        for k in s.tooling.world_size:
            if isinstance(w, Workload) and w.batch_size % k:
                return (f"tooling.world_size: {k} does not divide batch_size {w.batch_size} of {w.arch} on "
                        f"{w.dataset}; the global batch is split evenly over the ranks, so pick a batch_size "
                        "that every world size divides")


def _world_size_needs_whole_gpus(s: SweepSpec) -> str | None:
    if max(s.tooling.world_size) > 1 and 0 < s.resources.gpus < 1:
        return (f"resources.gpus: {s.resources.gpus:g} GPU per rank; NCCL needs a GPU of its own per rank, "
                "so give gpus: 1 (or 0 for gloo on CPUs) when world_size > 1")


def _world_size_needs_data_in_memory(s: SweepSpec) -> str | None:
    if max(s.tooling.world_size) > 1 and any(isinstance(w, Workload) and w.dataset_args.get("stream")
                                             for w in s.workloads):
        return ("tooling.world_size: streamed image folders (dataset_args.stream) train in one process; "
                "run them at world_size 1, or hold the dataset in memory")


def _bounded(s: SweepSpec) -> str | None:
    if (n := n_runs(s)) > MAX_RUNS:
        return (f"replicas: the sweep expands to {n:,} runs, more than the {MAX_RUNS:,} one sweep may hold; "
                "lower replicas or split the grid into several sweeps")


# Rules between fields, each with the fields it reads. `parse` also checks them when other fields
# are invalid, skipping a rule only while a field it reads is itself wrong: every problem at once.
CROSS_FIELD = {_pinned_runs_need_gpus: {"accelerators", "resources"}, _something_to_run: {"noise", "overhead"},
               _probes_need_data_in_memory: {"overhead", "workloads"},
               _bitflip_needs_builtin_model: {"noise", "workloads"},
               _world_size_splits_the_batch: {"tooling", "workloads"},
               _world_size_needs_whole_gpus: {"tooling", "resources"},
               _world_size_needs_data_in_memory: {"tooling", "workloads"},
               _bounded: {"workloads", "replicas", "noise", "tooling", "accelerators"}}


def cross_field_problems(spec: SweepSpec, skip: set[str] = frozenset()) -> list[str]:
    return [p for rule, fields in CROSS_FIELD.items() if not fields & skip and (p := rule(spec))]


class RunSpec(ToolingValues):
    """One replica run: everything a worker needs, nothing it has to look up (its tooling values
    are the fields of ToolingValues: `spec.num_threads`, `spec.precision`, `spec.stack`, ...)."""

    run_id: str
    sweep: str
    workload: AnyWorkload
    noise: str
    vary: frozenset[Literal["init", "order", "augment", "impl", "bitflip"]]
    replica: int
    seeds: Seeds
    accelerator: str
    cpus: float  # per worker process
    gpus: float
    max_retries: int


def _noise_sets(spec: SweepSpec) -> list[tuple[str, frozenset[str]]]:
    return [(n, PRESETS[n]) if isinstance(n, str) else (n.name, frozenset(n.vary)) for n in spec.noise]


def file_safe(text: str) -> str:
    """Ids name files: a `module:function` arch must not put ':' or '/' in a path."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _off_default(tooling: dict) -> dict:
    """The axes of `tooling` not at their default, as they enter an id. `num_threads` is hashed
    apart, default included, as it was before the other axes existed: adding an axis keeps every
    earlier id valid."""
    return {a.name: a.key(tooling[a.name]) for a in AXES if a.name != "num_threads" and tooling[a.name] != a.default}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def run_id(spec: SweepSpec, workload: Workload, noise: str, accelerator: str, replica: int, tooling: dict) -> str:
    """Readable prefix + hash of what defines the run (`tooling`: every axis's value)."""
    key = {"sweep": spec.name, "base_seed": spec.base_seed,
           "workload": workload.model_dump(mode="json", exclude_defaults=True),
           "noise": noise, "num_threads": tooling["num_threads"], "accelerator": accelerator, "replica": replica}
    if extra := _off_default(tooling):
        key["tooling"] = extra
    return f"{file_safe(f'{workload.arch}-{workload.dataset}-{noise}')}-r{replica}-{_digest(key)}"


def expand(spec: SweepSpec) -> list[RunSpec]:
    """Every (workload, noise, tooling values, accelerator, replica) as a RunSpec, in a stable order."""
    runs = []
    for w, (noise, vary), tooling, acc in itertools.product(spec.workloads, _noise_sets(spec), tooling_grid(spec),
                                                           spec.accelerators):
        for r in range(w.replicas or spec.replicas):
            runs.append(RunSpec(
                run_id=run_id(spec, w, noise, acc, r, tooling), sweep=spec.name, workload=w,
                noise=noise, vary=vary, replica=r, seeds=seeds_for(spec.base_seed, vary, r),
                accelerator=acc, cpus=max(spec.resources.cpus, tooling["num_threads"]),
                gpus=spec.resources.gpus, max_retries=spec.max_retries, **tooling))
    return runs


class ProbeSpec(ToolingValues):
    """One determinism-overhead probe (see orchestrator/probe.py): a workload timed with and without
    deterministic kernels, side by side, on one whole device, at one value of every tooling axis
    (`cudnn_benchmark` included: both modes run at it, so the overhead is determinism's alone)."""

    probe_id: str
    sweep: str
    workload: Workload
    accelerator: str
    overhead: Overhead
    seeds: Seeds  # the control seeds: every probe of a sweep starts from the same weights and batches
    cpus: float
    gpus: float  # 0 or 1: a probe never shares a GPU, another trial's kernels would land in its timings
    max_retries: int


def expand_probes(spec: SweepSpec) -> list[ProbeSpec]:
    """One probe per (built-in workload, accelerator) when the sweep has an `overhead` section, with the first
    value of every tooling axis, at world size 1: a probe times one process's steps (what data-parallel
    collectives add is not determinism's cost). Ids hash like run ids, with their own prefix."""
    if spec.overhead is None:
        return []
    tooling = tooling_grid(spec)[0] | {"world_size": 1}
    probes = []
    builtin = [w for w in spec.workloads if isinstance(w, Workload)]  # user training has no probe
    for w, acc in itertools.product(builtin, spec.accelerators):
        key = {"kind": "probe", "sweep": spec.name, "base_seed": spec.base_seed,
               "workload": w.model_dump(mode="json", exclude_defaults=True), "accelerator": acc,
               "overhead": spec.overhead.model_dump(mode="json", exclude_defaults=True),
               "num_threads": tooling["num_threads"], "tooling": _off_default(tooling)}
        probes.append(ProbeSpec(
            probe_id=f"probe-{file_safe(w.arch)}-{w.dataset}-{acc}-{_digest(key)}", sweep=spec.name, workload=w,
            accelerator=acc, overhead=spec.overhead, seeds=seeds_for(spec.base_seed, frozenset(), 0),
            cpus=max(spec.resources.cpus, tooling["num_threads"]), gpus=1 if spec.resources.gpus > 0 else 0,
            max_retries=spec.max_retries, **tooling))
    return probes


def expanded(item: str | dict) -> RunSpec | ProbeSpec:
    """A RunSpec or ProbeSpec (JSON or its dict) as `expand`/`expand_probes` made it: parsed
    without checking its names again, so that a coordinating trial never imports torch or the
    user's modules (its child process imports them, when it trains)."""
    item = json.loads(item) if isinstance(item, str) else item
    return (ProbeSpec if "probe_id" in item else RunSpec).model_validate(item, context=EXPANDED)


class SpecError(ValueError):
    """Bad input: the message names the field and the fix, one line per problem."""


def _format(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")  # cross-field checks name their field themselves
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or fix its spelling"
        loc = [p for i, p in enumerate(e["loc"]) if not (i == 2 and p in UNION_TAGS.get(e["loc"][0], ()))]
        field = ".".join(str(p) if isinstance(p, int) or p.isidentifier() else repr(p) for p in loc)
        lines += [f"{field}: {m}" if field else m for m in msg.splitlines()]
    return lines


# Stand-ins for required fields that are themselves invalid, so that the other fields can still
# be checked against each other (rules reading a stand-in are skipped).
_STAND_INS = {"name": "x", "workloads": [{"arch": "mlp", "dataset": "digits"}]}


def _rules_beside_field_errors(doc: object, err: ValidationError) -> list[str]:
    """The cross-field problems among the fields that did validate."""
    bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
    if not isinstance(doc, dict) or not bad:
        return []
    rest = {k: v for k, v in doc.items() if k not in bad} | {k: v for k, v in _STAND_INS.items() if k in bad}
    try:
        valid = SweepSpec.model_validate(rest, context={"fields_only": True})
    except ValidationError:
        return []
    return cross_field_problems(valid, skip=bad)


def parse(doc: object, source: str = "spec") -> SweepSpec:
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as e:
        lines = _format(e) + _rules_beside_field_errors(doc, e)
        raise SpecError("\n".join(f"{source}: {line}" for line in lines)) from None


# A sweep file is code run with the user's rights, but reading one must stay bounded: an alias
# bomb (a: &a [x, x], b: &b [*a, *a], ... nine levels) is a few lines that expand to billions of
# nodes, and a list nested 500 deep ends in a RecursionError. Real sweeps are far below both.
MAX_YAML_NODES = 100_000  # values after alias expansion
MAX_YAML_DEPTH = 64  # nested lists/mappings


def _check_size(text: str, source: str) -> None:
    """Count the nodes the document expands to and its nesting depth from the parser's events
    (an iterative parser: neither recursion nor expansion happens here), refusing in one line."""
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    open_: list[tuple[str | None, int]] = []  # (anchor, total when the collection started)
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            total += 1
            open_.append((event.anchor, total))
            if len(open_) > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1
                raise SpecError(f"{source}: nesting deeper than {MAX_YAML_DEPTH} levels at line {line}; "
                                "a sweep file is a few levels deep: flatten it")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, start = open_.pop()
            if anchor:
                sizes[anchor] = total - start + 1
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            n = 1 if isinstance(event, yaml.ScalarEvent) else sizes.get(event.anchor, 1)
            if isinstance(event, yaml.ScalarEvent) and event.anchor:
                sizes[event.anchor] = 1
            total += n
        if total > MAX_YAML_NODES:
            raise SpecError(f"{source}: expands to more than {MAX_YAML_NODES:,} values (YAML aliases, line "
                            f"{event.start_mark.line + 1}); write the values out or use fewer aliases")


def _set_one(doc: dict, item: str) -> None:
    """Apply one `key=value` to `doc` in place: a dotted path of mapping keys and list indices
    (missing mapping keys are created; validation then names any unknown one), the value a YAML scalar
    or flow collection (`2`, `true`, `[1, 2]`, `adamw`)."""
    path, eq, text = item.partition("=")
    fix = "give key=value with a dotted path, e.g. replicas=2 or workloads.0.epochs=1"
    if not eq or not path or any(not k for k in path.split(".")):
        raise SpecError(f"--set {item}: not key=value; {fix}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise SpecError(f"--set {item}: the value is not YAML; quote it or fix its syntax") from None
    *parents, last = path.split(".")
    node, walked = doc, []
    for key in [*parents, last]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise SpecError(f"--set {item}: {'.'.join(walked) or '(top level)'} is a list of {len(node)}; "
                                f"give an index 0..{len(node) - 1} instead of {key!r}")
            key = int(key)
        elif not isinstance(node, dict):
            raise SpecError(f"--set {item}: {'.'.join(walked)} is {type(node).__name__} {node!r}, not a mapping "
                            "or list; shorten the path")
        if walked == parents:
            node[key] = value
            return
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            node = node[key]
        walked.append(str(key))


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """The sweep document with each `--set key=value` applied in order, before validation, so an
    override is checked exactly like the file (a copy: the caller's document is left as it was)."""
    doc = copy.deepcopy(doc)
    for item in overrides:
        _set_one(doc, item)
    return doc


def load(path: str | Path | None, overrides: list[str] = ()) -> SweepSpec:
    """Load a sweep YAML, with `--set` overrides applied before it is checked; None loads the
    embedded default sweep shipped inside the package."""
    if path is None:
        text, source = resources.files("orchestrator").joinpath("default_sweep.yaml").read_text(), "default_sweep.yaml"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError(f"{source}: cannot read the sweep file ({e.strerror}); check the path") from None
        except UnicodeDecodeError as e:
            raise SpecError(f"{source}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            "give a YAML sweep file") from None
    try:
        _check_size(text, source)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}: malformed YAML{where}; fix the syntax") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: (top level): expected a mapping of sweep fields, got {type(doc).__name__}")
    if overrides:
        doc, source = apply_overrides(doc, list(overrides)), f"{source} with --set"
    return parse(doc, source)
