"""Test-model helpers for pyadaq (not part of the installed ``pyadaq`` package).

``models.tiny`` writes tiny random-weight GGUF models that llama.cpp can load.
Import it from tests after putting the repository root on ``sys.path``::

    sys.path.insert(0, str(repo_root))
    from models.tiny import make_tiny_model
"""
