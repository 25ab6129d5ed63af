"""iotserver."""
