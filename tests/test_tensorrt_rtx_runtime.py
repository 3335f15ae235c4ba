"""The TensorRT-RTX runtime backend (issue 13, item 3), driven by the recording double installed
as ``tensorrt_rtx`` (tests/tensorrt_double.py) on host memory, with no plain TensorRT importable:
runtime configs with the folder's runtime cache, JIT specialisation paid once per GPU
architecture and kept in a file beside the engines, the machine checks. It checks our calls
against our reading of TensorRT-RTX's API; no TensorRT-RTX plan has run (no RTX GPU here)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorrt_double import FakeTensorRT, TensorDesc

from tests.conftest import DoubleBuild
from zimage_trt.engines import folder as folder_module
from zimage_trt.engines.folder import check_machine, check_request, describe_folder
from zimage_trt.engines.manifest import Manifest, ManifestError, read_manifest, write_manifest
from zimage_trt.engines.tensorrt_engines import TensorRTEngine
from zimage_trt.engines.tensorrt_rtx_engines import (
    RuntimeCache,
    TensorRTRTXEngine,
    runtime_cache_path,
)
from zimage_trt.errors import UnavailableError
from zimage_trt.workflow import LoraRef, load_workflow

VERSION = "1.7.1.116"
PROFILES_JSON = [
    {"latents": [(1, 16, 2, 2), (1, 16, 3, 3), (1, 16, 4, 4)]},
    {"latents": [(1, 16, 5, 5), (1, 16, 6, 6), (2, 16, 8, 8)]},
]


def _vae(latents: torch.Tensor) -> torch.Tensor:
    return latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * 2 + 1


@pytest.fixture
def rtx(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    """The double as ``tensorrt_rtx`` (a GPU of compute capability 8.9); plain TensorRT is not
    importable, and the engines run on host memory."""
    import torch._dynamo  # before the double: dynamo probes find_spec("tensorrt")

    double = FakeTensorRT(VERSION, library="tensorrt_rtx")
    double.output_shapes = lambda s: {
        "image": (s["latents"][0], 3, *(8 * d for d in s["latents"][2:]))
    }
    double.compute = lambda x: {"image": _vae(x["latents"])}
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", double)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setattr(TensorRTEngine, "_check_device", lambda self: None)
    monkeypatch.setattr(TensorRTEngine, "_stream", lambda self: 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX 4090")
    return double


def _engine(rtx: FakeTensorRT, cache: RuntimeCache) -> TensorRTRTXEngine:
    from zimage_trt.engines.manifest import Profile, ShapeRange

    plan = rtx.make_plan(
        [TensorDesc("latents", "FLOAT", (-1, 16, -1, -1))],
        [TensorDesc("image", "FLOAT", (-1, 3, -1, -1))],
        PROFILES_JSON,
    )
    profiles = [
        Profile(name=f"stage{i}", shapes={"latents": ShapeRange(min=lo, opt=opt, max=hi)})
        for i, p in enumerate(PROFILES_JSON, 1)
        for lo, opt, hi in [p["latents"]]
    ]
    return TensorRTRTXEngine("vae_decoder", plan, profiles, device="cpu", runtime_cache=cache)


def _jit(rtx: FakeTensorRT, since: int) -> list[str]:
    return [e[1].split("/", 1)[1] for e in rtx.events[since:] if e[0] == "jit_compile"]


def test_jit_kernels_are_compiled_once_and_kept_beside_the_engines(
    rtx: FakeTensorRT, tmp_path: Path
) -> None:
    path = runtime_cache_path(tmp_path, "8.9")
    assert path.name == "runtime-cache-sm89.rtxcache"
    logged: list[str] = []
    cache = RuntimeCache(path, logged.append)
    engine = _engine(rtx, cache)
    small, big = torch.randn(1, 16, 3, 3), torch.randn(2, 16, 7, 8)
    out = engine(latents=small)["image"]
    assert torch.equal(out, _vae(small))  # the bound buffers, read and written by the double
    assert _jit(rtx, 0) == ["p0/latents=[1, 16, 3, 3]"]
    configs = [e for e in rtx.events if e[0] == "create_execution_context"]
    assert configs == [("create_execution_context", "USER_MANAGED via runtime config")]
    context = rtx.engines[-1].contexts[0]
    assert context.config is not None and context.device_memory is not None
    assert context.config.dynamic_shapes_kernel_specialization_strategy.name == "EAGER"
    assert logged == [f"runtime cache: none yet; the kernels compiled now are kept in {path}"]
    assert cache.writes == 1 and path.is_file()

    events = len(rtx.events)
    assert torch.equal(engine(latents=big)["image"], _vae(big))
    engine(latents=small)
    engine(latents=big)
    assert _jit(rtx, events) == ["p1/latents=[2, 16, 7, 8]"]  # once per (profile, shape)
    assert cache.writes == 2  # after each new shape, not after repeats
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left

    # the next process: the kernels come from the file, nothing is compiled or written
    logged.clear()
    again = RuntimeCache(path, logged.append)
    second = _engine(rtx, again)
    events, stored = len(rtx.events), path.read_bytes()
    assert torch.equal(second(latents=big)["image"], _vae(big))
    second(latents=small)
    assert _jit(rtx, events) == [] and again.writes == 0 and path.read_bytes() == stored
    assert logged == [f"runtime cache: 0.0 MiB of compiled kernels from {path}"]
    assert again.loaded_bytes == len(stored) > 0


def test_a_cache_of_another_gpu_is_replaced_and_an_unwritable_one_said_once(
    rtx: FakeTensorRT, tmp_path: Path
) -> None:
    path = runtime_cache_path(tmp_path, "8.9")
    _engine(rtx, RuntimeCache(path))(latents=torch.zeros(1, 16, 2, 2))
    rtx.sm = "8.6"  # the same file met by another architecture's runtime (or a damaged one)
    logged: list[str] = []
    engine = _engine(rtx, RuntimeCache(path, logged.append))
    events = len(rtx.events)
    engine(latents=torch.zeros(1, 16, 2, 2))
    assert logged == [
        f"runtime cache {path}: TensorRT-RTX cannot use it (written for another GPU or by a "
        "newer TensorRT-RTX, or damaged); its kernels are compiled again and the file replaced"
    ]
    assert len(_jit(rtx, events)) == 1 and b'"sm": "8.6"' in path.read_bytes()

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    logged.clear()
    cache = RuntimeCache(blocked / "runtime-cache-sm86.rtxcache", logged.append)
    engine = _engine(rtx, cache)
    engine(latents=torch.zeros(1, 16, 2, 2))
    engine(latents=torch.zeros(1, 16, 6, 6))  # a second new shape: said once, not again
    assert len(logged) == 2 and logged[1].startswith(
        f"runtime cache {blocked / 'runtime-cache-sm86.rtxcache'} cannot be written ("
    )
    assert logged[1].endswith(
        "); the kernels compiled in this process will be compiled again by the next one"
    )
    assert cache.writes == 0 and blocked.read_text() == "not a folder"


def test_a_refit_is_refused_naming_the_backend(rtx: FakeTensorRT) -> None:
    plan = rtx.make_plan([TensorDesc("latents", "FLOAT", (1, 16, 2, 2))],
                         [TensorDesc("image", "FLOAT", (1, 3, 16, 16))],
                         [{"latents": [(1, 16, 2, 2)] * 3}])  # fmt: skip
    from zimage_trt.engines.manifest import Profile, ShapeRange

    profile = Profile(name="base", shapes={"latents": ShapeRange(
        min=(1, 16, 2, 2), opt=(1, 16, 2, 2), max=(1, 16, 2, 2))})  # fmt: skip
    with pytest.raises(UnavailableError) as err:
        TensorRTRTXEngine("denoiser", plan, [profile], device="cpu",
                          weights={"w": torch.zeros(1)})  # fmt: skip
    assert str(err.value) == (
        "engine 'denoiser': swapping LoRAs into TensorRT-RTX engines is not supported; rebuild "
        "the folder with the workflow's LoRAs"
    )


def _rtx_folder(built: DoubleBuild, tmp_path: Path, version: str = VERSION) -> Path:
    """The double's TensorRT folder, recorded as compiled by TensorRT-RTX for 8.9 and 12.0."""
    folder = tmp_path / "rtx-engines"
    shutil.copytree(built.result.folder, folder)
    manifest = read_manifest(folder)
    versions = {k: v for k, v in manifest.versions.items() if k != "tensorrt"}
    rtx_manifest = manifest.model_copy(update={
        "backend": "tensorrt-rtx", "machine": {}, "versions": {**versions, "tensorrt_rtx": version},
        "library": {"name": "tensorrt_rtx", "version": version},
        "targets": {"compute_capabilities": ["8.9", "12.0"]}})  # fmt: skip
    write_manifest(folder, rtx_manifest)
    return folder


def test_a_folder_loads_with_one_runtime_cache_and_one_activation_block(
    rtx: FakeTensorRT,
    built_tensorrt_double: DoubleBuild,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = _rtx_folder(built_tensorrt_double, tmp_path)
    real_check = check_machine
    checked: list[Manifest] = []

    def check_on_the_gpu(manifest: Manifest, device: torch.device) -> None:
        checked.append(manifest)  # the real checks, for the (mocked) GPU; the engines run on host
        real_check(manifest, torch.device("cuda"))

    monkeypatch.setattr(folder_module, "check_machine", check_on_the_gpu)
    logged: list[str] = []
    loaded = folder_module.load_engine_folder(folder, device=torch.device("cpu"), log=logged.append)
    engines = loaded.engines
    assert engines.backend == "tensorrt-rtx" and len(checked) == 1
    parts = [engines.text_encoder, engines.caption_path, engines.denoiser, engines.vae_decoder]
    assert all(isinstance(e, TensorRTRTXEngine) for e in parts)
    rtx_parts = [e for e in parts if isinstance(e, TensorRTRTXEngine)]
    assert len({id(e.runtime_cache) for e in rtx_parts}) == 1
    assert len({id(e.memory) for e in rtx_parts}) == 1
    cache_file = folder / "runtime-cache-sm89.rtxcache"
    assert rtx_parts[0].runtime_cache.path == cache_file
    assert [e for e in rtx.events if e[0] == "deserialize_cuda_engine"]  # by the RTX double
    assert not cache_file.exists()  # nothing compiled before the first call
    latents = read_manifest(folder).engines["vae_decoder"].profiles[0].shapes["latents"].opt
    image = engines.vae_decoder(latents=torch.ones(latents, dtype=torch.bfloat16))["image"]
    assert image.dtype == torch.bfloat16 and torch.equal(image.float(), _vae(torch.ones(latents)))
    assert logged[-1] == (
        f"runtime cache: none yet; the kernels compiled now are kept in {cache_file}"
    )
    assert cache_file.read_bytes().count(b"/p0/latents=") == 1

    shown = describe_folder(folder)
    assert "serves here: yes (tensorrt-rtx on cuda)" in shown
    assert (
        "runtime caches (TensorRT-RTX's compiled kernels, per GPU architecture): "
        f"runtime-cache-sm89.rtxcache {cache_file.stat().st_size / 2**20:.1f} MiB" in shown
    )

    wf = load_workflow("zimage-turbo")
    wf.models.loras = [LoraRef(path="style.safetensors", strength=0.5)]
    with pytest.raises(ManifestError) as err:
        check_request(read_manifest(folder), wf, folder)
    assert "and TensorRT-RTX engines are not refitted here (LoRA swaps are TensorRT's only)" in str(
        err.value
    )
    before = len(checked)
    with pytest.raises(ManifestError, match=r"CUDA graphs need TensorRT engines; .* holds "
                       r"tensorrt-rtx engines"):  # fmt: skip
        folder_module.load_engine_folder(folder, device=torch.device("cpu"), cuda_graphs=True)
    assert len(checked) == before  # refused before the machine or any file was looked at


@pytest.mark.parametrize(
    ("capability", "name", "version", "message"),
    [
        ((9, 0), "NVIDIA H200", VERSION,
         "{built}; this machine's GPU (NVIDIA H200, 9.0) is not a TensorRT-RTX target at all: "
         "build with --backend tensorrt here"),
        ((8, 6), "NVIDIA RTX 3090", VERSION,
         "{built}; this machine's GPU (NVIDIA RTX 3090) is 8.6: rebuild with "
         "--compute-capability 8.6"),
        ((12, 0), "NVIDIA RTX 5090", "1.6.0.20",
         "the engines were built with TensorRT-RTX 1.6.0.20; this machine has TensorRT-RTX "
         f"{VERSION}: rebuild the folder here"),
    ],
)  # fmt: skip
def test_a_gpu_or_version_the_plans_are_not_for_is_refused(
    rtx: FakeTensorRT,
    built_tensorrt_double: DoubleBuild,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    name: str,
    version: str,
    message: str,
) -> None:
    manifest = read_manifest(_rtx_folder(built_tensorrt_double, tmp_path, version))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    built = "these engines were compiled by TensorRT-RTX for compute capabilities 8.9, 12.0"
    with pytest.raises(UnavailableError) as err:
        check_machine(manifest, torch.device("cuda"))
    assert str(err.value) == message.format(built=built)
