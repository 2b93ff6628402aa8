"""TokSearch's ``toksearch.signal`` path: ``from toksearch_launch.signal import Signal``.

The implementations live in :mod:`toksearch_launch.signals`; this package only
gives TokSearch's import paths (``signal.signal``, ``signal.mds``, ``signal.zarr``,
``signal.mock_signal``) so that porting a script is one substitution.
"""

from toksearch_launch.signals.base import Signal

__all__ = ["Signal"]
