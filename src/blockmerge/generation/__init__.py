"""Offline generation: diffusers pipelines from single-file checkpoints, prompts, samplers, infotext.

Kept import-free on purpose: ``import blockmerge.generation`` must not pull in torch, diffusers or
transformers; import the submodule you need (``blockmerge.generation.tokenizer`` ...).
"""
