"""The compiled torch backend: caption-length buckets are exact, a bucket compiles once, and the
reference workflow on compiled engines matches the eager pipeline."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from zimage_trt.engines.compiled import (
    CompileStats,
    ShapeKey,
    bucket_length,
    compile_stats,
    compiled_engines,
    torch_compiler,
)
from zimage_trt.engines.protocol import Engines
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import load_workflow

PROMPTS = {  # prompt → its token count in the chat template
    "a fox": 10,
    "a red fox in snow, " * 16: 105,
    "a red fox in snow, " * 40: 249,  # 256 caption slots: the bucket exactly
    "a red fox in snow, " * 48: 297,
}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    wf = load_workflow("zimage-121101")
    return Pipeline.open(
        model="tiny", workflow=wf, device="cpu", dtype="fp32", log=lambda msg: None
    )


def identity(module: torch.nn.Module) -> torch.nn.Module:
    return module


def ids_and_mask(pipe: Pipeline, prompt: str) -> tuple[Tensor, Tensor]:
    ids = torch.tensor([pipe.prompts.tokenizer.encode_prompt(prompt)])
    return ids, torch.ones_like(ids)


def max_delta(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return float((a.float() - b.float()).abs().max())


def test_padding_to_the_bucket_is_exact_for_every_engine(pipe: Pipeline) -> None:
    eager = pipe.engines
    padded = compiled_engines(eager, compiler=identity)
    latents = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    for prompt, tokens in PROMPTS.items():
        ids, mask = ids_and_mask(pipe, prompt)
        assert ids.shape[1] == tokens
        hidden = eager.text_encoder(input_ids=ids, attention_mask=mask)["hidden"]
        got = padded.text_encoder(input_ids=ids, attention_mask=mask)["hidden"]
        assert max_delta(got, hidden) <= 1e-5

        feats = {"cap_feats": hidden, "cap_mask": mask.bool()}
        ref = eager.caption_path(**feats)
        out = padded.caption_path(**feats)
        slots = -(-tokens // 32) * 32
        assert out["cap_tokens"].shape == (1, slots, 64)
        assert torch.equal(out["cap_valid"], ref["cap_valid"])
        assert max_delta(out["cap_tokens"], ref["cap_tokens"]) <= 1e-5

        cap = ref["cap_tokens"]
        call = {
            "latents": latents,
            "sigma": sigma,
            "cap_tokens": cap,
            "cap_valid": ref["cap_valid"],
        }
        assert max_delta(padded.denoiser(**call)["v"], eager.denoiser(**call)["v"]) <= 1e-5

    stats = compile_stats(padded)
    assert stats is not None
    # 10, 105 and 249 tokens share the 256 bucket; 297 takes 512
    assert [(r.engine, r.shapes, r.calls) for r in stats.report()] == [
        ("text_encoder", "1×256, 1×256", 3),
        ("caption_path", "1×256×32, 1×256", 3),
        ("denoiser", "1×16×12×10, 1, 1×256×64, 1×256", 3),
        ("text_encoder", "1×512, 1×512", 1),
        ("caption_path", "1×512×32, 1×512", 1),
        ("denoiser", "1×16×12×10, 1, 1×512×64, 1×512", 1),
    ]
    # the identity compiler compiles nothing: every key is reported as running eagerly
    assert {r.status for r in stats.report()} == {"not compiled (eager)"}


def test_a_bucket_compiles_once_for_prompts_of_different_lengths(pipe: Pipeline) -> None:
    engines = compiled_engines(pipe.engines, compiler=torch_compiler(backend="eager"))
    for prompt in list(PROMPTS)[:3]:  # 10, 105, 249 tokens: one bucket
        ids, mask = ids_and_mask(pipe, prompt)
        hidden = engines.text_encoder(input_ids=ids, attention_mask=mask)["hidden"]
        engines.caption_path(cap_feats=hidden, cap_mask=mask.bool())
    stats = compile_stats(engines)
    assert stats is not None
    assert [(r.engine, r.calls, r.graphs, r.status) for r in stats.report()] == [
        ("text_encoder", 3, 1, "compiled"),
        ("caption_path", 3, 1, "compiled"),
    ]
    assert stats.problems() == []
    assert stats.compile_seconds() == sum(r.compile_seconds for r in stats.report()) > 0


def test_the_inductor_backend_compiles_and_matches_eager(pipe: Pipeline) -> None:
    """The real path (inductor generating C++ on the CPU), on the smallest engine call."""
    engines = compiled_engines(pipe.engines, bucket=32)  # compiles on first call only
    feats = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 20, dtype=torch.bool)
    ref = pipe.engines.caption_path(cap_feats=feats, cap_mask=mask)
    for _ in range(2):
        out = engines.caption_path(cap_feats=feats, cap_mask=mask)
        assert max_delta(out["cap_tokens"], ref["cap_tokens"]) <= 1e-5
    stats = compile_stats(engines)
    assert stats is not None
    [row] = stats.report()
    assert (row.shapes, row.calls, row.status) == ("1×32×32, 1×32", 2, "compiled")


def test_the_reference_workflow_on_compiled_engines_matches_eager(pipe: Pipeline) -> None:
    wf = load_workflow("zimage-121101")
    wf.prompts.positive = "a red fox in snow"
    compiled = Pipeline(
        compiled_engines(pipe.engines, compiler=torch_compiler(backend="eager")),
        pipe.prompts.tokenizer,
    )
    assert compiled.engines.backend == "torch-compile"
    got = compiled.run(wf)
    ref = pipe.run(wf)
    assert [(s.model_calls, s.calls_skipped) for s in got.stages] == [
        (s.model_calls, s.calls_skipped) for s in ref.stages
    ]
    assert got.latent.shape == ref.latent.shape == (1, 16, 108, 84)
    delta = max_delta(got.latent, ref.latent)
    print(f"compiled (eager backend) vs eager, final latent max |Δ| = {delta:.3g}")
    assert delta <= 1e-4
    assert compiled.caption_path_calls == 2  # once per prompt, every step of every stage

    stats = compile_stats(compiled.engines)
    assert stats is not None
    assert stats.problems() == []
    # the positive prompt (17 tokens) and the Chinese negative (1,587) sit in different buckets,
    # so stage 1 (cfg 2) calls the denoiser at two caption lengths; stages 2-3 run at cfg 1
    denoiser = [(r.shapes, r.calls) for r in stats.report() if r.engine == "denoiser"]
    assert denoiser == [
        ("1×16×28×22, 1, 1×256×64, 1×256", 9),
        ("1×16×28×22, 1, 1×1792×64, 1×1792", 9),
        ("1×16×54×42, 1, 1×256×64, 1×256", got.stages[1].model_calls),
        ("1×16×108×84, 1, 1×256×64, 1×256", got.stages[2].model_calls),
    ]


def test_bad_buckets_and_backends_are_refused(pipe: Pipeline) -> None:
    with pytest.raises(ValueError) as err:
        compiled_engines(pipe.engines, bucket=100, compiler=identity)
    assert str(err.value) == "caption bucket must be a positive multiple of 32 tokens, got 100"
    onnx: Engines = replace(pipe.engines, backend="onnxruntime")
    with pytest.raises(ValueError) as err:
        compiled_engines(onnx)
    assert str(err.value) == (
        "only the eager torch engines can be compiled, got the onnxruntime backend"
    )
    assert [bucket_length(n, 256) for n in (1, 256, 257, 1587)] == [256, 256, 512, 1792]


def test_compile_stats_flag_recompiles_and_eager_calls() -> None:
    stats = CompileStats()
    latents: ShapeKey = (("latents", (1, 16, 8, 8), "float32"),)
    stats.record("vae_decoder", latents, 2.5, 1)
    stats.record("vae_decoder", latents, 0.0, 0)
    stats.record("denoiser", (("sigma", (1,), "float32"),), 4.0, 1)
    stats.record("denoiser", (("sigma", (1,), "float32"),), 0.0, 1)  # a guard failed: recompiled
    stats.record("vae_encoder", (("image", (1, 3, 64, 64), "float32"),), 0.25, 0)
    assert [r.status for r in stats.problems()] == ["recompiled 1×", "not compiled (eager)"]
    assert stats.compile_seconds() == 6.75
    assert stats.compile_seconds("denoiser") == 4.0
    assert stats.table() == (
        "engine       input shapes  compile s  calls  status\n"
        "vae_decoder  1×16×8×8           2.50      2  compiled\n"
        "denoiser     1                  4.00      2  recompiled 1×\n"
        "vae_encoder  1×3×64×64          0.25      1  not compiled (eager)"
    )


def test_open_compiles_on_request() -> None:
    wf = load_workflow("zimage-121101")
    cpu, fp32 = torch.device("cpu"), torch.float32
    pipe = Pipeline.open(model="tiny", workflow=wf, device=cpu, dtype=fp32, compile=True, log=print)
    stats = compile_stats(pipe.engines)
    assert pipe.engines.backend == "torch-compile"
    assert stats is not None and stats.report() == []  # nothing compiles before the first call


def test_regional_compilation_compiles_each_stack_once_and_matches_eager() -> None:
    """scope="regional": the repeated blocks are compiled in place (shared graphs), the VAE whole;
    the reference workflow's denoiser calls equal eager's."""
    from zimage_trt.engines.compiled import repeated_blocks

    wf = load_workflow("zimage-121101")
    eager = Pipeline.open(model="tiny", workflow=wf, device="cpu", dtype="fp32",
                          log=lambda msg: None)  # fmt: skip
    dit = eager.engines.denoiser.module  # type: ignore[attr-defined]
    assert len(repeated_blocks(dit)) == 2 + 2 + 2  # noise refiner, context refiner, layers
    engines = compiled_engines(eager.engines, scope="regional", backend="eager")
    lat = torch.randn(1, 16, 28, 22)
    tok = torch.randn(1, 64, 64)
    valid = torch.ones(1, 64, dtype=torch.bool)
    for sigma in (0.9, 0.5):
        s = torch.tensor([sigma])
        got = engines.denoiser(latents=lat, sigma=s, cap_tokens=tok, cap_valid=valid)["v"]
        ref = eager.engines.denoiser(latents=lat, sigma=s, cap_tokens=tok, cap_valid=valid)["v"]
        assert float((got - ref).abs().max()) < 1e-5
    stats = compile_stats(engines)
    assert stats is not None
    rows = stats.report()
    assert [(r.engine, r.calls, r.status) for r in rows] == [("denoiser", 2, "compiled")]
    assert rows[0].first_graphs >= 1 and rows[0].graphs == rows[0].first_graphs
    with pytest.raises(ValueError, match="compile scope 'partial' is not one of: whole, regional"):
        compiled_engines(eager.engines, scope="partial")


def test_regional_cuda_graphs_stay_on_the_denoisers_own_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA the denoiser compiles with CUDA graphs, whose outputs the next replay overwrites.
    The denoiser module also holds the caption path's refiner blocks: those must be compiled
    once, with the caption path's options, or the cached caption features would live in the
    denoiser's graph pool. (Recorded here with the CUDA defaults forced: nothing is run.)"""
    from zimage_trt.engines import compiled

    wf = load_workflow("zimage-121101")
    eager = Pipeline.open(model="tiny", workflow=wf, device="cpu", dtype="fp32",
                          log=lambda msg: None)  # fmt: skip
    dit = eager.engines.denoiser.module  # type: ignore[attr-defined]
    names = {id(b): f"{stack}.{i}" for stack in ("noise_refiner", "context_refiner", "layers")
             for i, b in enumerate(getattr(dit, stack))}  # fmt: skip
    calls: list[tuple[str, str | None]] = []

    def record(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        if id(self) in names:
            calls.append((names[id(self)], kwargs.get("mode")))  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.Module, "compile", record)

    def cuda_default(engine: str, device: torch.device) -> str | None:
        return "reduce-overhead" if engine == "denoiser" else None

    monkeypatch.setattr(compiled, "default_mode", cuda_default)
    compiled_engines(eager.engines, scope="regional", backend="inductor")
    assert sorted(calls) == [
        ("context_refiner.0", None), ("context_refiner.1", None),
        ("layers.0", "reduce-overhead"), ("layers.1", "reduce-overhead"),
        ("noise_refiner.0", "reduce-overhead"), ("noise_refiner.1", "reduce-overhead"),
    ]  # fmt: skip
