"""What hardware and software a run really used, read inside the worker that ran it.

`fingerprint_id` hashes the parts that change kernels and bits (GPU, driver, CUDA, cuDNN, torch,
torchvision, CPU model), so results group by stack. Environment variables are copied from a fixed
allow-list only: secrets such as AWS keys or Ray tokens must never reach a results file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys

ENV_ALLOW = ("CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "NVIDIA_TF32_OVERRIDE", "TORCH_CUDNN_V8_API_DISABLED", "PYTORCH_CUDA_ALLOC_CONF",
             "CUDA_LAUNCH_BLOCKING", "NCCL_ALGO", "OPENBLAS_CORETYPE")
STACK_KEYS = ("gpu_name", "gpu_driver", "cuda_version", "cudnn_version", "torch_version",
              "torchvision_version", "cpu_model")


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


def _gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"accelerator": "cpu", "gpu_name": None, "gpu_count": 0}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {"accelerator": props.name, "gpu_name": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_capability": f"{props.major}.{props.minor}",
            "cudnn_version": str(torch.backends.cudnn.version())}
    uuid = str(getattr(props, "uuid", ""))
    if uuid:
        info.update(_nvml(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"))
    return info


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


def collect() -> dict:
    """The fingerprint columns of a run row, read now, in this process."""
    import torch
    import torchvision

    fp = {"hostname": socket.gethostname(), "python_version": platform.python_version(),
          "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
          "cuda_version": torch.version.cuda, "cpu_model": cpu_model(),
          "num_threads": torch.get_num_threads(),
          "env": json.dumps({k: os.environ[k] for k in ENV_ALLOW if k in os.environ}, sort_keys=True)}
    fp.update(_gpu())
    fp.update(_ray())
    fp["fingerprint_id"] = fingerprint_id(fp)
    return fp


def fingerprint_id(fp: dict) -> str:
    key = json.dumps({k: fp.get(k) for k in STACK_KEYS}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


if __name__ == "__main__":
    json.dump(collect(), sys.stdout, indent=2)
