"""Shipped YAML configs, installed as the package data `dinotrain.configs`."""
