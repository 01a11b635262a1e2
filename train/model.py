"""The seed tutorial's ConvNet for 28x28 single-channel images.

Layer for layer the PyTorch MNIST tutorial's network (without its dropout, which the product
card does not list). `torch.flatten(x, 1)` instead of the tutorial's `view(-1, 320)` keeps the
batch dimension symbolic, so TorchScript and ONNX export work for any batch size.
"""
import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "convnet"
INPUT_SHAPE = (1, 28, 28)  # channels, height, width
NUM_CLASSES = 10


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def build_model(architecture: str = ARCHITECTURE) -> nn.Module:
    if architecture != ARCHITECTURE:
        raise ValueError(f"unknown architecture {architecture!r}; this project builds {ARCHITECTURE!r}")
    return ConvNet()
