"""Datasets: raw sources -> data.h5 (prepare), and data.h5 -> training batches and eval images.

Readers, one per source kind: cifar (python-version tarball or folder), lmdb_images (LSUN),
image_folder (FFHQ and any folder of images), idx (Fashion-MNIST), arrays (.npz or HDF5 files).
sources picks the reader named by each config entry's `kind`, and its default places; hdf5
writes and reads data.h5; loader feeds training.
"""
