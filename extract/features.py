"""Deprecated location of the HDF5 feature contract (schema v1).

The schema, :class:`ShardWriter`, :class:`FeatureStore` and the header checks now live
in :mod:`msvse.features`, below both stages: ``msvse.extract`` writes shards and
``msvse.train`` reads them, and neither imports the other. The names stay importable
from here for one release (removed in 0.3); import them from ``msvse.features``.
"""

from msvse.features import *  # noqa: F401,F403
from msvse.features import __all__  # noqa: F401
