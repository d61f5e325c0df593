"""Triton kernels for sparse pre-filling attention (one kernel over ranges + columns).

Raises ImportError when triton is missing, so `sparseinfer.ops` falls back to the torch
reference. CUDA tensors run compiled kernels; CPU tensors run the same kernels under the
Triton interpreter. Callers (sparseinfer.ops) validate the arguments first.

    vertical_slash_attention(q, k, v, vertical_idx, slash_idx, scale) -> like q
    block_sparse_attention(q, k, v, block_idx, block_size, scale) -> like q
    ashape_attention(q, k, v, sink, window, scale) -> like q
Other kernels live in their own modules: ``decode`` (sparse decoding), ``gemv`` (contextual
sparsity), ``pool`` (the learned gate's RoPE-undo + block pooling), ``gate`` (the learned gate's
threshold selection: scores, softmax and kept blocks in one launch), ``lastq`` (MInference / MMInference
estimation: column and diagonal sums of the last queries' softmax), ``runs`` (vertical-slash indices: the slash
offsets' runs, grouped ranges and tile cap in one launch).
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"sparseinfer.kernels needs triton: {e}") from e

from .attention import ashape_attention, block_sparse_attention, vertical_slash_attention

__all__ = ["vertical_slash_attention", "block_sparse_attention", "ashape_attention"]
