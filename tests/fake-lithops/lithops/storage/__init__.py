from .storage import InternalStorage

__all__ = ['InternalStorage']
