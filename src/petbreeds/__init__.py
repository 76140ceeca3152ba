"""petbreeds: the fastai book's chapter 5 (Oxford-IIIT Pet) as a DVC pipeline on plain PyTorch."""

__version__ = "0.1.0"
