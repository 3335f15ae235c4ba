"""ComfyUI's sampling math alone, pinned to ComfyUI's own numbers: model sampling
(``model_sampling``), schedules (``schedules``), samplers (``samplers``), noise (``noise``), the
CFG guider (``guider``), EasyCache (``easycache``), latent ops (``latents``) and one stage's loop
(``stage``). It imports torch, numpy, scipy, torchsde and itself — nothing else of the package."""
