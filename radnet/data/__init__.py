"""Input pipelines: the TensorStore dataset, Grain sources and augmentation."""
