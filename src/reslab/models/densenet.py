"""DenseNet (Huang et al. 2017) — being written."""
