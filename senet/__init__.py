"""SENet (Hu et al., Squeeze-and-Excitation Networks) for 32x32 images such as CIFAR-10."""

from senet.model import BasicBlock, FlipAverage, Normalize, SENet, senet, senet18, senet34

__all__ = ["BasicBlock", "FlipAverage", "Normalize", "SENet", "senet", "senet18", "senet34"]
