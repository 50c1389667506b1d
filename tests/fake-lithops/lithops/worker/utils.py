import os
import sys

from lithops.version import __version__


def get_runtime_metadata():
    """Same shape as the real one, with a short fixed module list."""
    meta = {
        'preinstalls': [['json', False], ['lithops', True], ['os', False]],
        'python_version': '%d.%d' % sys.version_info[:2],
        'lithops_version': __version__,
    }
    # Which image answered (a test's label: two "images" differ by it).
    if os.environ.get('LITHOPS_FAKE_MARKER'):
        meta['marker'] = os.environ['LITHOPS_FAKE_MARKER']
    return meta
