"""The networks match the notebook's exactly, and the registry and validation say what is wrong."""
import pytest
import torch
import torch.nn as nn

from gradlab.models import BLOCKS, DeepCNN, build_model, count_parameters

import notebook_reference as nb


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_notebook_weights_load_strictly_and_give_identical_outputs(block, depth):
    torch.manual_seed(0)
    reference = nb.Deep_CNN(channels_in=3, num_blocks=depth, ch_width=16, layer_type=nb.BLOCK_CLASSES[block])
    ours = DeepCNN(channels_in=3, num_blocks=depth, ch_width=16, layer_type=block)
    ref_state = reference.state_dict()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref_state.items()]
    ours.load_state_dict(ref_state, strict=True)
    x = torch.randn(5, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(reference, mode)(), getattr(ours, mode)()
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)  # same dropout mask in train mode
        assert torch.equal(ours(x), expected)


def test_block_classes_are_accepted_like_the_notebook():
    model = DeepCNN(3, num_blocks=2, ch_width=8, layer_type=BLOCKS["skip"])
    assert model.block == "skip"
    assert all(type(b) is BLOCKS["skip"] for b in model.layers)


def test_parameter_count_matches_the_notebook_loop():
    model = build_model("conv", depth=6, width=32)
    by_hand = sum(p.flatten().shape[0] for p in nb.Deep_CNN(3, 6, 32, nb.ConvBlock).parameters())
    assert count_parameters(model) == by_hand == 80426


def test_norm_none_replaces_every_batchnorm():
    model = build_model("res", depth=3, width=8, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert count_parameters(model) < count_parameters(build_model("res", depth=3, width=8))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_channels_last_input_is_accepted():
    model = build_model("skip", depth=2, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    channels_last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block="dense"), "unknown block 'dense'; known: ['conv', 'res', 'resdown', 'skip']"),
    (dict(norm="layer"), "unknown norm 'layer'"),
    (dict(depth=-1), "depth must be an integer >= 0"),
    (dict(width=7), "width must be an even integer >= 2"),
    (dict(width=0), "width must be an even integer >= 2"),
])
def test_bad_architectures_raise_value_errors_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_model(**{"block": "conv", "depth": 2, "width": 8, **kwargs})
