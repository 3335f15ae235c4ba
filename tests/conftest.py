"""What the test modules share, made once per session: the tiny model's engine folders and its
torch pipeline for the reference workflow."""

from __future__ import annotations

import datetime
import importlib.util
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from filelock import FileLock

from zimage_trt.build_engines.build import BuildResult, run_build
from zimage_trt.build_engines.plan import BuildOptions, plan_build
from zimage_trt.cli import main
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import load_workflow

ROOT = Path(__file__).resolve().parent.parent


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` imported as the module ``NAME`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> BuildResult:
    """The reference workflow's ONNX Runtime folder (fp32, the tiny LoRA fused at 1.0), built
    once for the whole run: pytest-xdist's workers share it (no test changes it)."""

    def build(out: Path) -> BuildResult:
        options = BuildOptions(backend="onnxruntime", precision="fp32")
        plan = plan_build(options, model="tiny", workflow=load_workflow("zimage-121101"))
        return run_build(plan, options, out, log=lambda msg: None)

    if worker_id == "master":  # not distributed
        return build(tmp_path_factory.mktemp("engines"))
    shared = tmp_path_factory.getbasetemp().parent  # the same for every worker of this run
    with FileLock(str(shared / "built.lock")):
        record = shared / "built.pickle"
        if record.exists():
            result: BuildResult = pickle.loads(record.read_bytes())
            return result
        result = build(shared / "engines")
        record.write_bytes(pickle.dumps(result))
        return result


@dataclass
class DoubleBuild:
    result: BuildResult
    trt: object  # the tests.tensorrt_double.FakeTensorRT that built it
    options: BuildOptions
    plan: object


@pytest.fixture(scope="session")
def built_tensorrt_double(tmp_path_factory: pytest.TempPathFactory) -> DoubleBuild:
    """A refittable, weight-streaming bf16 TensorRT folder for 256×256 (no LoRA) made by
    build.py's TensorRT branch against the recording double (tests/tensorrt_double.py: it
    checks our calls, it proves nothing about TensorRT), its parser reading each real ONNX
    file. The double is installed only while building: a test that loads the plans installs
    ``trt`` again."""
    import torch._dynamo  # noqa: F401  # before the double: dynamo probes find_spec("tensorrt")

    from tests.tensorrt_double import FakeTensorRT
    from zimage_trt.engines import tensorrt_env

    trt = FakeTensorRT("10.13.0.35")
    trt.read_onnx = True
    out = tmp_path_factory.mktemp("tensorrt-engines")
    options = BuildOptions(backend="tensorrt", precision="bf16", check_parity=False,
                           refittable=True, weight_streaming=True,
                           optimization_level=4)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", trt)
        mp.setattr(tensorrt_env, "gpu_identity", lambda device=0: {
            "name": "Fake GPU", "compute_capability": "9.0", "cuda": "13.0"})  # fmt: skip
        plan = plan_build(options, model="tiny", resolutions=[(256, 256)], log=lambda m: None)
        result = run_build(plan, options, out, log=lambda m: None)
    return DoubleBuild(result, trt, options, plan)


@pytest.fixture(scope="session")
def reference_pipeline() -> Pipeline:
    """The torch backend opened on the tiny model for the reference workflow (tiny LoRA at 1)."""
    return Pipeline.open(model="tiny", workflow="zimage-121101", log=lambda msg: None)


#: a catalogue case (issue 12): argv built from a scratch folder, the expected message
#: (``{d}`` = that folder, ``{date}`` = today), and the exit code
Case = tuple[Callable[[Path], list[str]], str, int]


@pytest.fixture
def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[[Case], str]:
    """Run a catalogue case through ``main(argv)`` in a scratch folder holding ``afile``: assert
    its exit code, that stderr ends with exactly ``zimage-trt: error: MESSAGE``, no traceback, no
    model loaded, nothing written or changed in the folder. Returns stderr."""

    def check(case: Case) -> str:
        build, expected, code = case
        (tmp_path / "afile").write_text("keep me")
        argv = build(tmp_path)
        before = sorted(p.name for p in tmp_path.iterdir())
        capsys.readouterr()
        assert main(argv) == code
        err = capsys.readouterr().err
        date = datetime.date.today().isoformat()
        message = f"zimage-trt: error: {expected}".replace("{d}", str(tmp_path))
        lines = message.replace("{date}", date).splitlines()
        assert err.splitlines()[-len(lines) :] == lines
        assert "Traceback" not in err and "loading the" not in err  # no model was loaded
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
        assert (tmp_path / "afile").read_text() == "keep me"
        return err

    return check
