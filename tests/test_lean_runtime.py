"""The runtime stays lean: nothing it imports may pull in diffusers or transformers, and a
torch-backend ``generate`` loads none of the builder's or the compiled backends' libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Block the heavy libraries whether or not they are installed, then import every module of the
# run time's layers (sampling, engines, runtime) and the CLI: any import of them anywhere in
# that graph raises.
PROBE = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "transformers"):
            raise ImportError(f"runtime imported {name}")
sys.meta_path.insert(0, Block())
import zimage_trt.runtime as runtime
import zimage_trt.engines as engines
import zimage_trt.sampling as sampling
count = 0
for package in (sampling, engines, runtime):
    for m in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{m.name}")
        count += 1
import zimage_trt.cli, zimage_trt.workflow.comfy_import, zimage_trt.workflow.summary
print(count)
"""

# The torch backend end to end, in-process through the CLI, with every library it must not
# need blocked: the builder's (onnx, onnxscript), the compiled backends' (onnxruntime,
# tensorrt), the server's (fastapi, uvicorn, prometheus_client) and the oracles (diffusers,
# transformers). Looking for them is allowed (torch probes with find_spec whether they are
# installed); loading one raises.
GENERATE = """
import importlib.abc, importlib.machinery, sys
BLOCKED = ("diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "tensorrt",
           "fastapi", "uvicorn", "prometheus_client")
class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"generate imported {spec.name}")
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Refuse())
        return None
sys.meta_path.insert(0, Block())
from zimage_trt.cli import main
code = main(["generate", "--model", "tiny", "-w", sys.argv[2], "-p", "a red fox in snow",
             "--out", sys.argv[1], "-q"])
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print(code, loaded)
"""


def test_runtime_imports_no_heavy_libraries() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 8  # every runtime module was imported under the block


def test_the_block_catches_an_import() -> None:
    probe = PROBE.replace("import zimage_trt.runtime as runtime", "import transformers")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode != 0 and "runtime imported transformers" in out.stderr


def _small_reference(folder: Path) -> str:
    """The reference workflow (both samplers, EasyCache, cfg with the negative prompt, upscales)
    at a quarter of its sides, written to ``folder``: the imports are the same, the work less."""
    from zimage_trt.workflow import load_workflow

    wf = load_workflow("zimage-121101")
    for stage, (width, height) in zip(wf.stages[:2], ((48, 64), (96, 112)), strict=True):
        stage.latent = stage.latent.model_copy(update={"width": width, "height": height})
    path = folder / "small.yaml"
    path.write_text(wf.to_yaml())
    return str(path)


def test_torch_generate_imports_no_builder_or_compiled_backend(tmp_path: Path) -> None:
    workflow = _small_reference(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", GENERATE, str(tmp_path / "out"), workflow],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "0 []", out.stdout + out.stderr
    assert len(list(tmp_path.rglob("*.png"))) == 3  # the image and two previews


def test_the_generate_block_catches_an_import(tmp_path: Path) -> None:
    probe = GENERATE.replace("from zimage_trt.cli import main", "import onnx")
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path), "unused"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "generate imported onnx" in out.stderr
