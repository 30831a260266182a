"""Neural-network building blocks."""

from detector.nn.head import DetectionHead
from detector.nn.layers import ConvBNAct, MBConv, make_activation
from detector.nn.rnnpool import FastGRNNCell, RNNPool

__all__ = ["ConvBNAct", "DetectionHead", "FastGRNNCell", "MBConv", "RNNPool", "make_activation"]
