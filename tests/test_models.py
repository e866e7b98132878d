"""Model definitions: shapes, parameter counts of the published architectures, the factory, normalization."""
import pytest
import torch

from fastadv.models import (INPUT_SHAPES, MODELS, MnistCNN, Normalize, NormalizedModel, PreActResNet18, ResNet50,
                            WideResNet, get_model)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# Published sizes: Madry MNIST CNN 3.27 M; TRADES' SmallCNN 0.31 M (yaodongyu/TRADES models/small_cnn.py); PreAct-ResNet-18 11.17 M (with the final BN of Wong et al. 2020 /
# Rice et al. 2020: 1,024 more than pytorch-cifar's 11,171,146); WRN-34-10 46.16 M; ResNet-50 25.56 M.
@pytest.mark.parametrize("name,classes,params", [("mnist_cnn", 10, 3_274_634), ("small_cnn", 10, 312_202),
                                                 ("preact_resnet18", 10, 11_172_170),
                                                 ("wrn34_10", 10, 46_160_474), ("resnet50", 1000, 25_557_032)])
def test_parameter_counts(name, classes, params):
    with torch.device("meta"):  # no memory, no init time
        assert n_params(get_model(name, classes)) == params


@pytest.mark.parametrize("make,shape,classes", [(lambda: MnistCNN(width=0.25), (3, 1, 28, 28), 10),
                                                (lambda: PreActResNet18(width=8), (2, 3, 32, 32), 10),
                                                (lambda: WideResNet(10, 1), (2, 3, 32, 32), 10),
                                                (lambda: ResNet50(7), (2, 3, 64, 64), 7)])
def test_forward_and_backward_shapes(make, shape, classes):
    model = make()
    x = torch.rand(shape, requires_grad=True)
    out = model(x)
    assert out.shape == (shape[0], classes)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_resnet50_keys_match_torchvision_names():
    keys = set(ResNet50().state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
              "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"):
        assert k in keys
    assert len(keys) == 320  # torchvision.models.resnet50().state_dict() has 320 entries


def test_normalized_model():
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    inner = PreActResNet18(width=4).eval()
    wrapped = NormalizedModel(inner, mean, std).eval()
    x = torch.rand(2, 3, 32, 32)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(x), inner((x - m) / s))
    assert {"normalize.mean", "normalize.std"} <= set(wrapped.state_dict())
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize((0.0,), (0.0,))
    with pytest.raises(ValueError, match="mean and std"):
        Normalize((0.0, 1.0), (1.0,))
    with pytest.raises(ValueError, match=r"x must be \(B, 3"):
        wrapped(torch.rand(2, 1, 32, 32))


def test_get_model_factory():
    assert set(MODELS) == set(INPUT_SHAPES)
    m = get_model("preact_resnet18", 100, normalize="cifar10", width=8)
    assert isinstance(m, NormalizedModel) and m(torch.rand(1, 3, 32, 32)).shape == (1, 100)
    m = get_model("mnist_cnn", 10, normalize=((0.1307,), (0.3081,)), width=0.25)
    assert m(torch.rand(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match="name must be one of"):
        get_model("vgg16")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        get_model("mnist_cnn", 1)
    with pytest.raises(ValueError, match="normalize must be one of"):
        get_model("mnist_cnn", normalize="svhn")
    with pytest.raises(ValueError, match="depth must be 6n"):
        WideResNet(depth=30)


def test_small_cnn_is_the_trades_reference_layout_and_init():
    from fastadv.models import SmallCNN

    torch.manual_seed(0)
    m = SmallCNN()
    keys = list(m.state_dict())
    # the reference's parameter names, so its released checkpoints load
    assert keys[:2] == ["feature_extractor.conv1.weight", "feature_extractor.conv1.bias"]
    assert keys[-2:] == ["classifier.fc3.weight", "classifier.fc3.bias"] and len(keys) == 14
    assert all((mod.bias == 0).all() for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(m(x), torch.zeros(3, 10))  # the zero last layer of the reference
    m.train()
    torch.nn.init.normal_(m.classifier.fc3.weight)
    a, b = m(x), m(x)
    assert not torch.equal(a, b)  # dropout in train mode
    m.eval()
    assert torch.equal(m(x), m(x))
