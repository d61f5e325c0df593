"""Contextual sparsity in decoding (Deja Vu, TEAL) for Llama-family (SwiGLU, GQA) models.

    attach(model, mlp="teal" | "dejavu" | None, mlp_sparsity=0.5, heads="dejavu" | None, ...)
    detach(model)
    teal.calibrate(model, tok) -> Thresholds        (|x| quantiles per layer / projection input)
    dejavu.train_for_model(model, tok) -> Predictors (low-rank MLP + head predictors, recall report)
    allocation.allocate(model, tok, "teal", 0.5) -> Allocation (per-layer MLP sparsities, mean 0.5)

`sparseinfer.patch(model, method, mlp=..., heads=...)` calls `attach` for you.
"""
from .patching import ContextualHandle, attach, detach, shipped

__all__ = ["attach", "detach", "shipped", "ContextualHandle"]
