"""Image folders to webdataset shards (`shards build`), their checks, and the reader the trainer uses."""

__version__ = "0.1.0"
