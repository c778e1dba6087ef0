"""Build of mergekernels._C: C++17 CPU kernels (OpenMP) always, CUDA kernels when possible.

Environment variables:
  MK_CUDA=auto|1|0   auto (default): build the CUDA sources when a CUDA toolkit (nvcc) and a CUDA
                     build of torch are present, whether or not a GPU is visible;
                     1: force the CUDA build and fail if it is impossible (CI uses this);
                     0: CPU only.
  MK_CUDA_ARCHS      architectures, default "8.0;9.0+PTX" (sm_80, sm_90 and PTX for newer GPUs);
                     TORCH_CUDA_ARCH_LIST, if set, wins.
  MK_NATIVE=1|0      compile the CPU kernels for the build machine's vector ISA (default 1).
  MAX_JOBS           parallel compile jobs (torch's ninja build).
"""

import glob
import os
import sys

from setuptools import setup

# torch derives CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin would make that
# /usr/local. Prefer the toolkit's own root when the caller did not choose one.
if (
    not os.environ.get("CUDA_HOME")
    and not os.environ.get("CUDA_PATH")
    and os.path.isdir("/usr/local/cuda/include")
):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_mode() -> bool:
    import torch

    mode = os.environ.get("MK_CUDA", "auto").lower()
    possible = CUDA_HOME is not None and torch.version.cuda is not None
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes", "force"):
        if not possible:
            sys.exit(
                f"MK_CUDA=1 but a CUDA build is impossible: CUDA_HOME={CUDA_HOME!r}, "
                f"torch {torch.__version__} (CUDA {torch.version.cuda}). Install a CUDA toolkit and a "
                "CUDA build of torch, or set MK_CUDA=0."
            )
        return True
    return possible


def _nvidia_wheel_includes() -> list[str]:
    """CUDA library headers shipped in pip's nvidia-* wheels (cusparse.h, cublas_v2.h, ...)."""
    found = []
    for path in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            candidate = os.path.join(path, sub)
            if os.path.isdir(candidate) and candidate not in found:
                found.append(candidate)
    return found


def _write_build_info(with_cuda: bool) -> None:
    """mergekernels/_build_info.py: the torch (and CUDA) this build compiles against, which the
    package compares with the installed torch at import (the extension only loads with that one)."""
    import torch

    info = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda,
        "CUDA_KERNELS": with_cuda,
    }
    lines = ['"""Written by setup.py at build time: what mergekernels._C was compiled against."""', ""]
    lines += [f"{key} = {value!r}" for key, value in info.items()]
    path = os.path.join(ROOT, "mergekernels", "_build_info.py")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _extension():
    with_cuda = _cuda_mode()
    _write_build_info(with_cuda)
    cpu_sources = [
        "csrc/ops.cpp",
        "csrc/covariance.cpp",
        "csrc/input_faults.cpp",
        *sorted(glob.glob("csrc/cpu/*.cpp")),
    ]
    # The C++ standard is left to torch (C++20 since torch 2.10); the sources are C++17-clean.
    # no-loop-unroll-and-jam: gcc would otherwise jam the task loop into the element loop and lose
    # the vectorisation of the merge kernels.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-loop-unroll-and-jam"]
    if os.environ.get("MK_NATIVE", "1") == "1":
        cxx.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return CppExtension(
            "mergekernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("MK_CUDA_ARCHS", "8.0;9.0+PTX")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    # --fmad=false: no FMA contraction, so float results match the CPU kernels bit for bit.
    nvcc = ["-O3", "--fmad=false", "-lineinfo"]
    return CUDAExtension(
        "mergekernels._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        # After the toolkit's own headers, so the wheels' copies of cuda_runtime.h never shadow them.
        extra_compile_args={"cxx": cxx + [f"-idirafter{d}" for d in _nvidia_wheel_includes()], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
