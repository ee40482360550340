"""The model zoo: importing this module registers every architecture in ``MODELS``.

=================  ==========================================================================
name               architecture
=================  ==========================================================================
tiny_mlp           flatten, Linear(64), ReLU, Linear; for tests
tiny_cnn           two conv-BN-ReLU layers, global pool, Linear; for tests
lenet5             LeNet-5 (LeCun et al. 1998), ReLU and max-pool; inputs from 12x12
kwon_lenet         Kwon & Lee (2021)'s modified LeNet (conv-conv-global pool); inputs from 1x1
small_cnn          TRADES' MNIST SmallCNN (Zhang et al. 2019)
resnet20 ... 56    CIFAR ResNets with option-A shortcuts (He et al. 2016; akamaster's names)
resnet18/34/50     torchvision ResNets with a CIFAR (default) or ImageNet stem
mobilenet_v2       torchvision MobileNetV2 (Sandler et al. 2018), stride-1 stem on small inputs
vgg16              CIFAR VGG-16-BN with one linear layer (Li et al. 2017)
wrn_28_4/34_10     Wide ResNets as in Madry et al. / TRADES (Zagoruyko & Komodakis 2016)
=================  ==========================================================================
"""

from __future__ import annotations

from robcomp.models import resnet_cifar, small, torchvision_nets, vgg, wide_resnet

__all__ = [
    "resnet_cifar",
    "small",
    "torchvision_nets",
    "vgg",
    "wide_resnet",
]
