from src.datamodules.semi_supervised import SemiSupervisedDataModule, SupervisedDataModule

__all__ = ["SemiSupervisedDataModule", "SupervisedDataModule"]
