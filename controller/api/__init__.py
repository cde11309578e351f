"""The REST API (``/api/v1``): thin routes over the service functions."""
