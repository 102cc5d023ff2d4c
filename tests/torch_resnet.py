"""A compact PyTorch ResNet with torchvision's parameter names: the reference for conversion.

Independent of affectjax: written from torchvision's resnet.py (v1.5, stride on the 3x3,
max-pool padding 1) and the VGGFace2 Caffe port (v1, stride on the first 1x1, max-pool
ceil_mode=True without padding). `forward` returns the pooled features before `fc`.
"""
import torch
from torch import nn

STAGES = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
          50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3))}


class Basic(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample, stride_on):
    super().__init__()
    del stride_on  # a basic block always strides its first 3x3
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample, stride_on):
    super().__init__()
    s1, s3 = (1, stride) if stride_on == '3x3' else (stride, 1)
    self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, s3, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchResNet(nn.Module):
  """ResNet{depth} at base width `width`; stride_on '3x3'|'1x1'; stem_pool 'torch'|'ceil'."""

  def __init__(self, depth=50, width=64, stride_on='3x3', stem_pool='torch', num_classes=10):
    super().__init__()
    kind, sizes = STAGES[depth]
    block = Bottleneck if kind == 'bottleneck' else Basic
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    if stem_pool == 'torch':
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.maxpool = nn.MaxPool2d(3, 2, 0, ceil_mode=True)
    inplanes = width
    for i, n in enumerate(sizes):
      planes, stride = width * 2**i, 1 if i == 0 else 2
      blocks = []
      for j in range(n):
        s = stride if j == 0 else 1
        downsample = None
        if s != 1 or inplanes != planes * block.expansion:
          downsample = nn.Sequential(
              nn.Conv2d(inplanes, planes * block.expansion, 1, s, bias=False),
              nn.BatchNorm2d(planes * block.expansion))
        blocks.append(block(inplanes, planes, s, downsample, stride_on))
        inplanes = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(inplanes, num_classes)

  def stem(self, x):
    return self.maxpool(self.relu(self.bn1(self.conv1(x))))

  def forward(self, x):
    x = self.stem(x)
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
    return torch.flatten(self.avgpool(x), 1)


def randomize_batchnorm(net: nn.Module, seed: int = 0) -> None:
  """Non-trivial BN affine parameters and running statistics, so conversion errors show."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.num_batches_tracked.fill_(7)
