"""CPU convolutions routed through oneDNN give the network's own output (the routing is a speed change only)."""

import copy

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")

from doseai.models.onednn import _is_k4s2, conv3d, route_convolutions_to_onednn  # noqa: E402
from doseai.models.preference import PreferenceDoseNet  # noqa: E402

SMALL = {"down_channels": [4, 8, 8, 8], "film_hidden": 8, "refine_channels": 4, "refine_film": True}
SMALL_PRIOR = {"channels": [4, 8], "num_embeddings": 16, "embedding_dim": 4}


@pytest.fixture()
def counted_onednn_calls(monkeypatch):
    calls = []
    original = torch.mkldnn_convolution

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(torch, "mkldnn_convolution", counting)
    return calls


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")
def test_routed_network_matches_and_uses_onednn(counted_onednn_calls):
    torch.manual_seed(0)
    net = PreferenceDoseNet(11, SMALL_PRIOR, SMALL).eval()
    for module in net.modules():  # non-zero refinement and slider layers, so every path contributes
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            torch.nn.init.normal_(module.weight, std=0.2)
    routed = route_convolutions_to_onednn(copy.deepcopy(net))
    x, sliders = torch.rand(1, 11, 16, 16, 32), torch.tensor([[0.5, -0.3]])
    with torch.no_grad():
        expected = net(x, sliders)
        assert not counted_onednn_calls  # small 3D inputs take PyTorch's native path by default
        torch.testing.assert_close(routed(x, sliders), expected, rtol=1e-4, atol=1e-5)
        n_convolutions = sum(type(m) is torch.nn.Conv3d or _is_k4s2(m) for name, m in routed.named_modules()
                             if not name.startswith("prior.encoder"))  # a prediction runs no prior encoder
        assert any(_is_k4s2(m) for m in routed.modules())  # the prior's upsampling: phase convolutions
        assert len(counted_onednn_calls) == n_convolutions
        anatomy_term = routed.refinement_anatomy_term(x)
        torch.testing.assert_close(routed.decode(routed.latent(routed.encode_anatomy(x), sliders), x, sliders,
                                                 anatomy_term), expected, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps PyTorch's own dispatch
        calls = len(counted_onednn_calls)
        routed(x, sliders)
        assert len(counted_onednn_calls) == calls


def test_functional_convolution_matches_torch():
    x, weight, bias = torch.rand(1, 3, 6, 7, 8), torch.rand(5, 3, 3, 3, 3), torch.rand(5)
    torch.testing.assert_close(conv3d(x[:, 1:], weight[:, 1:], bias, padding=1),
                               torch.nn.functional.conv3d(x[:, 1:], weight[:, 1:], bias, padding=1))
    torch.testing.assert_close(conv3d(x, weight), torch.nn.functional.conv3d(x, weight))


@pytest.mark.parametrize("c_in, c_out, shape", [(16, 1, (6, 5, 8)), (4, 3, (3, 7, 2)), (2, 2, (1, 1, 1))])
def test_phase_transposed_convolution_is_pytorch_s(c_in, c_out, shape):
    """The dose prior's 4-tap stride-2 upsampling as a phase convolution gives PyTorch's transposed convolution,
    and a routed module uses it only without gradients (training keeps PyTorch's)."""
    from doseai.models.onednn import conv_transpose_k4s2

    torch.manual_seed(4)
    x, weight, bias = torch.randn(1, c_in, *shape), torch.randn(c_in, c_out, 4, 4, 4), torch.randn(c_out)
    expected = torch.nn.functional.conv_transpose3d(x, weight, bias, stride=2, padding=1)
    torch.testing.assert_close(conv_transpose_k4s2(x, weight, bias), expected, rtol=1e-5, atol=1e-4)
    module = torch.nn.ConvTranspose3d(c_in, c_out, 4, stride=2, padding=1)
    route_convolutions_to_onednn(module)
    with torch.no_grad():
        torch.testing.assert_close(module(x), torch.nn.ConvTranspose3d.forward(module, x), rtol=1e-5, atol=1e-4)
    module(x).sum().backward()
    assert module.weight.grad is not None
