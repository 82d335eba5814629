"""SENet (Hu et al., Squeeze-and-Excitation Networks) for 32x32 images such as CIFAR-10."""

from senet.model import (TTA, BasicBlock, FlipAverage, MultiCropAverage, Normalize, SENet, senet, senet18, senet34,
                         with_tta)

__all__ = ["TTA", "BasicBlock", "FlipAverage", "MultiCropAverage", "Normalize", "SENet", "senet", "senet18", "senet34",
           "with_tta"]
