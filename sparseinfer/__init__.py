"""sparseinfer: fast long-context inference by computing only the attention that matters."""
from .integration import patch, unpatch
from .kv import kv_cache
from .models import DEFAULT_MODEL, load_model
from . import shadow
from .monitor import record

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "kv_cache", "load_model", "DEFAULT_MODEL", "record", "__version__"]
