"""Input and output: checkpoints, image folders, the HDF5 activation store."""
