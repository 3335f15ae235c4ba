"""Micro-batching on the reference workflow (issue 14): ``runtime.batch.run_batch`` samples two
requests of ``zimage-121101`` side by side on the tiny model — captions of different lengths,
their own seeds, the second with EasyCache pushed to its threshold limit so that it skips calls
the first makes — and each image is compared with the same request run alone (the first with
the stored image of tests/test_pixel_identity.py, which is that request run alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zimage_trt.runtime.batch import run_batch
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import GenerateRequest, Generation

REFERENCE = Path(__file__).parent / "data" / "reference_images.npz"


def test_a_batch_gives_each_request_its_own_image(reference_pipeline: Pipeline) -> None:
    pipe = reference_pipeline
    harbour = "a quiet harbour at night, many small boats, lanterns on the water"
    requests = [GenerateRequest(prompt="a red fox in snow"),
                GenerateRequest(prompt=harbour, seed=[5, 6, 7])]  # fmt: skip
    workflows = [pipe.request_workflow(r) for r in requests]
    for stage in workflows[1].stages[1:]:  # the most skipping EasyCache allows
        assert stage.cache is not None
        stage.cache.threshold = 3.0
    batched, sizes = run_batch(pipe, workflows)
    assert all(isinstance(g, Generation) for g in batched), batched
    first, second = (g for g in batched if isinstance(g, Generation))
    alone = pipe.run(workflows[1].model_copy(deep=True))
    stored = np.load(REFERENCE)

    # the base stage (cfg 2, cond and uncond calls) wholly batched; an item skipping a call or
    # finished leaves it, so every call each item makes is in exactly one engine call
    assert [(s.model_calls, s.calls_skipped) for s in first.stages] == [(18, 0), (16, 0), (31, 0)]
    assert [(s.model_calls, s.calls_skipped) for s in second.stages] == [(18, 0), (7, 9), (22, 9)]
    assert [s.calls_skipped for s in alone.stages] == [0, 9, 9]
    assert sizes[:18] == [2] * 18 and set(sizes) == {1, 2} and sum(sizes) == 65 + 47
    for name, got, image, latent in (
        ("first", first, stored["final"], stored["latent"]),
        ("second", second, alone.image, alone.latent.numpy()),
    ):
        pixels = int(np.abs(got.image.astype(int) - image.astype(int)).max())
        delta = float(np.abs(got.latent.numpy() - latent).max())
        print(f"{name}: batched vs alone max |Δ| {pixels}/255, latent {delta:.2g}")
        assert pixels <= 2 and delta <= 1e-4, name  # measured: 1/255, 5.7e-6
