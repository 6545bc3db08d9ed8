"""The phantom PACS (``python -m data_prep.phantoms``): a synthetic hospital archive with
ground truth, so every stage runs in the tests and the demo.

pacs (generate, reference_volume: the archive and its truth), protocols (which studies
and series a patient gets, truth rows), anatomy (tissue labels), physics (CT numbers,
MR signal), render (sampling the labels on a slice grid), dicom_files (DICOM writing
from pydicom's bundled files), enhanced (Enhanced MR objects), lits (LiTS-format NIfTI
cases), check (``python -m data_prep.phantoms.check``: an index against the truth),
volume_synth (small hand-made series and index folders for the volume builder's tests).
"""
