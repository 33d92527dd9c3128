"""Builds the optional CUDA extension `ep_runtime._C` with plain nvcc.

csrc/ includes no torch headers: it needs only nvcc, pybind11, the Python headers and the CUTLASS/CuTe
headers of the `nvidia-cutlass` wheel, so it compiles on CPU-only machines (CI) and does not depend on the
torch version. Where nvcc is missing the package installs without the extension and the reference path runs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# sm_90a carries the wgmma/setmaxnreg kernels; sm_100a must keep compiling for the Blackwell path.
DEFAULT_ARCHS = "90a"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _include_dirs() -> list[str]:
    import importlib.util

    import pybind11

    # The nvidia-cutlass wheel ships the headers inside its cutlass_library package; locate it without
    # importing it (its import pulls in the CUTLASS Python generator and its dependencies).
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nvidia-cutlass package (CUTLASS/CuTe headers) is not installed: pip install nvidia-cutlass")
    cutlass_inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    if not (cutlass_inc / "cute").is_dir():
        raise RuntimeError(f"nvidia-cutlass headers not found under {cutlass_inc}")
    return [str(ROOT / "csrc"), pybind11.get_include(), sysconfig.get_paths()["include"], str(cutlass_inc)]


def nvcc_flags(archs: str) -> list[str]:
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
             "-DNDEBUG", "-lineinfo", "-Xptxas", "-warn-spills"]
    for arch in archs.replace(";", ",").split(","):
        arch = arch.strip()
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


class NvccBuildExt(build_ext):
    """Compiles every csrc/*.cu and csrc/*.cpp with nvcc and links them into one module."""

    def build_extension(self, ext: Extension) -> None:
        nvcc = _nvcc()
        out = Path(self.get_ext_fullpath(ext.name))
        if nvcc is None or os.environ.get("EP_RUNTIME_SKIP_CUDA") == "1":
            print("ep_runtime: nvcc not found (or EP_RUNTIME_SKIP_CUDA=1): building without the CUDA "
                  "extension; the reference path still works", file=sys.stderr)
            return
        archs = os.environ.get("EP_RUNTIME_CUDA_ARCHS", DEFAULT_ARCHS)
        incs = [f"-I{d}" for d in _include_dirs()]
        objdir = Path(self.build_temp) / "csrc"
        objdir.mkdir(parents=True, exist_ok=True)
        sources = sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "csrc").glob("*.cpp"))

        def compile_one(src: Path) -> Path:
            obj = objdir / (src.name + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *nvcc_flags(archs), *incs]
            if src.suffix == ".cpp":
                cmd += ["-x", "cu"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return obj

        # EP_RUNTIME_BUILD_PROBES=1 (CI, sm_90a): the GPU probes in bench/ build on csrc/ headers, so they are
        # compiled too, with the same flags, to keep them compiling; they are programs of their own, not linked.
        probes = sorted((ROOT / "bench").glob("*.cu")) if os.environ.get("EP_RUNTIME_BUILD_PROBES") == "1" else []
        jobs = int(os.environ.get("EP_RUNTIME_BUILD_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objs = list(pool.map(compile_one, sources))
            list(pool.map(compile_one, probes))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [nvcc, "-shared", "-o", str(out), *map(str, objs), *nvcc_flags(archs)]
        print(" ".join(link), flush=True)
        subprocess.run(link, check=True)


setup(ext_modules=[Extension("ep_runtime._C", sources=[])], cmdclass={"build_ext": NvccBuildExt})
