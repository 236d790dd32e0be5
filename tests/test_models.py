import io

import pytest
import torch
from torch import nn

from smoothcert.data import DATASETS
from smoothcert.models import MODELS, Standardize, build_model
from smoothcert.models.cifar_resnet import CifarResNet

# Each registered model on the dataset it is meant for, with a batch small enough to stay fast.
CASES = [
    ("lenet", "mnist", 4),
    ("lenet_20_50", "mnist", 4),
    ("cifar_resnet20", "cifar10", 4),
    ("cifar_resnet56", "cifar10", 2),
    ("cifar_resnet110", "cifar10", 2),
    ("resnet50", "imagenet", 1),
]
# Image-to-image models, tested in test_denoise.py.
DENOISERS = {"dncnn", "dncnn_small"}


def _input(dataset: str, batch: int) -> torch.Tensor:
    info = DATASETS[dataset]
    return torch.rand(batch, info.channels, info.image_size, info.image_size)


def test_cases_cover_the_registry():
    assert {name for name, _, _ in CASES} | DENOISERS == set(MODELS)


@pytest.mark.parametrize(("name", "dataset", "batch"), CASES)
def test_logits_shape(name, dataset, batch):
    torch.manual_seed(0)
    model = build_model(name, dataset).eval()
    with torch.no_grad():
        logits = model(_input(dataset, batch))
    assert logits.shape == (batch, DATASETS[dataset].num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "dataset"),
    [("lenet", "cifar10"), ("lenet_20_50", "cifar10"), ("cifar_resnet20", "mnist")],
)
def test_models_fit_other_datasets(name, dataset):
    torch.manual_seed(0)
    model = build_model(name, dataset).eval()
    with torch.no_grad():
        assert model(_input(dataset, 2)).shape == (2, 10)


def test_first_layer_is_the_datasets_standardisation():
    model = build_model("cifar_resnet20", "cifar10")
    assert isinstance(model[0], Standardize)
    assert model[0].mean.tolist() == pytest.approx(DATASETS["cifar10"].mean)
    assert model[0].std.tolist() == pytest.approx(DATASETS["cifar10"].std)
    assert {"0.mean", "0.std"} <= set(model.state_dict())


def test_standardize_matches_hand_computation():
    torch.manual_seed(0)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = torch.rand(2, 3, 5, 6)
    expected = torch.empty_like(x)
    for c in range(3):
        expected[:, c] = (x[:, c] - mean[c]) / std[c]
    layer = Standardize(mean, std)
    torch.testing.assert_close(layer(x), expected)
    assert set(layer.state_dict()) == {"mean", "std"}
    assert "mean=(0.1, 0.5, 0.9)" in repr(layer) and "std=(0.2, 0.3, 0.4)" in repr(layer)


def test_standardize_keeps_channels_last():
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out = Standardize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(x)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("mean", "std"), [((0.5,), (0.2, 0.2)), ((), ()), ((0.5, 0.5), (0.2, 0.0))]
)
def test_standardize_rejects_bad_arguments(mean, std):
    with pytest.raises(ValueError, match="mean|std"):
        Standardize(mean, std)


@pytest.mark.parametrize(("name", "dataset"), [("lenet", "mnist"), ("cifar_resnet20", "cifar10")])
def test_state_dict_round_trip_reproduces_outputs(name, dataset):
    torch.manual_seed(0)
    model = build_model(name, dataset)
    model.train()
    model(_input(dataset, 8))  # move the BatchNorm running statistics away from their init
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    copy = build_model(name, dataset).eval()
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    x = _input(dataset, 3)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "dataset"), [("lenet", "mnist"), ("cifar_resnet20", "cifar10")])
def test_channels_last_gives_the_same_logits(name, dataset):
    torch.manual_seed(0)
    model = build_model(name, dataset).eval()
    x = _input(dataset, 3)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_model_name_lists_accepted_names():
    with pytest.raises(ValueError, match="name") as excinfo:
        build_model("vgg16", "cifar10")
    for name in MODELS:
        assert name in str(excinfo.value)


def test_unknown_dataset_lists_accepted_datasets():
    with pytest.raises(ValueError, match="dataset") as excinfo:
        build_model("lenet", "svhn")
    for name in DATASETS:
        assert name in str(excinfo.value)


def test_resnet110_has_depth_110():
    model = MODELS["cifar_resnet110"](num_classes=10, in_channels=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # Depth counts the 3x3 convolutions and the fc layer, not the two 1x1 projection shortcuts.
    assert sum(m.kernel_size == (3, 3) for m in convs) == 109
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert 1.6e6 < sum(p.numel() for p in model.parameters()) < 1.8e6


@pytest.mark.parametrize("depth", [0, 21, 100])
def test_cifar_resnet_rejects_depths_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth)


def test_resnet50_accepts_other_channel_counts():
    model = MODELS["resnet50"](num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 7)


def test_lenet_20_50_is_the_published_mnist_lenet():
    # conv 1->20 and 20->50 (5x5), fc 800->500->10, under the published parameter names.
    model = MODELS["lenet_20_50"](num_classes=10, in_channels=1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
        "fc1.weight": (500, 800), "fc1.bias": (500,),
        "fc2.weight": (10, 500), "fc2.bias": (10,),
    }
    # Its forward pass, written out from the published structure.
    x = torch.rand(3, 1, 28, 28)
    f = nn.functional
    h = f.max_pool2d(f.relu(f.conv2d(x, model.conv1.weight, model.conv1.bias)), 2, 2)
    h = f.max_pool2d(f.relu(f.conv2d(h, model.conv2.weight, model.conv2.bias)), 2, 2)
    h = f.relu(f.linear(h.view(-1, 4 * 4 * 50), model.fc1.weight, model.fc1.bias))
    expected = f.linear(h, model.fc2.weight, model.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_cifar_resnet_pools_like_the_published_avgpool8():
    # Cohen et al.'s CIFAR ResNet ends in AvgPool2d(8) on the 8x8 maps: the same bits.
    torch.manual_seed(0)
    model = MODELS["cifar_resnet20"](num_classes=10, in_channels=3).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        h = model.layer3(model.layer2(model.layer1(h)))
        expected = model.fc(nn.AvgPool2d(8)(h).view(len(x), -1))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

