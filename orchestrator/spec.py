"""The sweep spec: pydantic models that are the single source of truth for configuration.

`SweepSpec` is what a user writes (YAML); `expand()` turns it into one `RunSpec` per replica run.
A run's id hashes what makes it that run, so the same spec gives the same ids on any machine and
a re-run of a sweep can tell which runs are already done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from orchestrator.noise import PRESETS, Seeds, seeds_for
from workloads.data import DATASETS
from workloads.models import MODELS

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=64)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Workload(Strict):
    arch: str
    dataset: str
    dataset_root: str | None = None  # folder holding the dataset's files; unused by digits/synthetic
    dataset_args: dict[str, int | float | str | bool | list[str]] = {}  # loader options
    arch_args: dict[str, int | float | str | bool] = {}  # builder options, e.g. {batch_norm: true}
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 128
    lr: Annotated[float, Field(gt=0)] = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    augmentation: Literal["none", "crop", "flip", "crop+flip"] = "none"  # on-device, augment generator
    replicas: PositiveInt | None = None  # overrides the sweep's replicas for this workload

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown arch {v!r}; choose one of {', '.join(sorted(MODELS))}")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of {', '.join(sorted(DATASETS))}")
        return v


class NoiseSet(Strict):
    """An explicit set of varying sources, for combinations no preset names."""

    name: Name
    vary: list[Literal["init", "order", "augment", "impl"]]


class Tooling(Strict):
    """Settings that are not random but change bits; every combination is its own group."""

    num_threads: list[PositiveInt] = [1]  # torch intra-op threads; the run asks Ray for at least as many CPUs


class Resources(Strict):
    cpus: Annotated[float, Field(gt=0)] = 1
    gpus: Annotated[float, Field(ge=0)] = 0  # fractional packs small replicas on one GPU


class SweepSpec(Strict):
    name: Name
    base_seed: int = 0
    out: str | None = None  # local path, s3://bucket/prefix or gs://bucket/prefix; default results/<name>
    replicas: PositiveInt = 5
    noise: list[str | NoiseSet] = ["control", "algo", "impl", "algo+impl"]  # presets or {name, vary}
    accelerators: list[Name] = ["any"]  # V100, T4, A100, L4, H100, ... or any
    tooling: Tooling = Tooling()
    resources: Resources = Resources()
    max_retries: Annotated[int, Field(ge=0)] = 1  # retries after a worker process dies
    workloads: Annotated[list[Workload], Field(min_length=1)]

    @field_validator("noise")
    @classmethod
    def _known_presets(cls, v: list[str | NoiseSet]) -> list[str | NoiseSet]:
        for n in v:
            if isinstance(n, str) and n not in PRESETS:
                raise ValueError(f"unknown preset {n!r}; choose from {', '.join(PRESETS)} or give {{name, vary}}")
        return v

    @model_validator(mode="after")
    def _pinned_runs_need_gpus(self) -> SweepSpec:
        if any(a != "any" for a in self.accelerators) and self.resources.gpus == 0:
            raise ValueError("resources.gpus: runs pinned to an accelerator need gpus > 0 (e.g. 1 or 0.5)")
        return self

    @property
    def out_uri(self) -> str:
        return self.out or f"results/{self.name}"


class RunSpec(Strict):
    """One replica run: everything a worker needs, nothing it has to look up."""

    run_id: str
    sweep: str
    workload: Workload
    noise: str
    vary: frozenset[Literal["init", "order", "augment", "impl"]]
    replica: int
    seeds: Seeds
    accelerator: str
    num_threads: int
    cpus: float
    gpus: float
    max_retries: int


def _noise_sets(spec: SweepSpec) -> list[tuple[str, frozenset[str]]]:
    return [(n, PRESETS[n]) if isinstance(n, str) else (n.name, frozenset(n.vary)) for n in spec.noise]


def run_id(spec: SweepSpec, workload: Workload, noise: str, num_threads: int, accelerator: str, replica: int) -> str:
    """Readable prefix + hash of what defines the run. Defaults are left out of the hash so that a
    field added later with a default keeps old ids valid."""
    key = json.dumps({"sweep": spec.name, "base_seed": spec.base_seed,
                      "workload": workload.model_dump(mode="json", exclude_defaults=True),
                      "noise": noise, "num_threads": num_threads, "accelerator": accelerator,
                      "replica": replica}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"{workload.arch}-{workload.dataset}-{noise}-r{replica}-{digest}"


def expand(spec: SweepSpec) -> list[RunSpec]:
    """Every (workload, noise, tooling, accelerator, replica) as a RunSpec, in a stable order."""
    runs = []
    for w, (noise, vary), threads, acc in itertools.product(
            spec.workloads, _noise_sets(spec), spec.tooling.num_threads, spec.accelerators):
        for r in range(w.replicas or spec.replicas):
            runs.append(RunSpec(
                run_id=run_id(spec, w, noise, threads, acc, r), sweep=spec.name, workload=w,
                noise=noise, vary=vary, replica=r, seeds=seeds_for(spec.base_seed, vary, r),
                accelerator=acc, num_threads=threads, cpus=max(spec.resources.cpus, threads),
                gpus=spec.resources.gpus, max_retries=spec.max_retries))
    return runs


class SpecError(ValueError):
    """Bad input: the message names the field and the fix, one line per problem."""


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or fix its spelling"
        lines.append(f"{source}: {field}: {msg}")
    return "\n".join(lines)


def parse(doc: object, source: str = "spec") -> SweepSpec:
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(_format(e, source)) from None


def load(path: str | Path | None) -> SweepSpec:
    """Load a sweep YAML; None loads the embedded default sweep shipped inside the package."""
    if path is None:
        text, source = resources.files("orchestrator").joinpath("default_sweep.yaml").read_text(), "default_sweep.yaml"
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SpecError(f"{source}: cannot read the sweep file ({e.strerror}); check the path") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}: malformed YAML{where}; fix the syntax") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: (top level): expected a mapping of sweep fields, got {type(doc).__name__}")
    return parse(doc, source)
