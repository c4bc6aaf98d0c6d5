"""A hint for `import llama_cpp` before `import pyadaq` (installed with pyadaq, imported at
interpreter start-up by pyadaq-llama-cpp-hint.pth).

In an environment where llama-cpp-python's Python layer was installed without libraries of its
own (pyadaq provides them; `make` installs it that way), importing llama_cpp first fails with
"Shared library with base name 'llama' not found", which does not say that pyadaq is the
answer. This finder wraps only the loading of ``llama_cpp.llama_cpp``, and only while pyadaq is
not imported and LLAMA_CPP_LIB_PATH is not set: when that loading fails, the error says what to
do. It changes nothing else (a llama_cpp that finds its libraries loads as usual).
"""

import importlib.machinery
import os
import sys

_MODULE = "llama_cpp.llama_cpp"
_HINT = ("pyadaq: in this environment llama-cpp-python's libraries come from pyadaq: `import pyadaq` before "
         "`import llama_cpp` (pyadaq points llama_cpp at its libraries), or set LLAMA_CPP_LIB_PATH")


class _Loader:
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        try:
            self.real.exec_module(module)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"{e}\n{_HINT}") from e


class LlamaCppHint:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != _MODULE or "pyadaq._native" in sys.modules or os.environ.get("LLAMA_CPP_LIB_PATH"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install():
    if not any(isinstance(f, type) and f.__name__ == "LlamaCppHint" for f in sys.meta_path):
        sys.meta_path.insert(0, LlamaCppHint)
