import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import ResNet18_Weights, resnet18

import model as fcn
from segmentation import UserError

SIZES = [(375, 1242), (370, 1224), (33, 65), (32, 32), (97, 31), (1, 1)]


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    return fcn.ResNet18Trunk().eval()


def make(arch, trunk, num_classes=5):
    classes = {"fcn32": fcn.FCN32s, "fcn16": fcn.FCN16s, "fcn8": fcn.FCN8s}
    return classes[arch](num_classes, trunk).eval()


@pytest.mark.parametrize("arch", fcn.ARCHS)
def test_output_has_exactly_the_input_size(arch, trunk):
    net = make(arch, trunk)
    with torch.no_grad():
        for size in SIZES:
            assert net(torch.randn(1, 3, *size)).shape == (1, 5, *size), size


def test_bilinear_kernel_follows_its_formula():
    for factor in (2, 3, 32):
        kernel = fcn.bilinear_kernel(factor)
        assert len(kernel) == 2 * factor - 1 and kernel[factor - 1] == 1
        for k, value in enumerate(kernel.tolist()):
            assert value == pytest.approx(1 - abs(k - (factor - 1)) / factor)


def test_fresh_fcn16_and_fcn8_equal_fcn32_on_the_same_trunk(trunk):
    torch.manual_seed(1)
    fcn32, fcn16, fcn8 = (make(a, trunk) for a in fcn.ARCHS)
    fcn16.score32.load_state_dict(fcn32.score32.state_dict())
    fcn8.score32.load_state_dict(fcn32.score32.state_dict())
    with torch.no_grad():
        for size in [(375, 1242), (33, 65), (64, 96)]:
            x = torch.randn(1, 3, *size)
            reference = fcn32(x)
            assert torch.allclose(fcn16(x), reference, atol=1e-5)
            assert torch.allclose(fcn8(x), reference, atol=1e-5)


def test_interpolation_equals_the_frozen_bilinear_deconvolution_except_past_the_last_cell():
    factor, (h, w) = 8, (5, 7)
    scores = torch.randn(2, 3, h, w)
    deconv = fcn.bilinear_deconv(3, factor, learnable=False)
    size = (factor * h, factor * w)
    with torch.no_grad():
        reference = deconv(scores)[..., : size[0], : size[1]]
    ours = fcn.upsample_aligned(scores, factor, size)
    interior = (slice(None), slice(None), slice(0, factor * (h - 1) + 1), slice(0, factor * (w - 1) + 1))
    assert torch.allclose(ours[interior], reference[interior], atol=1e-5)
    assert not torch.allclose(ours, reference, atol=1e-3)  # the border rows differ: replicate vs fade to 0
    assert torch.allclose(ours[..., -1, : factor * (w - 1) + 1], ours[..., factor * (h - 1), : factor * (w - 1) + 1],
                          atol=1e-6)


@pytest.mark.parametrize("arch", fcn.ARCHS)
def test_gradients_reach_the_trunk_and_learned_deconvolutions(arch):
    torch.manual_seed(0)
    net = fcn.build_model(arch, 4, pretrained=False).train()
    for module in net.modules():  # non-zero skip scores so gradients flow through every path
        if isinstance(module, torch.nn.Conv2d) and module.out_channels == 4:
            torch.nn.init.normal_(module.weight, std=0.1)
    loss = F.cross_entropy(net(torch.randn(2, 3, 64, 96)), torch.randint(0, 4, (2, 64, 96)))
    loss.backward()
    assert net.trunk.stem[0].weight.grad.abs().sum() > 0
    assert net.trunk.layer4[1].conv2.weight.grad.abs().sum() > 0
    for name in ("up32to16", "up16to8"):
        if hasattr(net, name):
            assert getattr(net, name).weight.grad.abs().sum() > 0
    # the final x32/x16/x8 upsampling is frozen: it has no parameters at all
    assert {n.split(".")[0] for n, _ in net.named_parameters()} <= {"trunk", "score32", "score16", "score8",
                                                                     "up32to16", "up16to8"}


@pytest.mark.parametrize("arch", fcn.ARCHS)
def test_torch_export_matches_eager(arch, trunk):
    net = make(arch, trunk)
    x = torch.randn(1, 3, 70, 130)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), net(x), atol=1e-5)


def test_channels_last_gives_the_same_result(trunk):
    net = make("fcn8", trunk)
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        expected = net(x)
        net.to(memory_format=torch.channels_last)
        result = net(x.contiguous(memory_format=torch.channels_last))
        net.to(memory_format=torch.contiguous_format)
    assert torch.allclose(result, expected, atol=1e-4)


def test_offline_without_weights_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as error:
        fcn.build_model("fcn32", 19, pretrained=True)
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--backbone-weights" in message and "--no-pretrained" in message


def test_weights_in_the_hub_cache_or_a_local_file_are_loaded_into_the_trunk(monkeypatch, tmp_path):
    torch.manual_seed(3)
    reference = resnet18().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from_cache = fcn.build_model("fcn16", 19, pretrained=True)
    from_file = fcn.build_model("fcn16", 19, pretrained=False, backbone_weights=str(cache / "resnet18-f37072fd.pth"))
    for net in (from_cache, from_file):
        assert torch.equal(net.trunk.stem[0].weight, reference["conv1.weight"])
        assert torch.equal(net.trunk.layer4[1].bn2.running_var, reference["layer4.1.bn2.running_var"])


def test_unreadable_backbone_file_is_reported(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"junk")
    with pytest.raises(UserError, match="weights.pth: cannot load ResNet18 weights"):
        fcn.build_model("fcn32", 19, pretrained=False, backbone_weights=str(path))

