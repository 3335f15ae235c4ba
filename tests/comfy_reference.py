"""The reference numbers of comfyui-semantics.md §16, written down once for the tests.

ComfyUI computed them with its own functions on CPU. Sigmas are printed with 9 significant
digits, which round-trips float32. Everything here is plain Python; tests wrap with torch.tensor.
"""

from __future__ import annotations

# ---- seeds (§16 noise checksums; §1 pseudocode) ----------------------------------------------

STAGE1_SEED = 905124181980574
STAGE2_SEED = 182450993364532
STAGE3_SEED = 894355038471848

# ---- sigma schedules --------------------------------------------------------------------------

# §16 stage 1 sigmas: custom FlowMatchEuler node, 9 steps, shift 3, no dynamic shifting.
STAGE1_SIGMAS = [1.0, 0.954693854, 0.900359094, 0.833998024, 0.751121104, 0.644686282,
                 0.50298506, 0.305008948, 0.00892857183, 0.0]  # fmt: skip
# §16 stage 1 with use_dynamic_shifting="enable" (mu = 0).
STAGE1_SIGMAS_DYNAMIC = [1.0, 0.875125, 0.75025, 0.625375, 0.5005, 0.375625, 0.25075, 0.125875,
                         0.001, 0.0]  # fmt: skip
# §16 stage 2 sigmas: 22-step linear FlowMatch schedule, last 17 (16 steps, denoise 0.7).
STAGE2_SIGMAS = [0.714571416, 0.666999996, 0.619428575, 0.571857154, 0.524285734, 0.476714283,
                 0.429142863, 0.381571442, 0.333999991, 0.286428571, 0.23885715, 0.191285715,
                 0.143714279, 0.0961428583, 0.0485714301, 0.00100000005, 0.0]  # fmt: skip
# §16 stage 3 sigmas: 26-step beta schedule at shift 7, last 17 (16 steps, denoise 0.6).
STAGE3_SIGMAS = [0.930881143, 0.915012956, 0.896854758, 0.875436842, 0.849809885, 0.820474803,
                 0.785153687, 0.742732584, 0.693181872, 0.633455217, 0.564049602, 0.478773564,
                 0.381561249, 0.273353755, 0.162650615, 0.0597722903, 0.0]  # fmt: skip
# §16 beta ppf table indices for 26 steps (alpha = beta = 0.6).
BETA_INDICES_26 = [999, 991, 973, 949, 919, 884, 844, 802, 756, 708, 657, 605, 553, 500, 446,
                   394, 342, 291, 243, 197, 155, 115, 80, 50, 26, 8]  # fmt: skip
# §16 dpmpp_sde midpoint σ1 per stage-3 step (r = 1/2); the last step goes to 0 with none.
STAGE3_MIDPOINTS = [0.92332256, 0.90632766, 0.88658601, 0.86312729, 0.83566755, 0.80341268,
                    0.76460385, 0.71862036, 0.66397363, 0.59925002, 0.52156872, 0.42948768,
                    0.32512894, 0.21279573, 0.10001045]  # fmt: skip

# ---- Euler-ancestral-RF coefficients, eta 1: (sigma_down, α_next/α_down, renoise) -------------

# §16 stage 1 table, one row per step σ_i → σ_i+1 (the last step, to 0, has none).
STAGE1_EA_COEFFICIENTS = [
    (0.91144035, 0.51158906, 0.83307898),
    (0.84911670, 0.66038394, 0.70442441),
    (0.77252810, 0.72976917, 0.61458869),
    (0.67647991, 0.76928422, 0.54162830),
    (0.55333341, 0.79547861, 0.47103638),
    (0.39242959, 0.81803677, 0.38721952),
    (0.18495670, 0.85270446, 0.26106884),
    (0.00026137, 0.99133053, 0.00892481),
]
# §16 stage 2, first step 0.714571 → 0.667.
STAGE2_FIRST_EA_COEFFICIENTS = (0.62259556, 0.88234258, 0.37830111)

# ---- noise checksums (CPU, float32) -----------------------------------------------------------

# §16 initial noise (prepare_noise): shape, seed, first six values, sum.
INITIAL_NOISE = [
    (
        (1, 16, 28, 22),
        STAGE1_SEED,
        [0.3623764, -0.5754872, 1.1528263, 0.2605728, -0.7819521, 1.3729424],
        -86.052745,
    ),
    (
        (1, 16, 54, 42),
        STAGE2_SEED,
        [2.2608187, 0.3004878, -0.3708425, 0.7733823, 1.2257245, 1.1216058],
        125.968293,
    ),
    (
        (1, 16, 108, 84),
        STAGE3_SEED,
        [1.2404746, -0.5303831, 1.4364955, 0.1722028, -0.5025685, 0.2269332],
        -388.471570,
    ),
]
# §16 ancestral noise, CPU variant (seed + 1), stage 1, first draw: first three values, sum.
ANCESTRAL_FIRST_DRAW = [-0.2646814, 0.9821804, 2.0374773]
ANCESTRAL_FIRST_DRAW_SUM = -92.326295
# §16 Brownian tree, stage 3 (torchsde 0.2.6): first call ns(σ0 → midpoint σ1), first 4 and sum.
BROWNIAN_FIRST_CALL = [-2.402406, -0.680422, 0.565156, -0.795890]
BROWNIAN_FIRST_CALL_SUM = 181.5714
# §16 Brownian tree, second call ns(σ0 → σ1 of the schedule), first 4 and sum.
BROWNIAN_SECOND_CALL = [-2.575469, -1.107076, -0.593200, -0.476963]
BROWNIAN_SECOND_CALL_SUM = 393.9002

# ---- nearest-exact source indices -------------------------------------------------------------

# §16 LatentUpscale stage 1 → 2, width 22 → 42.
W_22_TO_42 = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
              13, 14, 14, 15, 15, 16, 17, 17, 18, 18, 19, 19, 20, 20, 21, 21]  # fmt: skip
# §16 LatentUpscale stage 1 → 2, height 28 → 54.
H_28_TO_54 = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
              13, 14, 14, 15, 15, 16, 16, 17, 17, 18, 18, 19, 19, 20, 21, 21, 22, 22, 23, 23, 24,
              24, 25, 25, 26, 26, 27, 27]  # fmt: skip

# ---- EasyCache window thresholds, (start σ, end σ) --------------------------------------------

# §16 / §9.4 stage 2: percents 0.45 / 0.95 through shift 3 (ModelSamplingAuraFlow not honoured).
STAGE2_EASYCACHE_WINDOW = (0.785714, 0.136364)
# §9.4 stage 2 if the AuraFlow shift 7 were honoured.
STAGE2_EASYCACHE_WINDOW_SHIFT7 = (0.895349, 0.269231)
# §16 / §9.4 stage 3: percents 0.7 / 0.95 through shift 7.
STAGE3_EASYCACHE_WINDOW = (0.75, 0.269231)

# ---- VAEDecodeTiled (comfy/sd.py decode_tiled_, comfy/utils.py tiled_scale_multidim) -------------
# ComfyUI's own functions run on CPU over test_vae_tiles.py's exact latent recipe and toy decoder
# (elementwise float32 only, so the bytes are the same on any machine): (latent shape, the node's
# tile_size, overlap in pixels) → (sha-256 of the float32 output before process_output, its
# float64 sum). 512/128 is VAE.decode's own fallback on out-of-memory (decode_tiled_'s defaults).
VAE_DECODE_TILED = {
    ((1, 16, 108, 84), 512, 128): (
        "52c46c105dfbb547d544b0213bdf90972fe4003deb2124deeefe721f6eadf1fc",
        -98179.33731269371,
    ),
    ((1, 16, 108, 84), 512, 64): (
        "faf68d9167197c55c07345b7428500ed3fcea6b9ac4c7a2511cfa7ce85d9c1da",
        -98143.46698729834,
    ),
    ((1, 16, 108, 84), 64, 16): (
        "f71cbba5e11029ca9c9c2dc4a1b4ea40b87759ae08ca89befc0d3764ab3bd23b",
        -92351.21506153782,
    ),
    ((2, 16, 54, 42), 256, 64): (
        "2be4197ad1e054eed622c52e1684c4e1cc598ef498eda02a53320f2f67b8e867",
        -15983.623783307114,
    ),
    ((1, 16, 28, 22), 512, 64): (
        "ecd9ddad1cfe9382fe3d05e3e67c5eb1c9a3cbccdad3e4976c57dcd7b193dda0",
        -606.4446601942182,
    ),
    ((1, 16, 3, 40), 64, 16): (
        "9605310bcfb552bb78c744074ac7d6e9d21464e31f3b3ce2c0abed7eb5b2b412",
        1956.2144873937068,
    ),
    ((1, 16, 2, 40), 64, 32): (
        "5c6877c6e010fdafaf74ed0483f9ade9473fed5cfc7cf3eaa98e21b151c32665",
        1266.7636737045832,
    ),
    ((1, 16, 37, 61), 96, 32): (
        "3c04a7c2533f2e7307ee23a7cf42ce0d1be14510e76813e2c811fe9282690e40",
        18226.581463412105,
    ),
}
