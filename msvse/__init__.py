"""msvse: multi-scale visual semantic enhancement for multimodal NER.

The package is split the way the pipeline is:

- ``msvse.pipeline``: demo data and tiny offline models (stage 0),
- ``msvse.extract``: frozen visual models into HDF5 shards (stage 1),
- ``msvse.train``: the MSVSE network, training, scoring and prediction (stage 2).

Shared pieces live directly under ``msvse``: typed configs, the Twitter data format,
atomic file writes, and ``msvse.features``, the HDF5 feature schema that stage 1 writes
and stage 2 reads (so neither stage imports the other).
"""

__version__ = "0.1.0"
