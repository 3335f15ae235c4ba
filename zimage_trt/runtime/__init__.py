"""Lean run time: schedules, samplers, noise, guidance, cache reuse.

Never imports diffusers or transformers.
"""
