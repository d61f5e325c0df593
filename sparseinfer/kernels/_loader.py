"""Loading a Triton kernel file compiled or under the interpreter.

CUDA tensors run the compiled kernel; CPU tensors run the same kernel under the Triton
interpreter: a second copy of the kernel module, loaded with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading

_HERE = os.path.dirname(os.path.abspath(__file__))
_modules: dict[tuple[str, bool], object] = {}
_lock = threading.RLock()  # a kernel file may load another (shared @triton.jit helpers)


def _fix_interpreter_index() -> None:
    """triton 3.6's interpreter turns a scalar tensor into a Python int with int(array of
    shape (1,)), which numpy >= 2.4 refuses; `range(loaded_scalar)` then fails. Patch that
    one conversion (interpreter only) to read the single element."""
    from triton.runtime import interpreter as _interp

    orig = _interp._patch_lang_tensor
    if getattr(orig, "_sparseinfer_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparseinfer_fixed = True
    _interp._patch_lang_tensor = patched


def kernel_module(filename: str, interpret: bool):
    """The module of `sparseinfer/kernels/<filename>`, compiled (interpret=False) or interpreted (True)."""
    key = (filename, interpret)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        if key in _modules:
            return _modules[key]
        if interpret:
            _fix_interpreter_index()
        name = "sparseinfer.kernels." + filename.removesuffix(".py") + ("_interp" if interpret else "")
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, filename))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        _modules[key] = mod
        return mod
