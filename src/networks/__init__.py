from src.networks.representation_head import RepresentationHead
from src.networks.segmenter import Segmenter, available_architectures, create_smp_model, weight_names

__all__ = ["RepresentationHead", "Segmenter", "available_architectures", "create_smp_model", "weight_names"]
