"""The native extension beitfast._C: its build configuration, that it loads and registers its ops, and
that the package works without it (pure PyTorch fallbacks)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import beitfast
from beitfast import _ext

ROOT = Path(__file__).resolve().parents[1]
BUILT_LIBRARIES = glob.glob(str(ROOT / "beitfast" / "_C*.so")) + glob.glob(str(ROOT / "beitfast" / "_C*.pyd"))
NOT_BUILT = "beitfast._C is not built here (pip install --no-build-isolation -e .)"


def run_python(code: str, env: dict[str, str | None] | None = None, cwd: Path | str | None = None) -> str:
    """Runs ``code`` in a fresh interpreter (outside the checkout unless ``cwd``) with the environment
    changed by ``env`` (None removes a variable); returns its stdout."""
    environment = {**os.environ, **(env or {})}
    environment = {name: value for name, value in environment.items() if value is not None}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=cwd or Path(__file__).parent, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# --- the built extension ------------------------------------------------------------------------


def test_built_extension_loads():
    if not BUILT_LIBRARIES:
        pytest.skip(NOT_BUILT)
    # A library that is present must load: one that does not (a missing symbol) is a broken build.
    assert _ext.missing() is None, _ext.missing()
    assert isinstance(_ext.load().with_cuda, bool)


def test_ops_are_registered():
    if not BUILT_LIBRARIES:
        pytest.skip(NOT_BUILT)
    _ext.load()
    masks = torch.ops.beitfast.blockwise_masks
    assert set(masks.overloads()) == {"default", "out"}
    has_kernel = torch._C._dispatch_has_computed_kernel_for_dispatch_key
    assert has_kernel("beitfast::blockwise_masks.out", "CPU")
    assert has_kernel("beitfast::blockwise_masks.out", "Meta")
    assert has_kernel("beitfast::blockwise_masks.out", "CUDA") == _ext.has_cuda_ops()
    # Every op of the namespace has a kernel somewhere: a schema without one is a registration slip.
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("beitfast::")]
    assert "beitfast::blockwise_masks" in names
    for name in names:
        assert any(has_kernel(name, key) for key in ("CPU", "CUDA", "CompositeExplicitAutograd",
                                                      "CompositeImplicitAutograd")), name


def test_missing_reports_unknown_ops_and_devices():
    if not BUILT_LIBRARIES:
        pytest.skip(NOT_BUILT)
    assert _ext.missing("blockwise_masks.out", "cpu") is None
    assert _ext.missing("blockwise_masks", "cpu") is None
    assert "has no op beitfast::no_such_op" in _ext.missing("no_such_op", "cpu")
    assert "has no op beitfast::blockwise_masks.nope" in _ext.missing("blockwise_masks.nope", "cpu")
    if not _ext.has_cuda_ops():
        assert "built without CUDA" in _ext.missing("blockwise_masks.out", "cuda")
    assert _ext.available("blockwise_masks.out", "cpu")() is None


def test_editable_install_keeps_the_checkout_off_sys_path():
    if Path(beitfast.__file__).resolve().parent != ROOT / "beitfast":
        pytest.skip("beitfast is not installed from this checkout")
    # Another package may own a top-level `kernels` (Hugging Face's, which transformers needs): what
    # matters is that no top-level module resolves into this checkout.
    out = run_python("""
        import importlib.util, json, beitfast.kernels
        spec = importlib.util.find_spec("kernels")
        print(json.dumps([spec and spec.origin, beitfast.kernels.__file__]))
    """, cwd="/")
    top_level_origin, kernels_file = json.loads(out.splitlines()[-1])
    if top_level_origin is not None:
        assert not Path(top_level_origin).resolve().is_relative_to(ROOT), (
            f"the repository root is on sys.path: `import kernels` finds {top_level_origin}")
    assert Path(kernels_file).resolve() == ROOT / "kernels" / "__init__.py"


def test_top_level_kernels_check_catches_the_checkout_on_sys_path():
    # The check above must be able to fail: with the root on sys.path, `kernels` is this checkout's.
    out = run_python("""
        import importlib.util
        print(importlib.util.find_spec("kernels").origin)
    """, env={"PYTHONPATH": str(ROOT)}, cwd="/")
    assert Path(out.strip()).resolve().is_relative_to(ROOT)


# --- the package without the extension ------------------------------------------------------------

# Makes `import beitfast._C` fail as it does in an install without the extension.
_HIDE_EXTENSION = """
import importlib.abc, logging, sys, warnings
class _NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "beitfast._C":
            raise ModuleNotFoundError("No module named 'beitfast._C'", name=name)
sys.meta_path.insert(0, _NoExtension())
records = []
class _Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("beitfast").addHandler(_Keep())
"""


def test_package_works_without_the_extension():
    out = run_python(_HIDE_EXTENSION + """
import json, torch, beitfast
from beitfast import _ext
warned_at_import = list(records)
masks = beitfast.MaskingGenerator((14, 14), 75, seed=0).batch(16)
beitfast.MaskingGenerator((14, 14), 75, seed=1).batch(4)
config = beitfast.BEiTConfig.tiny(img_size=32, depth=1)
model = beitfast.BEiT(config).eval()
images = torch.randn(2, 3, 32, 32)
mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
loss = model(images, bool_masked_pos=mask, labels=torch.randint(0, config.vocab_size, (2, 4)))
print(json.dumps(dict(
    warned_at_import=warned_at_import, warnings=records, masks=list(masks.shape),
    counts=masks.sum(1).tolist(), loss=float(loss), loaded="beitfast._C" in sys.modules,
    missing=_ext.missing("blockwise_masks.out", "cpu"), cuda_ops=_ext.has_cuda_ops())))
""")
    report = json.loads(out.splitlines()[-1])
    assert report["warned_at_import"] == [], "importing beitfast must not warn"
    assert report["warnings"] == [
        "beitfast._C is not built: pure PyTorch fallbacks are used; see DEVELOPERS.md"]
    assert report["masks"] == [16, 196] and max(report["counts"]) == 75
    assert torch.isfinite(torch.tensor(report["loss"]))
    assert report["loaded"] is False and report["cuda_ops"] is False
    assert report["missing"] == "beitfast._C is not built (see DEVELOPERS.md)"


def test_import_does_not_load_the_extension():
    out = run_python("import sys, beitfast; print('beitfast._C' in sys.modules)")
    assert out.strip() == "False"


# --- build configuration (setup.py), read without compiling -------------------------------------

# Runs setup.py with setuptools.setup replaced by a recorder of its arguments.
_READ_SETUP = """
import json, os, runpy, setuptools
arguments = {}
setuptools.setup = lambda **kwargs: arguments.update(kwargs)
runpy.run_path("setup.py", run_name="__main__")
ext = arguments["ext_modules"][0] if arguments["ext_modules"] else None
print(json.dumps(dict(
    packages=arguments["packages"], package_dir=arguments["package_dir"],
    sources=ext.sources if ext else None,
    nvcc=ext.extra_compile_args.get("nvcc") if ext else None,
    cxx=ext.extra_compile_args.get("cxx") if ext else None,
    arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))))
"""


def read_setup(**env: str) -> dict:
    """setup.py's arguments under the default switches (whatever this shell sets) changed by ``env``."""
    defaults = {"BEITFAST_BUILD_EXT": None, "BEITFAST_BUILD_CUDA": None, "BEITFAST_CUDA_ARCHS": None,
                "TORCH_CUDA_ARCH_LIST": None}
    return json.loads(run_python(_READ_SETUP, env={**defaults, **env}, cwd=ROOT).splitlines()[-1])


def test_setup_packages_and_pure_python_switch():
    config = read_setup(BEITFAST_BUILD_EXT="0")
    assert config["sources"] is None
    assert {"beitfast", "beitfast.ops", "beitfast.kernels"} <= set(config["packages"])
    subpackages = {str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
                   for p in (ROOT / "beitfast").rglob("__init__.py")}
    assert subpackages <= set(config["packages"]), "every beitfast subpackage is installed"
    assert config["package_dir"]["beitfast.kernels"] == "kernels"


def test_setup_compiles_every_source():
    config = read_setup(BEITFAST_BUILD_CUDA="0")
    cpp = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    assert config["sources"] == cpp and config["nvcc"] is None
    assert "-O3" in config["cxx"]


def test_setup_cuda_architectures_from_the_environment():
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if torch.version.cuda is None or not nvcc.exists():
        pytest.skip("needs torch with CUDA and nvcc")
    config = read_setup(BEITFAST_CUDA_ARCHS="86, 90a+PTX")
    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    assert set(cu) <= set(config["sources"])
    assert config["arch_list"] == "8.6;9.0a+PTX"
    gencode = [f for f in config["nvcc"] if f.startswith("-gencode")]
    assert gencode == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90a,code=sm_90a",
                       "-gencode=arch=compute_90a,code=compute_90a"]
    assert {"-O3", "--use_fast_math", "-std=c++20"} <= set(config["nvcc"])
    default = read_setup()
    assert [f for f in default["nvcc"] if f.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def _make_plan(home, *targets):
    """What `make` would run for `targets` with HOME=home (dry run, from the repository root)."""
    # Not what an enclosing `make test` passes down (its flags, its level: "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS")) and k != "VENV"}
    out = subprocess.run(["make", "--no-print-directory", "-n", f"HOME={home}", *targets], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env)
    return out.stdout


def test_environments_are_keyed_by_their_name_not_by_file_times(tmp_path):
    # CI clones afresh: every tracked file is newer than an environment's .ready. A finished environment
    # (even one reached through a link) is reused; a half-built one or a stale link is replaced whole.
    cache = tmp_path / ".cache" / "beitfast"
    venv = _make_plan(tmp_path, "--eval=print-venv:;@echo $(VENV)", "print-venv").split()[-1]
    assert venv.startswith(str(cache))
    real = cache / "elsewhere"
    (real / "bin").mkdir(parents=True)
    (real / ".ready").touch()
    os.utime(real / ".ready", (0, 0))
    Path(venv).symlink_to(real)
    assert "venv" not in _make_plan(tmp_path, "env")
    (real / ".ready").unlink()
    plan = _make_plan(tmp_path, "env")
    assert plan.splitlines()[0] == f"rm -rf {venv}"
    assert "-m venv" in plan
