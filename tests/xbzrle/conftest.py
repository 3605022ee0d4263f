"""XBZRLE tests: make ``strategies.py`` importable as ``xbzrle_strategies``.

The test folders have no ``__init__.py`` and more than one owns a
``strategies.py``, so the helpers are loaded under a name of their own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "xbzrle_strategies"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("strategies.py"))
    assert _spec is not None and _spec.loader is not None
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)
