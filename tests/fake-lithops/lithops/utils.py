import logging
import sys


def setup_lithops_logger(log_level='INFO', **kwargs):
    """Like the real one: the 'lithops' logger writes to sys.stderr."""
    if log_level is None or str(log_level).lower() == 'none':
        return
    if isinstance(log_level, str):
        log_level = logging.getLevelName(log_level.upper())
    logger = logging.getLogger('lithops')
    logger.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s [%(levelname)s] %(name)s -- %(message)s'))
    logger.addHandler(handler)
    logger.setLevel(log_level)
    logger.propagate = False
