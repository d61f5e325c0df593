"""Pre-filling patterns: each estimates indices for one `sparseinfer.ops` function."""
from .ashape import AShape
from .base import Pattern, Selection, resolve_budget
from .block_sparse import BlockSparse
from .vertical_slash import VerticalSlash

PATTERNS: dict[str, type[Pattern]] = {p.name: p for p in (AShape, VerticalSlash, BlockSparse)}

__all__ = ["PATTERNS", "Pattern", "Selection", "AShape", "VerticalSlash", "BlockSparse", "resolve_budget"]
