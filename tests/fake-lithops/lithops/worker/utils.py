import sys

from lithops.version import __version__


def get_runtime_metadata():
    """Same shape as the real one, with a short fixed module list."""
    return {
        'preinstalls': [['json', False], ['lithops', True], ['os', False]],
        'python_version': '%d.%d' % sys.version_info[:2],
        'lithops_version': __version__,
    }
