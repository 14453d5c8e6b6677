"""Stage 2: the MSVSE network, training, scoring and prediction from HDF5 shards."""
