"""What hardware and software a run really used, read inside the worker that ran it.

`fingerprint_id` hashes the parts that change kernels and bits (GPU, driver, CUDA, cuDNN and cuBLAS
as loaded, torch, torchvision, Triton for compiled runs, NVIDIA_TF32_OVERRIDE, CPU model), so
results group by stack. It describes the device the run used, not the node: a CPU run on a GPU node
is a CPU run, and never touches CUDA (which would also stop a later trial in the same worker from
setting CUBLAS_WORKSPACE_CONFIG). A part that should be known but could not be read (NVML failing
leaves the driver unknown) is listed in `fingerprint_missing` and makes `fingerprint_complete` false,
rather than hashing alike with every other unknown. Environment variables are copied from a fixed
allow-list only: secrets such as AWS keys or Ray tokens must never reach a results file. Ray is
imported lazily: this module runs where Ray is absent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import socket
import sys

from .axes import CODE_ENV

ENV_ALLOW = ("CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "NVIDIA_TF32_OVERRIDE", "TORCH_CUDNN_V8_API_DISABLED", "PYTORCH_CUDA_ALLOC_CONF",
             "CUDA_LAUNCH_BLOCKING", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", *CODE_ENV)
# Collective settings (NCCL_ALGO, NCCL_PROTO, TORCH_NCCL_BLOCKING_WAIT, ...) are recorded whole.
ENV_ALLOW_PREFIXES = ("NCCL_", "TORCH_NCCL_")
STACK_KEYS = ("gpu_name", "gpu_driver", "cuda_version", "cudnn_version", "torch_version",
              "torchvision_version", "cpu_model")
# Hashed only when set, so that CPU rows keep the ids they had before these keys existed.
STACK_KEYS_IF_SET = ("cublas_version", "triton_version", "tf32_override", "hip_version", "miopen_version")
# Always in `packages`: what decides kernels and bits besides torch itself.
PACKAGES = ("torch", "torchvision", "numpy", "triton", "pytorch-triton")
REQUIRED = ("torch_version", "torchvision_version", "cpu_model")  # every run
REQUIRED_CUDA = ("gpu_name", "gpu_driver", "cuda_version", "cudnn_version", "cublas_version")  # GPU runs


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml(device_uuid: str) -> dict:
    """Driver, memory and clocks by NVML. NVML indexes ignore CUDA_VISIBLE_DEVICES, so the device
    is matched by UUID, never by index."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByUUID(device_uuid)
            return {"gpu_driver": pynvml.nvmlSystemGetDriverVersion(),
                    "gpu_memory_mb": pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20,
                    "gpu_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)}
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no NVML, or an old driver: the fingerprint says unknown
        return {}


def loaded_library(name: str) -> str | None:
    """Path of the shared library `name` (e.g. "libcublas.so") mapped into this process, from
    /proc/self/maps: the one really loaded, whatever torch was built against. None if absent."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split(maxsplit=5)[5].strip() for line in f
                            if line.count(" ") >= 5 and f"/{name}" in line})
    except OSError:  # not Linux
        return None
    return paths[0] if paths else None


def cublas_version(path: str) -> str | None:
    """Version of the cuBLAS library at `path` by its own cublasGetProperty (major.minor.patch;
    needs no GPU); None if it cannot be read."""
    import ctypes

    try:
        get = ctypes.CDLL(path).cublasGetProperty
    except (OSError, AttributeError):
        return None
    parts = []
    for prop in range(3):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
        v = ctypes.c_int()
        if get(prop, ctypes.byref(v)) != 0:
            return None
        parts.append(str(v.value))
    return ".".join(parts)


def _loaded_cublas_version() -> str | None:
    import torch

    torch.cuda.current_blas_handle()  # loads cuBLAS if no matmul has yet
    path = loaded_library("libcublas.so")
    return cublas_version(path) if path else None


def _tf32() -> str:
    """TF32 as torch will use it (the run's precision sets the per-backend switches)."""
    import torch

    if hasattr(torch.backends, "fp32_precision"):
        s = {"cuda_matmul": torch.backends.cuda.matmul.fp32_precision,
             "cudnn_conv": torch.backends.cudnn.conv.fp32_precision}
    else:  # pragma: no cover - torch < 2.9
        s = {"cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    return json.dumps(s | {"float32_matmul_precision": torch.get_float32_matmul_precision()}, sort_keys=True)


def _gpu(device) -> dict:
    """The CUDA device the run used; a CPU run gets CPU values without a single torch.cuda call."""
    import torch

    if device.type != "cuda":
        return {"accelerator": "cpu", "gpu_name": None, "gpu_count": 0}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info = {"accelerator": props.name, "gpu_name": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_capability": f"{props.major}.{props.minor}",
            "cudnn_version": str(torch.backends.cudnn.version()), "cublas_version": _loaded_cublas_version(),
            "tf32_settings": _tf32()}
    uuid = str(getattr(props, "uuid", ""))
    if uuid:
        info.update(_nvml(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"))
    return info


def _triton_version() -> str | None:
    """Triton's version from package metadata: importing triton would cost seconds."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("triton", "pytorch-triton"):
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return None


@functools.lru_cache(maxsize=8)
def packages(named: tuple[str, ...] = ()) -> dict[str, str]:
    """name -> version of the packages this process imports: torch and torchvision as imported
    (their `__version__`), the others from the metadata of what this interpreter sees (a stack's
    virtualenv shadows the launch environment's), every `nvidia-*` wheel (cuDNN, cuBLAS, NCCL, ...),
    and the packages a stack names. A named package that is not installed reads "not installed".
    Read once per process (scanning every installed distribution takes ~0.1 s; a process's
    packages are fixed when it starts)."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    import torch

    found = {d.metadata["Name"]: d.version for d in distributions()
             if (d.metadata["Name"] or "").lower().startswith("nvidia-")}
    for name in (*PACKAGES, *named):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            if name in named:
                found[name] = "not installed"
    imported = {"torch": torch.__version__, "torchvision": torchvision_version() or "does not import"}
    return dict(sorted((found | imported).items()))


@functools.lru_cache(maxsize=1)
def torchvision_version() -> str | None:
    """torchvision's version as imported; None when it does not import, as when a stack pins a
    torch without the torchvision built for it (its operators fail to register): the runs that do
    not need it still run, and their fingerprint says torchvision is missing."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - RuntimeError from operator registration, ImportError, OSError...
        return None
    return torchvision.__version__


def _ray() -> dict:
    try:
        import ray

        if not ray.is_initialized():
            return {"ray_version": ray.__version__}
        ctx = ray.get_runtime_context()
        labels = ctx.get_node_labels() if hasattr(ctx, "get_node_labels") else {}
        return {"ray_version": ray.__version__, "ray_node_id": ctx.get_node_id(),
                "ray_node_ip": ray.util.get_node_ip_address(),
                # set by the autoscaler when it launches the node (v2 installer / node group label)
                "instance_type": os.environ.get("RAY_CLOUD_INSTANCE_TYPE_NAME")
                or os.environ.get("RAY_NODE_TYPE_NAME") or labels.get("ray.io/node-group")}
    except ImportError:
        return {}


def collect(device=None, compiled: bool = False, named: tuple[str, ...] | list[str] = ()) -> dict:
    """The fingerprint columns of a run row, read now, in this process, for the torch.device the
    run used (None: this node's, the GPU when torch sees one). `compiled` runs add Triton's version;
    `named`: the packages the run's stack installs, recorded (and hashed) beside the usual ones."""
    import torch

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES)}
    fp = {"hostname": socket.gethostname(), "python_version": platform.python_version(),
          "torch_version": torch.__version__, "torchvision_version": torchvision_version(),
          "cuda_version": torch.version.cuda, "cpu_model": cpu_model(),
          "num_threads": torch.get_num_threads(), "tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE"),
          "triton_version": _triton_version() if compiled else None, "env": json.dumps(env, sort_keys=True),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
          "packages": json.dumps(packages(tuple(named))), "hip_version": torch.version.hip,
          # a ROCm build reports MIOpen's version where CUDA builds report cuDNN's
          "miopen_version": str(torch.backends.cudnn.version()) if torch.version.hip else None}
    fp.update(_gpu(device))
    fp.update(_ray())
    missing = missing_parts(fp, device.type, compiled)
    fp["fingerprint_complete"], fp["fingerprint_missing"] = not missing, ",".join(missing)
    fp["fingerprint_id"] = fingerprint_id(fp, named)
    return fp


def missing_parts(fp: dict, device_type: str, compiled: bool) -> list[str]:
    """The stack parts a run on `device_type` should have recorded but did not."""
    needed = list(REQUIRED)
    if device_type == "cuda":  # on a CPU, inductor generates C++, not Triton
        needed += [*REQUIRED_CUDA, *(["triton_version"] if compiled else [])]
    return [k for k in needed if not fp.get(k)]


def fingerprint_id(fp: dict, named: tuple[str, ...] | list[str] = ()) -> str:
    """Hash of the parts that change kernels and bits. Parts that came later join only when set:
    the packages a stack names, and the dispatched CPU ISA when ATEN_CPU_CAPABILITY overrides the
    CPU's own choice (otherwise the CPU model decides it)."""
    stack = {k: fp.get(k) for k in STACK_KEYS} | {k: fp[k] for k in STACK_KEYS_IF_SET if fp.get(k) is not None}
    if named:
        versions = json.loads(fp["packages"])
        stack["packages"] = {n: versions.get(n) for n in sorted(named)}
    if "ATEN_CPU_CAPABILITY" in json.loads(fp.get("env") or "{}"):
        stack["cpu_capability"] = fp.get("cpu_capability")
    return hashlib.sha256(json.dumps(stack, sort_keys=True).encode()).hexdigest()[:12]


if __name__ == "__main__":
    json.dump(collect(), sys.stdout, indent=2)
