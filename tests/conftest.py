"""The suite runs on the CPU even on a machine with a GPU (actmerge's default device is cuda when
present): tolerances are the CPU's and results reproducible. ACTMERGE_TEST_GPU=1 keeps the GPU visible."""

import os

if not os.environ.get("ACTMERGE_TEST_GPU"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first asks CUDA for its devices
