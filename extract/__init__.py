"""Stage 1: frozen visual models (ResNet grids, Mask R-CNN labels, captions) into HDF5 shards."""
