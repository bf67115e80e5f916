"""Moved to ``tests/lukslib.py`` (test modules do not import test modules).

Kept only so that modules not yet switched keep importing; no tests here.
Remove once nothing imports ``tests.test_passphrase_helpers``.
"""

from tests.lukslib import *  # noqa: F403
from tests.lukslib import __all__  # noqa: F401
