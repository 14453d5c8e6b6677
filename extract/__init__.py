"""Stage 1: frozen visual models (ResNet grids, Mask R-CNN labels, captions) into HDF5 shards.

- :func:`msvse.extract.run.extract`: a folder of images into one shard (``msvse-extract``);
- :func:`msvse.extract.run.extract_in_memory`: features of a few images, no file;
- shards follow the schema of :mod:`msvse.features` (schema v1), which stage 2 reads;
- :class:`msvse.extract.config.ExtractConfig`: the ``extract`` section of ``params.yaml``.
"""
