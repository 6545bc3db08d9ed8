"""radnet.interop without PyTorch: MONAI / MedicalNet state dicts made by PyTorch
(tools/make_interop_fixtures.py) convert to radnet weights whose JAX encoder computes what
MONAI computed; radnet's own files reproduce what PyTorch (MONAI, the reference module)
computed from them. Tolerance: the largest absolute difference ≤ 1e-4 × the largest value."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from radnet import labels, pretrained
from radnet.interop import convert, names, weightsfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "interop")
RTOL = 1e-4


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def outputs():
    tensors, metadata = weightsfile.read_safetensors(fixture("outputs.safetensors"))
    return tensors, metadata


def _close(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = np.abs(expected).max()
    assert scale > 1e-3, what                                  # a signal, not all zeros
    error = np.abs(actual - expected).max() / scale
    assert error <= RTOL, f"{what}: relative error {error:.2e} > {RTOL}"
    return error


def _jax_input(outputs):
    return np.transpose(outputs[0]["input"], (0, 2, 3, 4, 1))   # [B, 1, D, H, W] → [B, D, H, W, 1]


def _embedding(path, x):
    encoder, variables = pretrained.load(path).encoder()
    return np.asarray(encoder.apply(variables, x, train=False)[0])


# ----------------------------------------------------------------------------- MONAI → radnet

@pytest.mark.parametrize("name,args", [
    ("monai_resnet10_default", {}),                                       # MONAI's defaults
    ("monai_resnet10_medicalnet", dict(conv1_t_stride=2, bias_downsample=False)),
])
def test_monai_resnet10_converts_and_computes_what_monai_computed(name, args, outputs, tmp_path):
    out = str(tmp_path / f"{name}.safetensors")
    card, unused = convert.convert_from("monai", fixture(f"{name}.safetensors"), out,
                                        "resnet10", **args)
    assert unused and all(k.endswith("num_batches_tracked") for k in unused)
    p = pretrained.load(out)
    model = p.config.model
    assert (model.variant, model.depth, model.width) == ("medicalnet", 10, 6)
    assert model.stem_stride == args.get("conv1_t_stride", 1)
    assert model.shortcut_bias == args.get("bias_downsample", True)
    assert ("shortcut_conv" in p.variables["params"]["block2"]["unit1"])
    assert ("bias" in p.variables["params"]["block2"]["unit1"]["shortcut_conv"]) == \
        args.get("bias_downsample", True)
    _close(_embedding(out, _jax_input(outputs)), outputs[0][f"{name}.embedding"], name)
    # The arguments that rebuild the MONAI model travel in the card.
    assert card["source"]["monai_args"]["conv1_t_stride"] == model.stem_stride


def test_the_stem_stride_matters_so_a_wrong_one_is_visible(outputs, tmp_path):
    """conv1_t_stride leaves no trace in the weights: the wrong one converts but computes
    something else (docs/interop.md tells users to pass it)."""
    out = str(tmp_path / "wrong.safetensors")
    convert.convert_from("monai", fixture("monai_resnet10_default.safetensors"), out, "resnet10",
                         conv1_t_stride=2)
    got = _embedding(out, _jax_input(outputs))
    want = outputs[0]["monai_resnet10_default.embedding"]
    assert np.abs(got - want).max() > 10 * RTOL * np.abs(want).max()


def test_medicalnet_checkpoint_imports_its_encoder_and_names_every_unused_key(outputs, tmp_path):
    source = fixture("medicalnet_resnet18_checkpoint.safetensors")
    state, _ = weightsfile.read_safetensors(source)
    assert any(k.startswith("module.conv_seg.") for k in state)
    out = str(tmp_path / "r18.safetensors")
    card, unused = convert.convert_from("medicalnet", source, out, "resnet18")  # shortcut A
    expected_unused = {k[len("module."):] for k in state
                       if k.startswith("module.conv_seg.") or k.endswith("num_batches_tracked")}
    assert set(unused) == expected_unused
    message = convert.unused_message(source, unused)
    assert "\n" not in message and all(k in message for k in expected_unused)
    assert "conv_seg.0.weight" in message and f"{len(unused)} key(s) not used" in message
    p = pretrained.load(out)
    assert p.config.model.shortcut_type == "A" and p.config.model.stem_stride == 2
    assert "shortcut_conv" not in p.variables["params"]["block2"]["unit1"]
    _close(_embedding(out, _jax_input(outputs)),
           outputs[0]["medicalnet_resnet18_checkpoint.embedding"], "medicalnet resnet18")
    assert card["source"]["unused_keys"] == unused


def test_weights_that_do_not_fit_stop_with_every_key_named_and_a_hint(tmp_path):
    source = fixture("monai_resnet10_default.safetensors")
    out = str(tmp_path / "x.safetensors")
    with pytest.raises(convert.ConversionError) as e:            # the biases are there
        convert.convert_from("monai", source, out, "resnet10", bias_downsample=False)
    text = str(e.value)
    assert "unexpected layer2.0.downsample.0.bias" in text and "--bias_downsample=true" in text
    assert "3 problem(s)" in text and not os.path.exists(out)
    with pytest.raises(convert.ConversionError) as e:            # resnet18 has two units
        convert.convert_from("monai", source, out, "resnet18")
    assert "missing layer1.1.conv1.weight (6, 6, 3, 3, 3)" in str(e.value)
    assert "another --arch" in str(e.value)
    with pytest.raises(convert.ConversionError, match="missing layer2.0.downsample.0.weight.*--shortcut_type=A"):
        convert.convert_from("medicalnet", fixture("medicalnet_resnet18_checkpoint.safetensors"),
                             out, "resnet18", shortcut_type="B")
    # A MedicalNet checkpoint read as MONAI's: its module. prefix fits nothing.
    with pytest.raises(convert.ConversionError, match="no conv1.weight"):
        convert.convert_from("monai", fixture("medicalnet_resnet18_checkpoint.safetensors"),
                             out, "resnet18")
    with pytest.raises(ValueError, match="PyTorch is not installed|install torch"):
        pt = tmp_path / "w.pth"
        pt.write_bytes(b"\0")
        try:
            import torch  # noqa: F401
            pytest.skip("torch is installed here")
        except ImportError:
            convert.convert_from("monai", str(pt), out, "resnet10")


# ----------------------------------------------------------------------------- radnet → PyTorch

def test_monai_round_trip_gives_back_the_same_state_dict(tmp_path):
    source = fixture("monai_resnet10_medicalnet.safetensors")
    radnet_file, monai_file = str(tmp_path / "r.safetensors"), str(tmp_path / "m.safetensors")
    convert.convert_from("monai", source, radnet_file, "resnet10", conv1_t_stride=2,
                         bias_downsample=False)
    args, left_out = convert.to_monai(radnet_file, monai_file)
    assert left_out == []
    original, _ = weightsfile.read_safetensors(source)
    back, metadata = weightsfile.read_safetensors(monai_file)
    assert back.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(back[k], original[k], err_msg=k)
    assert json.loads(metadata["monai_resnet_args"]) == args
    assert args["block_inplanes"] == [6, 12, 24, 48] and args["conv1_t_stride"] == 2
    assert args["bias_downsample"] is False and args["feed_forward"] is False


def test_radnet_medicalnet_variant_in_monai_computes_what_jax_computes(outputs, tmp_path):
    """MONAI ran the --to=monai state dict of this radnet file (bottleneck units, stem
    stride 1, shortcut bias); JAX runs the file."""
    source = fixture("medicalnet_variant_resnet50.safetensors")
    _close(_embedding(source, _jax_input(outputs)),
           outputs[0]["medicalnet_variant_resnet50.monai_embedding"], "radnet → MONAI")
    # The command's output is the state dict MONAI loaded in the fixture script.
    out = str(tmp_path / "monai.safetensors")
    args, _ = convert.to_monai(source, out)
    assert json.dumps(args) == outputs[1]["medicalnet_variant_resnet50"]
    tensors, _ = weightsfile.read(source)
    state, _ = weightsfile.read_safetensors(out)
    expected = names.radnet_to_monai(tensors)
    assert state.keys() == expected.keys()


@pytest.mark.parametrize("name", ["radnet_variant_radnet10", "radnet_variant_resnet50"])
def test_the_reference_module_computes_what_jax_computes(name, outputs):
    """PyTorch's reference module (radnet.interop.torch_reference) ran these radnet-variant
    files in the fixture script: embedding and, with heads, every head's logits."""
    path = fixture(f"{name}.safetensors")
    x = _jax_input(outputs)
    _close(_embedding(path, x), outputs[0][f"{name}.embedding"], f"{name} embedding")
    p = pretrained.load(path)
    if p.config.model_name == "radnet":
        logits = p.apply(x)
        for head in labels.HEADS:
            _close(logits[head], outputs[0][f"{name}.{head}"], f"{name} {head}")


def test_reference_module_imports_without_torch_and_says_what_to_install():
    from radnet.interop import torch_reference
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="needs PyTorch: pip install torch"):
        torch_reference.ResNet3D  # noqa: B018
    with pytest.raises(ImportError, match="needs PyTorch"):
        torch_reference.load(fixture("radnet_variant_resnet50.safetensors"))


def test_reference_module_histogram_constants_are_the_jax_ones():
    """torch_reference keeps its own copy of the histogram scaling (it must not import Flax)."""
    from radnet.interop import torch_reference
    from radnet.models import heads
    assert torch_reference.HISTOGRAM_FLOOR == heads.HISTOGRAM_FLOOR
    assert torch_reference.HISTOGRAM_HALF_RANGE == heads.HISTOGRAM_HALF_RANGE


def test_to_monai_names_what_it_leaves_out(tmp_path):
    """A radnet model (encoder + heads) of the medicalnet variant: the encoder goes to MONAI,
    the heads are named, not dropped in silence."""
    import jax
    from flax import traverse_util

    from radnet import models
    fields = dict(depth=10, variant="medicalnet", width=2, hidden=4)
    variables = models.RadNet(**fields).init(jax.random.key(0, impl="rbg"),
                                             np.zeros((1, 32, 32, 32, 1), np.float32), train=False)
    flat = traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats")}, sep=".")
    source = str(tmp_path / "radnet_medicalnet.safetensors")
    weightsfile.write(source, flat, {"model_name": "radnet", "model": fields, "source_step": 3})
    args, left_out = convert.to_monai(source, str(tmp_path / "monai.safetensors"))
    heads = sorted(k for k in flat if k.startswith("params.heads."))
    assert left_out == heads and "params.heads.sequence.kernel" in heads
    state, metadata = weightsfile.read_safetensors(str(tmp_path / "monai.safetensors"))
    assert json.loads(metadata["radnet_left_out"]) == heads and metadata["radnet_source_step"] == "3"
    assert state["conv1.weight"].shape == (2, 1, 7, 7, 7) and args["conv1_t_stride"] == 2


def test_radnet_variant_cannot_go_to_monai_and_the_reason_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="'radnet' variant.*torch_reference"):
        convert.to_monai(fixture("radnet_variant_resnet50.safetensors"),
                         str(tmp_path / "x.safetensors"))


def test_names_map_both_ways():
    assert names.monai_to_radnet_name("layer2.0.downsample.0.weight") == \
        "params.block2.unit1.shortcut_conv.kernel"
    assert names.monai_to_radnet_name("layer3.1.bn2.running_var") == "batch_stats.block3.unit2.norm2.var"
    assert names.monai_to_radnet_name("bn1.num_batches_tracked") is None
    assert names.monai_to_radnet_name("fc.weight") is None
    for key in ("conv1.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv3.weight",
                "layer4.2.bn3.bias", "layer2.0.downsample.0.bias", "layer2.0.downsample.1.running_var"):
        assert names.radnet_to_monai_name(names.monai_to_radnet_name(key)) == key
    assert names.radnet_to_monai_name("params.block4.post_norm.scale") is None


# ----------------------------------------------------------------------------- command line

def test_command_line_converts_lists_unused_keys_and_mistakes_exit_2(tmp_path):
    out = str(tmp_path / "r18.safetensors")
    command = [sys.executable, "-m", "radnet.interop.convert"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command + ["--from=medicalnet", "--arch=resnet18",
                                     f"--in={fixture('medicalnet_resnet18_checkpoint.safetensors')}",
                                     f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "key(s) not used" in lines[0] and "conv_seg.6.weight" in lines[0]
    assert "shortcut_type=A" in done.stdout
    with safe_open(out, framework="numpy") as f:
        assert "params.block1.unit2.conv2.kernel" in f.keys()
    done = subprocess.run(command + ["--from=monai", "--arch=resnet10", "--bias_downsample=false",
                                     f"--in={fixture('monai_resnet10_default.safetensors')}",
                                     f"--out={tmp_path / 'y.safetensors'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit monai resnet10" in lines[0], lines
    assert "Traceback" not in done.stderr
