"""Directory-backed stand-in for lithops.storage.InternalStorage.

storage_config (what a Lithops client sends in a get_metadata payload):
    {"backend": NAME, NAME: {"storage_bucket": BUCKET, "storage_dir": DIR}, ...}
Objects live at DIR/BUCKET/KEY.  "storage_dir" is a key of this fake only; if
absent, $LITHOPS_FAKE_STORAGE_DIR is used.
"""
import os

from lithops.storage.utils import StorageNoSuchKeyError


class InternalStorage:
    def __init__(self, storage_config):
        self.backend = storage_config['backend']
        section = storage_config.get(self.backend) or {}
        self.bucket = section.get('storage_bucket')
        if not self.bucket:
            raise Exception(f"'storage_bucket' is mandatory under '{self.backend}'"
                            " section of the configuration")
        root = section.get('storage_dir') or os.environ.get('LITHOPS_FAKE_STORAGE_DIR')
        if not root:
            raise Exception("fake lithops storage: no 'storage_dir' in the "
                            f"'{self.backend}' section and no $LITHOPS_FAKE_STORAGE_DIR")
        self.root = os.path.join(root, self.bucket)

    def _path(self, key):
        return os.path.join(self.root, *key.split('/'))

    def put_data(self, key, data):
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f'{path}.tmp-{os.getpid()}'
        with open(tmp, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)

    def get_data(self, key, stream=False, extra_get_args={}):
        try:
            with open(self._path(key), 'rb') as f:
                return f.read()
        except FileNotFoundError:
            raise StorageNoSuchKeyError(self.bucket, key)
