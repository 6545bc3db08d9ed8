"""DICOM reading for the library: raw element values (values), the per-file header
record (headers) and the one geometry module (geometry: slice normal, orientation
groups, positions along the normal)."""
