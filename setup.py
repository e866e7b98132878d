"""Build fastadv and its compiled extension ``fastadv._C``.

Environment:
  FASTADV_NO_EXT=1        skip the compiled extension (pure Python + Triton)
  FASTADV_CUDA=0          never build CUDA sources, even with a toolkit present
  FASTADV_CUDA_ARCHS=...  e.g. "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST)
  FASTADV_REQUIRE_EXT=1   fail the build instead of degrading (CI sets this)
  DEBUG=1                 -O0 -g
  MAX_JOBS                parallel compile jobs (default: from free memory)

The extension is built against the installed torch, so install with
``pip install --no-build-isolation -e .`` once torch is present.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["fastadv", "fastadv.*"]) + ["fastadv.kernels"]
PACKAGE_DIR = {"fastadv.kernels": "kernels"}


def _free_memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def _extensions():
    if os.environ.get("FASTADV_NO_EXT", "0") == "1":
        print("fastadv: FASTADV_NO_EXT=1, skipping the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing: pure-Python install
        print(f"fastadv: torch not importable at build time ({exc}); skipping the extension")
        return [], {}

    # Each compile of a torch-including file peaks near 1.5 GiB (measured here);
    # cap the jobs so a 2-core / small-memory machine does not swap.
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(_free_memory_gib() // 2))))
    if os.environ.get("FASTADV_CUDA_ARCHS"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTADV_CUDA_ARCHS"]

    debug = os.environ.get("DEBUG", "0") == "1"
    # torch 2.13's headers need C++20. -ffp-contract=off keeps the fp32 PGD
    # steps bit-identical to eager PyTorch (no FMA contraction).
    cxx = ["-std=c++20", "-fopenmp", "-ffp-contract=off"] + (["-O0", "-g"] if debug else ["-O3"])
    sources = [os.path.join("csrc", "fastadv.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # A CPU build of torch has torch.version.cuda None even where nvcc exists
    # (cpp_extension still sets CUDA_HOME), and its library has no CUDA runtime
    # to link against: decide on both.
    want_cuda = (
        os.environ.get("FASTADV_CUDA", "1") != "0"
        and CUDA_HOME is not None
        and torch.version.cuda is not None
        and bool(cuda_sources)
    )
    if want_cuda:
        nvcc = ["-std=c++20", "-O3" if not debug else "-O0", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "fastadv._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DFASTADV_WITH_CUDA"], "nvcc": nvcc + ["-DFASTADV_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
        print(f"fastadv: building C++ + CUDA extension ({len(cuda_sources)} .cu files)")
    else:
        ext = CppExtension(
            "fastadv._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
        print("fastadv: building C++ (CPU) extension")
    return [ext], {"build_ext": _degrading_build_ext(BuildExtension)}


def _degrading_build_ext(base):
    """BuildExtension that warns instead of failing, unless FASTADV_REQUIRE_EXT=1."""

    class DegradingBuildExt(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if os.environ.get("FASTADV_REQUIRE_EXT", "0") == "1":
                    raise
                sys.stderr.write(
                    f"\nfastadv: WARNING: building {ext.name} failed ({exc}).\n"
                    "fastadv will run on its Triton and reference backends only.\n"
                    "Set FASTADV_REQUIRE_EXT=1 to make this an error.\n\n"
                )

    return DegradingBuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"fastadv": ["data/embedded/*", "gpu_verified.json"]},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
