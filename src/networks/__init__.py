from src.networks.representation_head import RepresentationHead
from src.networks.segmenter import Segmenter, available_architectures

__all__ = ["RepresentationHead", "Segmenter", "available_architectures"]
