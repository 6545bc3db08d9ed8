"""Weights that leave radnet and weights that come in (docs/interop.md).

    python -m radnet.export --workdir=RUN --out=model.safetensors          # a run → one file
    python -m radnet.interop.convert --from=monai --arch=resnet50 --in=monai.safetensors --out=r50.safetensors
    python -m radnet.interop.convert --to=monai --in=r50.safetensors --out=monai.safetensors

Modules: ``weightsfile`` (the radnet weights file: safetensors + a JSON model card),
``names`` (the MONAI / MedicalNet ↔ radnet name and layout map), ``convert`` (the command
line), ``torch_reference`` (a PyTorch module for the default ``radnet`` variant; needs torch).
``weightsfile``, ``names`` and ``torch_reference`` import neither JAX nor Flax, so a PyTorch
environment can read radnet files with numpy and safetensors alone. Importing this package
imports nothing.
"""
