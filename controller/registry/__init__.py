"""The model registry: blobs, TUF trust metadata, versions and variants."""
