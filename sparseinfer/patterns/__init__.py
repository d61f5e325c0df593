"""Pre-filling patterns: each estimates indices for one `sparseinfer.ops` function."""
from .ashape import AShape
from .base import Pattern, Selection, resolve_budget
from .block_sparse import BlockSparse
from .flexprefill import FlexPrefill
from .vertical_slash import VerticalSlash
from .xattention import XAttention

PATTERNS: dict[str, type[Pattern]] = {p.name: p for p in (AShape, VerticalSlash, BlockSparse, XAttention, FlexPrefill)}

__all__ = ["PATTERNS", "Pattern", "Selection", "AShape", "VerticalSlash", "BlockSparse", "XAttention", "FlexPrefill", "resolve_budget"]
