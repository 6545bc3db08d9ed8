"""DeepLesion import: the public dataset's layout → radnet's lesion dataset (build.py)."""
