"""Build of beitfast and of its native extension beitfast._C (sources: csrc/, see DEVELOPERS.md).

    pip install --no-build-isolation .        # or -e . ; the build uses the torch already installed

Environment switches:
    BEITFAST_BUILD_EXT=0    no extension at all (pure-Python install; PyTorch fallbacks are used)
    BEITFAST_BUILD_CUDA=0   CPU-only extension even when torch has CUDA and nvcc is found
    BEITFAST_CUDA_ARCHS     CUDA architectures, default "80;90a" (separated by ";", "," or spaces;
                            "90a+PTX" also embeds PTX). Never probed from a GPU: builds run without one.
    CUDA_HOME               the CUDA toolkit (else /usr/local/cuda, else the one holding `nvcc`)
    MAX_JOBS                parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "80;90a"
# Sources are globbed relative to the project root, where pip runs this file.
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _packages() -> tuple[list[str], dict[str, str]]:
    # `kernels/` is installed as beitfast.kernels; the mapping also keeps the repository root off
    # sys.path in editable installs (a top-level `kernels` module would shadow other packages).
    kernel_packages = ["beitfast.kernels"] + [f"beitfast.kernels.{p}" for p in find_packages("kernels")]
    packages = find_packages(include=["beitfast", "beitfast.*"]) + kernel_packages
    return packages, {"beitfast": "beitfast", "beitfast.kernels": "kernels"}


def _cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    # Resolve links and wrapper locations such as /usr/local/bin/nvcc -> /usr/local/cuda-X/bin/nvcc.
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _gencode_flags(archs: str) -> tuple[list[str], str]:
    """nvcc -gencode flags and the matching TORCH_CUDA_ARCH_LIST for e.g. "80;90a" or "8.0,9.0a+PTX"."""
    flags, torch_list = [], []
    for entry in archs.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        arch, _, ptx = entry.partition("+")
        number = arch.replace(".", "")
        if not (number[:2].isdigit() and number[2:] in ("", "a", "f")):
            raise ValueError(
                f"BEITFAST_CUDA_ARCHS: cannot read architecture {entry!r} (expected e.g. 80, 90a)")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx.upper() == "PTX":
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
        torch_list.append(f"{number[0]}.{number[1:]}" + ("+PTX" if ptx else ""))
    if not flags:
        raise ValueError(f"BEITFAST_CUDA_ARCHS names no architecture: {archs!r}")
    return flags, ";".join(torch_list)


def _cxx_accepts(flag: str) -> bool:
    """Whether the C++ compiler compiles and links a trivial program with ``flag``."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            result = subprocess.run([compiler, flag, source, "-o", os.path.join(tmp, "probe")],
                                    capture_output=True)
        except OSError:
            return False
        return result.returncode == 0


def _nvidia_include_dirs() -> list[str]:
    # torch's CUDA headers include cuSPARSE/cuBLAS headers that pip's nvidia-* wheels ship.
    roots = site.getsitepackages() + [site.getusersitepackages()]
    return [path for root in roots for version in ("cu13", "cu12")
            if os.path.isdir(path := os.path.join(root, "nvidia", version, "include"))]


# Loads the built library the way `import beitfast._C` does, in a fresh interpreter.
_LOAD_CHECK = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("beitfast._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
"""


def _load_checked(build_ext_class):
    """``build_ext`` that fails when the built library cannot be loaded: a shared library links with
    undefined symbols (e.g. a torch function torch does not export), which would only show at import."""

    class BuildAndLoadExtension(build_ext_class):
        def run(self):
            super().run()
            for extension in self.extensions:
                path = os.path.abspath(self.get_ext_fullpath(extension.name))
                with tempfile.TemporaryDirectory() as elsewhere:  # keep the checkout off sys.path
                    result = subprocess.run([sys.executable, "-c", _LOAD_CHECK, path], cwd=elsewhere,
                                            capture_output=True, text=True)
                if result.returncode != 0:
                    os.remove(path)  # a broken library left in place would fail every later import
                    raise RuntimeError(f"{extension.name} was built but cannot be loaded ({path}):\n"
                                       f"{result.stderr.strip()[-2000:]}")

    return BuildAndLoadExtension


def _extensions() -> tuple[list, dict]:
    if not _flag("BEITFAST_BUILD_EXT"):
        print("beitfast: BEITFAST_BUILD_EXT=0, building without the extension beitfast._C")
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    headers = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.cuh"))
    nvcc_found = bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    with_cuda = _flag("BEITFAST_BUILD_CUDA") and torch.version.cuda is not None and nvcc_found

    # -g0 drops the debug info that Python's own CFLAGS ask for: it only slows the build.
    cxx_flags = ["-O3", "-g0"]
    link_flags = []
    if _cxx_accepts("-fopenmp"):
        # at::parallel_for runs serially unless the extension itself is compiled with OpenMP.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    common = dict(include_dirs=[CSRC] + _nvidia_include_dirs(), depends=headers,
                  extra_link_args=link_flags)
    if with_cuda:
        gencode, torch_arch_list = _gencode_flags(os.environ.get("BEITFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
        os.environ["TORCH_CUDA_ARCH_LIST"] = torch_arch_list
        # torch's defaults hide the native half/bfloat16 operators; the kernels (and the one-file
        # check `csrc/nvcc_check.sh`) use them, as CUDA does by default.
        native_half = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                       "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        nvcc_flags = ["-O3", "--use_fast_math", "-std=c++20", "-diag-suppress", "3189",
                      *native_half, *gencode]
        print(f"beitfast: building beitfast._C with CUDA {torch.version.cuda} ({cuda_home}) "
              f"for {torch_arch_list}: {len(cpp_sources)} C++ and {len(cuda_sources)} CUDA sources")
        extension = CUDAExtension(
            "beitfast._C", cpp_sources + cuda_sources,
            define_macros=[("BEITFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common,
        )
    else:
        why = ("BEITFAST_BUILD_CUDA=0" if not _flag("BEITFAST_BUILD_CUDA")
               else "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
        print(f"beitfast: building beitfast._C for CPU only ({why}): {len(cpp_sources)} C++ sources")
        extension = CppExtension("beitfast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [extension], {"build_ext": _load_checked(BuildExtension.with_options(use_ninja=True))}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()

# The measured per-GPU backend orders of the dispatcher (beitfast bench --calibrate).
package_data = {"beitfast.ops": ["preferences/*.json"]}
setup(packages=packages, package_dir=package_dir, package_data=package_data, ext_modules=ext_modules,
      cmdclass=cmdclass)
