"""ComfyUI's per-block merge rule for Flux and SD3, re-implemented from its node definitions, so tests
can check blockmerge's block of a key against an independent reading of ComfyUI.

ModelMergeFlux1 / ModelMergeSD3_2B / ModelMergeSD35_Large (comfy_extras/nodes_model_merging_model_specific.py)
declare one ratio per key prefix, in this order; ModelMergeBlocks.merge gives each diffusion-model
key (``diffusion_model.`` removed) the ratio of the longest argument it starts with, and a key no
argument matches the ratio of the first argument.
"""

from __future__ import annotations


def comfy_args(arch: str) -> list[str]:
    """The node's ratio names, in the node's order."""
    if arch == "FLUX":
        return (["img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in."]
                + [f"double_blocks.{i}." for i in range(19)] + [f"single_blocks.{i}." for i in range(38)]
                + ["final_layer."])
    n = 24 if arch == "SD3" else 38
    return (["pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder."]
            + [f"joint_blocks.{i}." for i in range(n)] + ["final_layer."])


def comfy_ratio_name(k_unet: str, args: list[str]) -> str:
    """The argument whose ratio ModelMergeBlocks.merge applies to ``k_unet``."""
    chosen, size = args[0], 0
    for arg in args:
        if k_unet.startswith(arg) and size < len(arg):
            chosen, size = arg, len(arg)
    return chosen


def our_id_for_comfy_arg(arg: str) -> str:
    """The blockmerge block id that stands for a ComfyUI ratio name."""
    if arg.startswith("double_blocks."):
        return f"D{int(arg.split('.')[1]):02d}"
    if arg.startswith("single_blocks."):
        return f"S{int(arg.split('.')[1]):02d}"
    if arg.startswith("joint_blocks."):
        return f"J{int(arg.split('.')[1]):02d}"
    return "OUT" if arg == "final_layer." else "IN"
