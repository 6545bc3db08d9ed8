"""radnet: medical-domain 3D pretraining from DICOM metadata labels (3D-RADNet and beyond).

Importing the package has no side effects; submodules are imported on use.
"""

__version__ = "0.1.0"
