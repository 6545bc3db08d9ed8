"""LiTS import (``python -m data_prep.lits``): build.py finds the cases and writes the
dataset with the library's case preparation (radnet.data.lits)."""
