"""GGUF DiT weights kept quantized in memory (issue 17): dequantized one layer at a time inside
the forward with ComfyUI-GGUF's arithmetic, the output identical to the dequantize-at-load
model's; what cannot be done that way is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zimage_trt.errors import InputError
from zimage_trt.models import dit_keys
from zimage_trt.models.checkpoints import load_dit
from zimage_trt.models.gguf import write_gguf
from zimage_trt.models.gguf_resident import GGUFLinear, load_dit_quantized
from zimage_trt.models.model_files import ModelFiles
from zimage_trt.models.sources import ModelSources, load_fused_dit
from zimage_trt.models.tiny import tiny_dit_weights


def _qtype(name: str, tensor: torch.Tensor) -> str:
    """Q8_0 for the blocks' attention, Q4_0 for the rest of the quantizable matrices; 1-D and
    rows that do not fill 32-value blocks stay float32."""
    if tensor.ndim != 2 or tensor.shape[-1] % 32:
        return "F32"
    return "Q8_0" if ".attention." in name else "Q4_0"


@pytest.fixture(scope="module")
def gguf_dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "z_image_turbo-mixed.gguf"
    weights = {dit_keys.COMFY_PREFIX + k: v for k, v in tiny_dit_weights().items()}
    write_gguf(path, weights, "lumina2", _qtype)
    return path


def test_kept_quantized_computes_what_the_dequantized_model_computes(gguf_dit: Path) -> None:
    full = load_dit(gguf_dit, torch.float32)
    kept = load_dit_quantized(gguf_dit, torch.float32)
    linears = {n: m for n, m in kept.named_modules() if isinstance(m, GGUFLinear)}
    assert len(linears) == 34 and {m.qtype for m in linears.values()} == {"Q8_0", "Q4_0"}
    for name, module in linears.items():  # the same weight, made when the layer runs
        assert torch.equal(module.weight_value(), full.get_submodule(name).weight), name
    g = torch.Generator().manual_seed(0)
    x, caption = torch.randn(2, 16, 24, 20, generator=g), torch.randn(2, 40, 64, generator=g)
    sigma, valid = torch.rand(2, generator=g), torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    with torch.no_grad():
        assert torch.equal(kept(x, sigma, caption, valid), full(x, sigma, caption, valid))
    # in memory: Q8_0 34 bytes / 32 values, Q4_0 18 / 32, instead of 4 bytes a value
    stored = sum(m.blocks.numel() for m in linears.values())
    values = sum(m.in_features * m.out_features for m in linears.values())
    assert values * 18 / 32 < stored < values * 34 / 32 < values * 4
    kept_bytes = stored + sum(p.numel() * 4 for p in kept.parameters())
    full_bytes = sum(p.numel() * 4 for p in full.parameters())
    print(f"tiny DiT in memory: {kept_bytes:,} B kept quantized, {full_bytes:,} B dequantized")
    assert kept_bytes < full_bytes / 3


def test_what_cannot_stay_quantized_is_refused(gguf_dit: Path, tmp_path: Path) -> None:
    files = ModelFiles(transformer=gguf_dit, text_encoder=gguf_dit, vae=gguf_dit)
    lora = tmp_path / "style.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(lora))
    with pytest.raises(InputError) as refused:
        load_fused_dit(ModelSources(files, [(lora, 1.0, "style")]), torch.float32,
                       gguf_in_memory=True, log=lambda m: None)  # fmt: skip
    assert str(refused.value) == (
        "--gguf-in-memory cannot fuse the 1 LoRA(s) of this run into quantized weights "
        "(ComfyUI-GGUF patches them per call; not done here): run without the LoRAs, or "
        "without --gguf-in-memory (the DiT dequantized at load)"
    )
    safetensors = tmp_path / "dit.safetensors"
    save_file(tiny_dit_weights(), str(safetensors))
    plain = ModelFiles(transformer=safetensors, text_encoder=gguf_dit, vae=gguf_dit)
    with pytest.raises(InputError, match=r"keeps a GGUF DiT quantized; .*dit\.safetensors is not"):
        load_fused_dit(ModelSources(plain, []), torch.float32, gguf_in_memory=True,
                       log=lambda m: None)  # fmt: skip
    logged: list[str] = []
    dit = load_fused_dit(ModelSources(files, []), torch.float32, gguf_in_memory=True,
                         log=logged.append)  # fmt: skip
    assert sum(isinstance(m, GGUFLinear) for m in dit.modules()) == 34
    assert logged[-1].startswith("kept 34 Linear weights quantized in memory (")
