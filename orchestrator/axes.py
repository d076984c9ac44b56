"""Tooling axes, each declared once: what it is called, its values' type, its default and its column.

A tooling axis is a setting that is not random but can change bits (the thread count, precision,
the software stack, ...). Every value is its own group in the tables, and `cross_stack` pairs runs
with the same seeds across values. Each axis is one `Axis` in `AXES`; everything else is derived:
`spec.Tooling` (a list of values per axis), the per-run value of every axis in `RunSpec` and
`ProbeSpec`, run ids (a value equal to its axis's default is left out, so ids written before the
axis existed stay valid), the run-row columns (`store.RUN_SCHEMA`) and the grouping keys of the
tables (`reduce`). This module imports neither torch nor Ray: the reducer and the store read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pyarrow as pa
from packaging.requirements import InvalidRequirement, Requirement
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=64)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Precision = Literal["fp32", "tf32", "bf16"]
Attention = Literal["auto", "math", "flash", "efficient", "cudnn"]
LAUNCH = "launch"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Environment variables that make a process load code it was not asked to (a library into every
# process, modules ahead of the installed ones, a script at start): legitimate, but a sweep file
# setting them runs that code in every worker, so they are said at start and recorded in each row.
CODE_ENV = ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "DYLD_LIBRARY_PATH",
            "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONEXECUTABLE")


class Stack(Strict):
    """A software environment runs execute in, made by Ray's `runtime_env` when the run's worker
    process starts, so it is in force before torch is imported and CUDA starts (ATEN_CPU_CAPABILITY,
    CUBLAS_WORKSPACE_CONFIG, NCCL_ALGO and NVIDIA_TF32_OVERRIDE are read once per process).
    `launch` is the environment the sweep started in. `pip`/`uv` layer packages on the launch
    environment (a virtualenv uv builds once per node, `orchestrator.stacks`); `py_executable` runs another
    interpreter; `image_uri` a container image (the cluster needs container support)."""

    name: Name
    env_vars: dict[str, str] = {}  # set in the worker before anything is imported; values are strings
    pip: list[str] | None = None  # PEP 508 requirements, e.g. ["torch==2.13.0", "torchvision==0.28.0"]
    uv: list[str] | None = None  # the same (both are installed by uv, layered on the launch environment)
    py_executable: str | None = None  # an interpreter with its own packages (Ray must match the cluster's)
    image_uri: str | None = None  # container image of the worker

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name (letters, digits, _)")
        return v

    @field_validator("pip", "uv")
    @classmethod
    def _requirements(cls, v: list[str] | None) -> list[str] | None:
        for line in v or []:
            try:
                Requirement(line)
            except InvalidRequirement as e:
                raise ValueError(f"{line!r} is not a requirement ({str(e).splitlines()[0]}); "
                                 "write name==version, e.g. torch==2.13.0") from None
        return v

    @model_validator(mode="after")
    def _one_installer(self) -> Stack:
        given = [k for k in ("pip", "uv", "py_executable", "image_uri") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)}: a stack takes one of pip, uv, py_executable, image_uri "
                             "(Ray cannot combine them); split it into two stacks")
        if self.name == LAUNCH and (given or self.env_vars):
            raise ValueError(f"name: {LAUNCH!r} is the environment the sweep started in and takes no other "
                             "fields; give this stack another name")
        return self

    def runtime_env(self) -> dict:
        """The Ray runtime_env of this stack ({} for the launch environment: workers inherit the job's)."""
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v not in (None, {})}

    def packages(self) -> list[str]:
        """Names of the packages the stack installs (their versions are recorded in every row)."""
        return [Requirement(r).name for r in self.pip or self.uv or []]


@dataclass(frozen=True)
class Axis:
    """One tooling axis. `listed_in` is the sweep field that lists its values when that is not
    `tooling.<name>` (stacks are declared at the top level, each a definition, not a word)."""

    name: str  # field of `Tooling` (a list of values) and of RunSpec / ProbeSpec (the run's value)
    type: Any  # the type of one value
    default: Any  # a run at the default hashes as it did before the axis existed
    column: str  # the run-row column
    arrow: pa.DataType  # the column's Parquet type
    doc: str  # what the axis changes, on the spec field
    listed_in: str | None = None

    def cell(self, value: Any) -> Any:
        """The row value of `value` (parsed, or as in a spec's JSON): a stack is recorded by name
        (its definition is the row's `stack_spec`)."""
        if isinstance(value, Stack):
            return value.name
        return value.get("name") if isinstance(value, dict) else value

    def key(self, value: Any) -> Any:
        """`value` as it enters a run id."""
        return value.model_dump(mode="json", exclude_defaults=True) if isinstance(value, BaseModel) else value


AXES = (
    Axis("num_threads", PositiveInt, 1, "num_threads", pa.int32(),
         "torch intra-op threads; the run asks Ray for at least as many CPUs"),
    Axis("precision", Precision, "fp32", "precision", pa.string(),
         "fp32: IEEE fp32, TF32 off; tf32: TF32 matmul+conv (Ampere+ GPUs; no-op on a CPU); bf16: bfloat16 autocast"),
    Axis("channels_last", bool, False, "channels_last", pa.bool_(), "NHWC memory format for model and inputs"),
    Axis("compile", bool, False, "compiled", pa.bool_(),
         "torch.compile the model; compile time lands in epoch 1 (CPU needs a C++ compiler)"),
    Axis("cudnn_benchmark", bool, False, "cudnn_benchmark", pa.bool_(),
         "cuDNN autotuning: picks conv algorithms by timing them (GPU only); default off, as in PyTorch"),
    Axis("world_size", PositiveInt, 1, "world_size", pa.int32(),
         "data-parallel processes per replica (a warm group, its process group gloo on CPUs, NCCL on GPUs), "
         "each with the sweep's "
         "per-replica resources; the global batch stays the workload's batch_size, split evenly over ranks"),
    Axis("attention", Attention, "auto", "attention", pa.string(),
         "the kernel of scaled_dot_product_attention (torch.nn.attention.sdpa_kernel), around the built-in loop "
         "and a user's function alike; auto: torch's own choice. A kernel the device does not offer fails the run"),
    Axis("eval_batch_size", PositiveInt | None, None, "eval_batch_size", pa.int32(),
         "examples per evaluation batch; null: the training batch size. The same weights give other predictions "
         "wherever a kernel is not batch-invariant"),
    Axis("stack", Stack, Stack(name=LAUNCH), "stack", pa.string(),
         "the software environment (see Stack); default: the environment the sweep started in",
         listed_in="stacks"),
)
BY_NAME = {a.name: a for a in AXES}
COLUMNS = {a.column: a for a in AXES}
