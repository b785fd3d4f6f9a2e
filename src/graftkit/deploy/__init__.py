"""Deployment: a run as a file another runtime serves, checked by that runtime."""
