"""SENet (Hu et al., Squeeze-and-Excitation Networks) for 32x32 images such as CIFAR-10."""

from senet.model import BasicBlock, SENet, senet18, senet34, senet

__all__ = ["BasicBlock", "SENet", "senet", "senet18", "senet34"]
