"""The runtime stays lean: nothing it imports may pull in diffusers or transformers."""

from __future__ import annotations

import subprocess
import sys

# Block the heavy libraries whether or not they are installed, then import every runtime module
# and the CLI: any import of them anywhere in that graph raises.
PROBE = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "transformers"):
            raise ImportError(f"runtime imported {name}")
sys.meta_path.insert(0, Block())
import zimage_trt.runtime as runtime
for m in pkgutil.iter_modules(runtime.__path__):
    importlib.import_module(f"zimage_trt.runtime.{m.name}")
import zimage_trt.cli, zimage_trt.comfy, zimage_trt.summary
print(len(list(pkgutil.iter_modules(runtime.__path__))))
"""


def test_runtime_imports_no_heavy_libraries() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 8  # every runtime module was imported under the block


def test_the_block_catches_an_import() -> None:
    probe = PROBE.replace("import zimage_trt.runtime as runtime", "import transformers")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode != 0 and "runtime imported transformers" in out.stderr
