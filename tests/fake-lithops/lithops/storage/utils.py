class StorageNoSuchKeyError(Exception):
    def __init__(self, bucket, key):
        super().__init__(f"No such key /{bucket}/{key} found in storage.")
