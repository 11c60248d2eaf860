"""Kafka plumbing."""
