"""--compile: the compiled network computes the eager loss and gradients, and a run trains through it."""
import copy
import math

import torch

import main
from conftest import train_argv
from engine import segmentation_loss
from model import build_model


def test_compiled_network_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    # float64: in float32 an activation within rounding of a ReLU's kink can take the other branch in one of the two,
    # and change a gradient by far more than rounding (seen on the CPU with channels-last, eager against float64)
    eager = build_model("fcn16", 19, pretrained=False).train().double().to(memory_format=torch.channels_last)
    with torch.no_grad():  # the zero-initialised skip scores would leave their part of the graph untested
        for parameter in eager.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    twin = copy.deepcopy(eager)
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 19, (2, 64, 96))
    eager_loss, compiled_loss = (segmentation_loss(net(images), target) for net in (eager, torch.compile(twin)))
    (eager_loss + compiled_loss).backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-12, atol=0)
    # one scale for all gradients: BatchNorm over 2 images leaves some of them near zero
    eager_grads, compiled_grads = (torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
                                   for net in (eager, twin))
    largest = eager_grads.abs().max().item()
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=0, atol=1e-9 * largest)
    assert not torch.allclose(compiled_grads, 1.001 * eager_grads, rtol=0, atol=1e-9 * largest)

def test_a_compiled_run_trains_and_saves_plain_weights(synthetic_root, tmp_path):
    torch._dynamo.reset()
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--compile", "--epochs", "1")))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the training step went through dynamo
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["config"]["compile"] and math.isfinite(state["history"][0]["train_loss"])
    assert state["model"].keys() == build_model("fcn16", 19, pretrained=False).state_dict().keys()
