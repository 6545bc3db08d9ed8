"""Lesion detection: boxes and NMS (``boxes``), decoding of the dense head (``decode``) and
FROC evaluation by the DeepLesion protocol (``froc``; docs/lesions.md).

    import radnet.detection
    result = radnet.detection.froc(predictions, ground_truth, fps_per_image=(0.5, 1, 2, 4, 8, 16))
"""

from radnet.detection.froc import DEFAULT_FPS, format_table, plot_froc, size_bin
from radnet.detection.froc import froc  # noqa: E402  (the function shadows the module name)

__all__ = ["froc", "DEFAULT_FPS", "format_table", "plot_froc", "size_bin"]
