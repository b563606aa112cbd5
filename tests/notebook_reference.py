"""A re-typed copy of the teaching notebook's network classes, the reference for weight compatibility.

Kept verbatim in structure (attribute names, order, forward) and deliberately independent
of gradlab, so that tests can load notebook-trained weights into gradlab.DeepCNN.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 2, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(channels // 2)
        self.conv2 = nn.Conv2d(channels // 2, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.relu(x)
        x = F.relu(self.bn1(self.conv1(x)))
        return self.conv2(x)


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 2, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(channels // 2)
        self.conv2 = nn.Conv2d(channels // 2, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x0 = x
        x = F.relu(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        return x + x0


class ResDownBlock(nn.Module):
    def __init__(self, channels_in, channels_out=None):
        super().__init__()
        if channels_out is None:
            channels_out = channels_in
        self.conv1 = nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv3 = nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.relu(x)
        x0 = self.conv3(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        return x + x0


class SkipBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 2, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(channels // 2)
        self.conv2 = nn.Conv2d(channels // 2, channels // 2, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.relu(x)
        x1 = self.conv1(x)
        x2 = F.relu(self.bn1(x1))
        x3 = self.conv2(x2)
        return torch.cat((x1, x3), 1)


class Deep_CNN(nn.Module):
    def __init__(self, channels_in, num_blocks=2, ch_width=32, layer_type=ResBlock):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, ch_width, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(ch_width)
        self.conv2 = nn.Conv2d(ch_width, ch_width, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ch_width)
        self.conv3 = nn.Conv2d(ch_width, ch_width, kernel_size=3, stride=1, padding=1)
        self.maxpool = nn.MaxPool2d(kernel_size=2)
        if num_blocks > 0:
            self.layers = self.create_blocks(num_blocks, layer_type, channels=ch_width)
        else:
            self.layers = nn.Identity()
        self.drop_out = nn.Dropout(p=0.5)
        self.linear1 = nn.Linear(ch_width * 4 * 4, 10)

    def create_blocks(self, num_blocks, block_type, channels):
        return nn.Sequential(*[block_type(channels) for _ in range(num_blocks)])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(x)
        x = self.conv3(x)
        x = F.relu(self.layers(x))
        x = self.maxpool(x)
        x = x.view(x.shape[0], -1)
        x = self.drop_out(x)
        return self.linear1(x)


BLOCK_CLASSES = {"conv": ConvBlock, "res": ResBlock, "resdown": ResDownBlock, "skip": SkipBlock}
