from .handler import function_handler

__all__ = ['function_handler']
