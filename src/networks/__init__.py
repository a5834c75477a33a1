from src.networks.representation_head import RepresentationHead, projection_head
from src.networks.segmenter import Segmenter, available_architectures, create_smp_model, weight_names

__all__ = [
    "RepresentationHead",
    "Segmenter",
    "available_architectures",
    "create_smp_model",
    "projection_head",
    "weight_names",
]
