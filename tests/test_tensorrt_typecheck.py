"""mypy checks the TensorRT calls against tensorrt-stubs — and can fail.

Without the py.typed markers and syntax repairs of ``scripts/tensorrt_stubs.py`` mypy types every
TensorRT object as ``Any`` and passes anything; the deliberately wrong calls below prove the
check is real. Also: the repair script itself, on a small stub tree.
"""

from __future__ import annotations

import importlib.util
import site
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "zimage_trt/build_engines/tensorrt_builder.py",
    "zimage_trt/engines/tensorrt_engines.py",
    "zimage_trt/engines/tensorrt_env.py",
]
WRONG = """\
import tensorrt as trt


def wrong(engine: trt.ICudaEngine, profile: trt.IOptimizationProfile) -> None:
    profile.set_shape("x", (1,), (1,), (1,))
    engine.no_such_method()
"""


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "tensorrt_stubs", ROOT / "scripts/tensorrt_stubs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed_stubs() -> Path | None:
    folders = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for folder in folders:
        if (Path(folder) / "tensorrt" / "__init__.pyi").is_file():
            return Path(folder)
    return None


def test_mypy_checks_tensorrt_calls(tmp_path: Path) -> None:
    stubs = _installed_stubs()
    if stubs is None:
        pytest.skip(
            "tensorrt-stubs is not installed (CI's typing set-up: bash scripts/setup_typing.sh)"
        )
    for package in ("tensorrt", "tensorrt_bindings"):
        assert (stubs / package / "py.typed").is_file(), (
            f"{stubs / package} has no py.typed: mypy would type TensorRT as Any. "
            "Run: python scripts/tensorrt_stubs.py"
        )
    wrong = tmp_path / "wrong_tensorrt_calls.py"
    wrong.write_text(WRONG)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-error-summary",
            "--show-error-codes",
            *MODULES,
            str(wrong),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    # by file name: mypy's cache may report an identical earlier temp file's path
    ours = [line for line in lines if wrong.name not in line]
    assert ours == [], result.stdout  # the builder and runtime type-check against the stubs
    assert [line.partition(f"{wrong.name}:")[2] for line in lines] == [
        '5: error: Argument 2 to "set_shape" of "IOptimizationProfile" has incompatible type '
        '"tuple[int]"; expected "Dims"  [arg-type]',
        '5: error: Argument 3 to "set_shape" of "IOptimizationProfile" has incompatible type '
        '"tuple[int]"; expected "Dims"  [arg-type]',
        '5: error: Argument 4 to "set_shape" of "IOptimizationProfile" has incompatible type '
        '"tuple[int]"; expected "Dims"  [arg-type]',
        '6: error: "ICudaEngine" has no attribute "no_such_method"  [attr-defined]',
    ], result.stdout + result.stderr
    assert result.returncode == 1


WRONG_RTX = """\
import tensorrt_rtx as trt


def wrong(config: trt.IBuilderConfig, runtime: trt.IRuntimeConfig) -> None:
    config.set_compute_capability("8.9", 0)
    config.no_such_method()
    runtime.set_runtime_cache(b"a file's bytes")
    runtime.create_runtime_cache().deserialize(7)
"""


def test_mypy_checks_tensorrt_rtx_calls(tmp_path: Path) -> None:
    """The stubs CI generates for TensorRT-RTX (stubgen, scripts/setup_typing.sh) type its
    calls: a string for a ComputeCapability, a missing method, and runtime-cache calls (which
    stubgen leaves untyped; scripts/tensorrt_stubs.py types them) given the wrong things fail
    the check."""
    stubs = ROOT / "typings" / "tensorrt_rtx_bindings" / "tensorrt_rtx.pyi"
    if not stubs.is_file():
        pytest.skip("no tensorrt_rtx stubs (CI's typing set-up: bash scripts/setup_typing.sh)")
    assert len(stubs.read_text().splitlines()) > 2000  # the whole API, not a placeholder
    wrong = tmp_path / "wrong_rtx_calls.py"
    wrong.write_text(WRONG_RTX)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes",
         "zimage_trt/build_engines/tensorrt_builder.py",
         "zimage_trt/engines/tensorrt_rtx_engines.py", str(wrong)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [line for line in lines if wrong.name not in line] == [], result.stdout
    assert [line.partition(f"{wrong.name}:")[2] for line in lines] == [
        '5: error: Argument 1 to "set_compute_capability" of "IBuilderConfig" has incompatible '
        'type "str"; expected "ComputeCapability"  [arg-type]',
        '6: error: "IBuilderConfig" has no attribute "no_such_method"  [attr-defined]',
        '7: error: Argument 1 to "set_runtime_cache" of "IRuntimeConfig" has incompatible type '
        '"bytes"; expected "IRuntimeCache | None"  [arg-type]',
        '8: error: Argument 1 to "deserialize" of "IRuntimeCache" has incompatible type "int"; '
        'expected "Buffer"  [arg-type]',
    ], result.stdout + result.stderr


BINDINGS = (
    "import typing\r\n"
    "class INetworkDefinition:\r\n"
    "    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, "
    "scale: Weights = None, power: Weights = None, channel_axis: int) -> IScaleLayer:\r\n"
    '        """\r\n'
    "            :arg in: documentation keeps its words\r\n"
    '        """\r\n'
    "class IPluginV3:\r\n"
    "    def on_shape_change(self: IPluginV3, in: list[PluginTensorDesc], "
    "out: list[PluginTensorDesc]) -> None:\r\n"
    "        ...\r\n"
)


def _stub_tree(root: Path) -> Path:
    (root / "tensorrt").mkdir(parents=True)
    (root / "tensorrt_bindings").mkdir()
    (root / "tensorrt" / "__init__.pyi").write_bytes(b"from tensorrt_bindings import *\r\n")
    (root / "tensorrt_bindings" / "__init__.pyi").write_bytes(b"from . import tensorrt\r\n")
    (root / "tensorrt_bindings" / "tensorrt.pyi").write_bytes(BINDINGS.encode())
    return root


def test_stub_repair_is_exact_and_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _load_script()
    root = _stub_tree(tmp_path / "site")
    assert script.main(["--site", str(root)]) == 0
    stub = root / "tensorrt_bindings" / "tensorrt.pyi"
    created = "created (mypy reads the stubs only with this marker)"
    assert capsys.readouterr().out.splitlines() == [
        f"{root / 'tensorrt' / 'py.typed'}: {created}",
        f"{root / 'tensorrt_bindings' / 'py.typed'}: {created}",
        f"{stub}:3: add_scale_nd: gave parameter channel_axis the default ...",
        f"{stub}:8: on_shape_change: renamed parameter in → in_",
    ]
    fixed = stub.read_bytes().decode()
    assert fixed == BINDINGS.replace("channel_axis: int)", "channel_axis: int = ...)").replace(
        "IPluginV3, in:", "IPluginV3, in_:"
    )  # CRLF line ends and the docstring untouched
    assert script.main(["--site", str(root)]) == 0
    assert capsys.readouterr().out == (
        f"tensorrt stubs in {root} are already usable by mypy; nothing to change\n"
    )
    assert stub.read_bytes().decode() == fixed


def test_stub_repair_reports_missing_stubs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _load_script()
    assert script.main(["--site", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"tensorrt-stubs is not installed (no tensorrt/tensorrt_bindings stub packages in "
        f"{tmp_path}); install them with: pip install --no-deps tensorrt-stubs==10.13.0.35.1\n"
    )


def test_stub_repair_refuses_what_it_cannot_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _load_script()
    root = _stub_tree(tmp_path / "site")
    (root / "tensorrt" / "__init__.pyi").write_bytes(b"class Broken(:\r\n")
    assert script.main(["--site", str(root)]) == 1
    assert capsys.readouterr().err.startswith(
        f"{root / 'tensorrt' / '__init__.pyi'}:1: cannot repair"
    )
