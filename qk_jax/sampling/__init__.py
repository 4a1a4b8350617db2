"""Sampling a trained Query-Kontext checkpoint: ``Sampler.from_checkpoint(dir).sample([Request(...)])``.

``sampler`` holds the design (guidance branches, the compiled loop, noise and output); see its docstring.
"""

from qk_jax.sampling.sampler import (
    BRANCHES,
    Prepared,
    Request,
    Sampler,
    check_params,
    generate,
    guidance_weights,
    image_grid,
    infer_task,
    parse_size,
    read_image,
    reconstruct,
    task_roles,
    trained_tasks,
)

__all__ = ["BRANCHES", "Prepared", "Request", "Sampler", "check_params", "generate", "guidance_weights", "image_grid",
           "infer_task", "parse_size", "read_image", "reconstruct", "task_roles", "trained_tasks"]
